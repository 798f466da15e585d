"""Algorithm 2 (finding the invalid borders of a tile) and the analytic formulas it must agree with.

The question (Sec. 3.3): if a tile is cut from the interior of a large image and
run through the layers as if it were an image -- each layer pads its borders as it
pads the image's -- which positions of each layer's output, and of each gradient,
come out different from the full image's? Those are the tile's *invalid borders*;
the overlap between tiles must be large enough to cut them away.

What :func:`algorithm2` counts
------------------------------
* The probe (lines 2-8). Every Conv becomes a conv of the same kernel size,
  stride, dilation and padding whose weights are all ``1/n`` (``n`` = number of
  kernel taps): each output is the mean of its window, so an all-ones input stays
  1 wherever no padding reached. One channel suffices (every channel of a constant
  input carries the same values). MaxPool becomes the *mean* pool of the same
  window, padding with zeros: a max over ones would not reveal -inf padding
  (max(-inf, 1, 1) = 1), nor pass on a smaller value from an invalid neighbour
  (max(0.5, 1) = 1). A mean does both, and a window touches exactly the positions
  it would for the max, so the borders found are the max-pool's. ReLU is left out:
  it is pointwise and moves no border (and all probe values are >= 0 anyway).
* Blocks (``reference.graph``). A residual block becomes the sum of its two
  probed branches, so its interior value is 2, not 1, and it falls below that
  wherever either branch's value does. A concatenation is probed the same way:
  constant kernels give every channel of a branch the same values, so one channel
  holding the sum of the two branches stands for all of them, and (all terms being
  positive) it is contaminated exactly where any channel of the concatenation is.
  Backward, the sum passes the gradient into both branches and adds their input
  gradients, as a concatenation followed by constant kernels does.
* Forward: an all-ones tile of ``tile_shape`` goes through the probe, padded at
  its borders by each layer.
* Backward (lines 9-16): a gradient of ones on every output of the tile is
  backpropagated through the probe. It tells which gradients are complete, i.e.
  received the contribution of every output that reads them.
* Invalid means: different from the value the same position takes when the tile
  sits in the interior of a much larger all-ones image (run through the same probe,
  the tile at an offset that is a multiple of the total stride). Comparing with
  that reference rather than with "the maximum" keeps the count right where, with
  stride > 1, interior gradients themselves vary from position to position. All
  probe values are sums of positive terms, so a missing or contaminated term always
  makes a value strictly smaller: nothing invalid can look valid by cancellation.
* Counted, per level (0 = input, l = output of layer l), per spatial axis, per
  side: the width of the border band holding every invalid position, i.e. the
  valid positions on that axis are one run ``[before, size - after)``. (With
  dilation a band can contain a few valid positions that no tap reads; they are
  counted in the band.) In 2D the bands of each axis are probed on their own:
  for the rows, the tile is cut from the large image on the row axis only and
  spans it on the column axis, so whatever differs comes from the row borders, and
  a row is invalid when any of its positions differs. Every probe value is a sum
  of positive terms, each a product of one factor per axis (the layers act on
  each axis on their own), so the invalid positions of a rows x columns tile are
  exactly its invalid rows and its invalid columns: the bands found per axis are
  the tile's. (Asking instead for a whole invalid line would miss a line of
  gradients that a strided, dilated kernel reads only at every other position.)

:func:`analytic_invalid` computes the same bands from the layer hyper-parameters
alone, and :func:`analytic_overlap` the overlap Algorithm 1 (``reference.streaming``)
uses between neighbouring tiles. These closed forms are ours, not the paper's (which
gives only Algorithm 2); on graphs they take, at a block, the wider of the two
paths' bands on each side (forward and backward) and the hull of the paths'
receptive fields (``tiling.Paths.field``). The activation bands are exact. The
gradient bands are exact when every layer reads every position of its input; a
layer that does not (a 1x1 convolution with stride 2 reads every other position)
leaves positions whose gradient is 0 in the full image too, and a tile that misses
such a zero contribution is still right. Algorithm 2 sees that; the closed form
counts every missed contribution, so there its gradient bands can be wider, never
narrower. verify/test_reference_overlap.py checks both statements.

Algorithm 1 here does not pad at inner tile sides; it computes exact ranges
(``reference.tiling``). Its forward overlap equals the one Algorithm 2 implies
whenever the padding offset lies on the stride grid (otherwise a padded tile that
starts on the grid wastes the rest, and Algorithm 2 implies more). Its backward
overlap equals Algorithm 2's for unpadded chains. With padding, Algorithm 2's
gradient bands can be narrower: outputs computed from inner-side padding still pass
real gradients back through a *linear* probe, which through ReLU or max-pool they
would not; Algorithm 1 does not rely on them. verify/test_reference_overlap.py
checks all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy

from reference._args import per_axis
from reference._xp import to_numpy
from reference.graph import Concat, Residual
from reference.layers import Conv, MaxPool
from reference.tiling import Field, Paths, chain_field, level_sizes


def _ndim(layers, ndim):
    dims = {layer.ndim for layer in layers if getattr(layer, "ndim", None) is not None}
    if ndim is not None:
        dims.add(ndim)
    if len(dims) != 1:
        raise ValueError(f"cannot tell the number of spatial axes: layers have {sorted(dims) or 'none'}; "
                         f"pass ndim=1 or ndim=2")
    return dims.pop()


def _tile_shape(tile_shape):
    if isinstance(tile_shape, int):
        tile_shape = (tile_shape,)
    if len(tuple(tile_shape)) not in (1, 2):
        raise ValueError(f"tile_shape must be an int (1D) or a pair (2D), got {tile_shape!r}")
    return per_axis(tuple(tile_shape), len(tuple(tile_shape)), "tile_shape")


def _chains(layers, ndim):
    """Per axis, the chain of tiling.Window of the layers."""
    windows = [layer.window(ndim) for layer in layers]
    return [[w[axis] for w in windows] for axis in range(ndim)]


def receptive_field(layers, ndim=None) -> tuple[Field, ...]:
    """Per axis: receptive field size, total stride and padding offset of the chain.

    Output k of the chain reads the input positions
    ``[k*stride - offset, k*stride - offset + size)``. With blocks
    (``reference.graph``) that is the hull of what the paths read: a block's
    offset is the larger of its paths' offsets, its right reach the larger of
    their right reaches.
    """
    return tuple(chain_field(chain) for chain in _chains(layers, _ndim(layers, ndim)))


class AxisOverlap(NamedTuple):
    """The overlap Algorithm 1 needs on one axis, in input positions.

    forward   between the input crops of neighbouring tiles in the forward pass:
              ``receptive_field - stride`` (the paper's ``o = n - 1`` for one
              stride-1 conv of length n)
    backward  between the input crops of neighbouring tiles in the backward pass:
              ``forward + stride * ((receptive_field - 1) // stride)``, because a
              tile must also hold every output that reads the gradients it owns
    """

    receptive_field: int
    stride: int
    offset: int
    forward: int
    backward: int


def analytic_overlap(layers, ndim=None) -> tuple[AxisOverlap, ...]:
    """Per axis: receptive field, total stride, padding offset and the required overlaps."""
    result = []
    for f in receptive_field(layers, ndim):
        forward = f.size - f.stride
        result.append(AxisOverlap(f.size, f.stride, f.offset, forward, forward + f.stride * ((f.size - 1) // f.stride)))
    return tuple(result)


@dataclass(frozen=True)
class Overlap:
    """Invalid border bands of a tile, as found by Algorithm 2 or computed analytically.

    sizes[l][a]          size of level l of the tile on axis a (0 = the tile itself)
    forward[l][a]        (before, after) widths of the invalid activation bands
    backward[l][a]       (before, after) widths of the invalid gradient bands
    output_stride[a]     product of the strides (Algorithm 2, line 7)
    """

    tile_shape: tuple
    output_stride: tuple
    sizes: tuple
    forward: tuple
    backward: tuple

    @property
    def forward_overlap(self) -> tuple[int, ...]:
        """Per axis: input overlap neighbouring tiles need so that their valid outputs abut.

        A tile of T inputs yields V valid outputs and the next tile may start V*stride
        further (tiles must start on the stride grid), so the overlap is T - V*stride.
        """
        return tuple(t - (n - lo - hi) * s for t, n, (lo, hi), s
                     in zip(self.tile_shape, self.sizes[-1], self.forward[-1], self.output_stride))

    @property
    def backward_overlap(self) -> tuple[int, ...]:
        """Per axis: input overlap neighbouring tiles need so that their complete input gradients abut.

        G = T - before - after positions of the input gradient are complete; the next
        tile may start stride * (G // stride) further.
        """
        return tuple(t - s * ((t - lo - hi) // s) for t, (lo, hi), s
                     in zip(self.tile_shape, self.backward[0], self.output_stride))


def _probe_layer(layer, ndim, where):
    """The constant-kernel stand-in of one layer (lines 3-4), or None for a pointwise layer."""
    if isinstance(layer, (Residual, Concat)):  # one channel, the sum of the branches (module docstring)
        return Residual(*(_probe_chain(branch, ndim, f"{where}, branch {name}, layer")
                          for name, branch in zip("ab", layer.branches)))
    if isinstance(layer, Conv):
        kernel, dilation = layer.w.shape[2:], layer.dilation
    elif isinstance(layer, MaxPool):
        kernel, dilation = tuple(w.extent for w in layer.window(ndim)), 1
    elif getattr(layer, "has_params", True) or any(w != (1, 1, 0) for w in layer.window(ndim)):
        raise ValueError(f"{where} ({layer!r}): Algorithm 2 knows Conv, MaxPool, pointwise layers and "
                         f"reference.graph blocks only")
    else:
        return None  # pointwise: moves no border
    w = numpy.full((1, 1) + tuple(kernel), 1.0 / numpy.prod(kernel))
    return Conv(w, stride=tuple(x.stride for x in layer.window(ndim)), dilation=dilation,
                padding=tuple(x.padding for x in layer.window(ndim)))


def _probe_chain(layers, ndim, where):
    probes = (_probe_layer(layer, ndim, f"{where} {i}") for i, layer in enumerate(layers))
    return [p for p in probes if p is not None]


def _probe(layers, ndim):
    """Constant-kernel stand-ins for the layers, as (index, probe), without touching the originals."""
    probes = ((i, _probe_layer(layer, ndim, f"layer {i}")) for i, layer in enumerate(layers))
    return [(i, p) for i, p in probes if p is not None]


def _forward_backward(probe, x):
    """Activations of every level and gradients of every level for a gradient of ones on the output."""
    activations = [x]
    for _, layer in probe:
        activations.append(layer.forward(activations[-1]))
    grads = [numpy.ones_like(activations[-1])]
    for (_, layer), a in zip(reversed(probe), reversed(activations[:-1])):
        grads.append(layer.input_grad(a, grads[-1]))
    return activations, grads[::-1]


def _bands(invalid, what, level, axis):
    """(before, after): the valid positions are the longest run of False in ``invalid``."""
    best, run_start = (0, 0), None
    for i, bad in enumerate(list(invalid) + [True]):
        if not bad and run_start is None:
            run_start = i
        elif bad and run_start is not None:
            if i - run_start > best[1] - best[0]:
                best = (run_start, i)
            run_start = None
    if best == (0, 0):
        raise ValueError(f"tile too small for the overlap: no {what} of level {level} is valid on axis {axis}; "
                         f"use a larger tile_shape")
    return best[0], len(invalid) - best[1]


def _axis_bands_found(tile_values, reference, axis, offset, what, level):
    """(before, after) on ``axis``: the tile spans ``reference`` on the other axes and starts at ``offset`` on this one."""
    tile_values, reference = to_numpy(tile_values)[0, 0], to_numpy(reference)[0, 0]
    region = numpy.take(reference, numpy.arange(offset, offset + tile_values.shape[axis]), axis=axis)
    invalid = ~numpy.isclose(tile_values, region, rtol=1e-12, atol=0.0)
    others = tuple(a for a in range(invalid.ndim) if a != axis)
    return _bands(invalid.any(axis=others), what, level, axis)


def algorithm2(layers, tile_shape) -> Overlap:
    """Algorithm 2: push an all-ones tile through constant kernels and count invalid borders.

    ``tile_shape`` is the tile's spatial shape (an int for 1D, or one int per
    axis). Returns an :class:`Overlap` with the bands of every level; see the module
    docstring for exactly what is counted. Bands are listed for every level,
    including ReLU outputs, so level l is the output of ``layers[l-1]``.
    """
    tile_shape = _tile_shape(tile_shape)
    ndim = _ndim(layers, len(tile_shape))
    fields = receptive_field(layers, ndim)
    probe = _probe(layers, ndim)
    strides = [[1] * ndim]  # per level: product of strides so far
    for layer in layers:
        strides.append([s * w.stride for s, w in zip(strides[-1], layer.window(ndim))])
    margins = [f.stride * (-(-2 * (f.size + f.offset) // f.stride) + 1) for f in fields]
    big_shape = tuple(t + 2 * m for t, m in zip(tile_shape, margins))
    big_acts, big_grads = _forward_backward(probe, numpy.ones((1, 1) + big_shape))
    per_axis = []  # per axis: the probe of a tile cut on that axis only (module docstring)
    for axis in range(ndim):
        try:
            shape = big_shape[:axis] + (tile_shape[axis],) + big_shape[axis + 1:]
            per_axis.append(_forward_backward(probe, numpy.ones((1, 1) + shape)))
        except ValueError as err:
            raise ValueError(f"tile_shape {tile_shape} cannot be probed for this chain (too small, or its paths "
                             f"do not land on one grid): {err}") from None
    # probe levels skip pointwise layers; map every level of the chain to its probe level
    probe_level, sizes, forward, backward = 0, [], [], []
    after_layer = {i + 1: k + 1 for k, (i, _) in enumerate(probe)}
    for level in range(len(layers) + 1):
        probe_level = after_layer.get(level, probe_level)
        offsets = [m // s for m, s in zip(margins, strides[level])]
        sizes.append(tuple(acts[probe_level].shape[2 + axis] for axis, (acts, _) in enumerate(per_axis)))
        forward.append(tuple(_axis_bands_found(acts[probe_level], big_acts[probe_level], axis, offsets[axis],
                                               "activation", level) for axis, (acts, _) in enumerate(per_axis)))
        backward.append(tuple(_axis_bands_found(grads[probe_level], big_grads[probe_level], axis, offsets[axis],
                                                "gradient", level) for axis, (_, grads) in enumerate(per_axis)))
    return Overlap(tile_shape, tuple(f.stride for f in fields), tuple(sizes), tuple(forward), tuple(backward))


def _window_forward(w, n_in, band, axis):
    """One window's output size and invalid activation band (closed form; see :func:`_axis_bands`)."""
    (lo, hi), n = band, w.out_size(n_in)
    if n < 1:
        raise ValueError(f"tile too small for the overlap: the tile has no output on axis {axis}")
    # output k is contaminated when its first tap (k*s in padded coordinates) lies before p + lo,
    # or its last tap (k*s + extent - 1) at or after p + n_in - hi
    first_bad_right = -(-(n_in - hi - w.extent + 1 + w.padding) // w.stride)
    return n, (-(-(w.padding + lo) // w.stride), max(0, n - first_bad_right))


def _forward_bands(chain, n, band, axis):
    """Sizes and invalid activation bands of levels 0..L, from level 0's size and band."""
    sizes, bands = [n], [band]
    for node in chain:
        if isinstance(node, Paths):  # invalid where either path is
            ends = [_forward_bands(path, sizes[-1], bands[-1], axis) for path in node.chains]
            n = node.out_size(sizes[-1])
            new = tuple(max(path_bands[-1][side] for _, path_bands in ends) for side in (0, 1))
        else:
            n, new = _window_forward(node, sizes[-1], bands[-1], axis)
        sizes.append(n)
        bands.append((min(n, new[0]), min(n, new[1])))
    return sizes, bands


def _backward_bands(chain, n_in, band):
    """Invalid gradient bands of levels 0..L of a chain with n_in inputs, from level L's band."""
    sizes, bands = level_sizes(chain, n_in), [band]
    for node, n_in, n in zip(reversed(chain), reversed(sizes[:-1]), reversed(sizes[1:])):
        lo, hi = bands[-1]
        if isinstance(node, Paths):  # the input gradient sums both paths': invalid where either is
            starts = [_backward_bands(path, n_in, (lo, hi))[0] for path in node.chains]
            bands.append(tuple(max(start[side] for start in starts) for side in (0, 1)))
            continue
        # input i misses a contribution when an output reading it is missing (k < 0 or k >= n) or invalid:
        # the innermost such input on the left is the last tap of output lo - 1, on the right the first tap of n - hi
        bands.append((min(n_in, max(0, (lo - 1) * node.stride - node.padding + node.extent)),
                      min(n_in, max(0, n_in - ((n - hi) * node.stride - node.padding)))))
    return bands[::-1]


def _axis_bands(chain, n_tile, axis):
    """Closed-form bands on one axis, level by level (ours; Algorithm 2 is the paper's way to find them).

    Tile coordinates; layer (extent e, stride s, padding p) maps n_in -> n outputs,
    output k reading padded positions k*s .. k*s + e - 1 (image positions minus p).
    Forward, from (0, 0) at the input: output k is contaminated iff its first tap
    lies in the left padding or the left band, k*s < p + lo, so the new band is
    ceil((p + lo) / s); on the right iff its last tap reaches p + n_in - hi.
    Backward, from (0, 0) at the output: input i misses a contribution iff some
    output reading it is outside the tile (k < 0 or k >= n: in the full image it
    exists) or has an invalid gradient. Going inwards, the last input read by an
    output k < lo is the last tap of k = lo - 1, (lo - 1)*s - p + e - 1, so the
    band is (lo - 1)*s - p + e; on the right the first tap of k = n - hi.
    First and last taps are real taps at any dilation, so dilation needs no term.
    A block (``tiling.Paths``) takes, on each side, the wider of its paths' bands:
    its output (forward) and its input gradient (backward) are sums of positive
    terms from both paths, contaminated where either path's is.
    The backward step assumes every output the tile misses has a non-zero gradient
    in the full image; see the module docstring for when that fails (and the band
    is then wider than Algorithm 2's).
    """
    sizes, fwd = _forward_bands(chain, n_tile, (0, 0), axis)
    bwd = _backward_bands(chain, n_tile, (0, 0))
    for level, (n, f, b) in enumerate(zip(sizes, fwd, bwd)):
        for what, (lo, hi) in (("activation", f), ("gradient", b)):
            if lo + hi >= n:
                raise ValueError(f"tile too small for the overlap: no {what} of level {level} is valid on axis {axis}; "
                                 f"use a larger tile_shape")
    return sizes, fwd, bwd


def analytic_invalid(layers, tile_shape) -> Overlap:
    """The bands Algorithm 2 finds, from the layer hyper-parameters alone (same :class:`Overlap`)."""
    tile_shape = _tile_shape(tile_shape)
    ndim = _ndim(layers, len(tile_shape))
    per_axis_bands = [_axis_bands(chain, n, axis) for axis, (chain, n) in enumerate(zip(_chains(layers, ndim), tile_shape))]
    levels = range(len(layers) + 1)
    return Overlap(
        tile_shape,
        tuple(f.stride for f in receptive_field(layers, ndim)),
        tuple(tuple(b[0][level] for b in per_axis_bands) for level in levels),
        tuple(tuple(b[1][level] for b in per_axis_bands) for level in levels),
        tuple(tuple(b[2][level] for b in per_axis_bands) for level in levels),
    )
