"""Eqs. 2-4 and 6: splitting into overlapping tiles, concatenating, summing kernel gradients.

Design
------
Everything here is integer arithmetic on one spatial axis; a 2D tile is the
product of one range per axis, because every layer acts on each axis on its own.

* A layer on one axis is a :class:`Window` ``(extent, stride, padding)``: output
  ``k`` reads the padded-input positions ``k*s .. k*s + extent - 1``, i.e. the
  image positions ``k*s - p .. k*s - p + extent - 1`` (``extent = d*(n-1) + 1`` for
  kernel ``n`` and dilation ``d``). A chain is a list of windows; its *levels* are
  0 (the input) to L (the output of the last layer).
* Ranges are half-open ``(start, stop)`` in the *full image's* coordinates of a
  level, so a tile's pieces can be compared with the full computation directly.
* Tiles are chosen on the output: :func:`output_split` cuts the output into
  contiguous, disjoint ranges (for two tiles exactly Eqs. 2 and 3). Walking back
  through the chain, :func:`chain_ranges` gives the range every level must hold so
  that the tile's output equals that slice of the full output, and the padding
  each layer applies on the tile: only the part of a window that falls outside
  the image is padded, so tile sides inside the image are never padded (paper
  footnote 2: zeros there "do not exist in the original vector").
  Consecutive tiles then overlap by ``receptive field - total stride`` input
  positions (``o = n - 1`` for one stride-1 conv, Sec. 3.1).
* :func:`plan_axis` lays out Algorithm 1's tiles on one axis, for the forward
  pass and for the backward pass (see its docstring for why the backward tiles
  reach further).
* A block of a graph (``reference.graph``: a residual sum or a channel
  concatenation) is, on one axis, a :class:`Paths`: parallel chains whose outputs
  land on the same grid. :func:`chain_field` and :func:`level_sizes` accept chains
  holding them (Algorithm 2 uses them); the tile layout of Algorithm 1 (ranges,
  footprints, :func:`plan_axis`) is for chains of windows only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

from reference import conv
from reference._args import per_axis
from reference._xp import array_module


class Window(NamedTuple):
    """One layer on one axis: output k reads image positions k*stride - padding + [0, extent)."""

    extent: int
    stride: int
    padding: int

    def out_size(self, n_in: int) -> int:
        return (n_in + 2 * self.padding - self.extent) // self.stride + 1

    def field(self) -> "Field":
        """A single window is its own receptive field."""
        return Field(self.extent, self.stride, self.padding)


class Field(NamedTuple):
    """Receptive field of a chain on one axis: output k reads inputs [k*stride - offset, k*stride - offset + size)."""

    size: int
    stride: int
    offset: int


class Paths(NamedTuple):
    """A block on one axis: parallel chains (of :class:`Window` or nested ``Paths``) whose outputs are merged.

    An empty chain is the identity. Every path must have the same total stride,
    and, for a given input length, the same output length (checked by
    :meth:`out_size`): the paths land on one grid, so output k of the block is
    one position of each path.
    """

    chains: tuple

    def field(self) -> Field:
        """The hull of the paths' receptive fields.

        Path p's output k reads ``[k*s - offset_p, k*s - offset_p + size_p)``, so the
        block's output k reads within ``[k*s - offset, k*s - offset + size)`` with
        ``offset = max_p offset_p`` and ``size = offset + max_p (size_p - offset_p)``.
        """
        fields = [chain_field(chain) for chain in self.chains]
        strides = sorted({f.stride for f in fields})
        if len(strides) != 1:
            raise ValueError(f"the paths of a block must have one total stride (they are merged position by "
                             f"position), got strides {[f.stride for f in fields]}; give every path the same "
                             f"product of strides")
        offset = max(f.offset for f in fields)
        return Field(offset + max(f.size - f.offset for f in fields), strides[0], offset)

    @property
    def stride(self) -> int:
        return self.field().stride

    def out_size(self, n_in: int) -> int:
        """The paths' common output length for ``n_in`` inputs; ValueError if they differ."""
        sizes = [level_sizes(chain, n_in)[-1] for chain in self.chains]
        if len(set(sizes)) != 1:
            raise ValueError(f"the paths of a block give {' and '.join(map(str, sizes))} outputs for an input "
                             f"of {n_in}; they must land on one grid (same output length): change the padding "
                             f"or the input length")
        return sizes[0]


def chain_field(chain) -> Field:
    """Receptive field size, total stride and padding offset of a chain of windows (or :class:`Paths`) on one axis.

    Each node composes as a window whose extent, stride and padding are its own
    field's size, stride and offset.
    """
    size, stride, offset = 1, 1, 0
    for node in chain:
        f = node.field()
        size += (f.size - 1) * stride
        offset += f.offset * stride
        stride *= f.stride
    return Field(size, stride, offset)


def level_sizes(chain, n_in: int) -> list[int]:
    """Sizes of levels 0..L on one axis for an input of ``n_in`` positions."""
    sizes = [n_in]
    for i, w in enumerate(chain):
        n = w.out_size(sizes[-1])
        if n < 1:
            raise ValueError(f"layer {i} has no output: its window (extent {w.extent}, padding {w.padding}) "
                             f"is larger than its padded input of size {sizes[-1] + 2 * w.padding}")
        sizes.append(n)
    return sizes


def output_split(n_out: int, n_tiles: int) -> list[tuple[int, int]]:
    """Eqs. 2-3: cut the outputs ``0..n_out-1`` into ``n_tiles`` contiguous, disjoint ranges.

    The first ``n_out % n_tiles`` ranges get one extra output, so for two tiles and
    ``f = n_out - 1`` this is ``a = {0..f//2}``, ``b = {f//2+1..f}``, as in the paper.
    """
    if not 1 <= n_tiles <= n_out:
        raise ValueError(f"n_tiles must be between 1 and the number of outputs {n_out}, got {n_tiles}")
    base, extra = divmod(n_out, n_tiles)
    bounds = [0]
    for t in range(n_tiles):
        bounds.append(bounds[-1] + base + (t < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def chain_ranges(chain, out_range, n_in: int):
    """Ranges of every level a tile must hold to compute the outputs ``out_range`` exactly.

    Returns ``(ranges, pads)``: ``ranges[l]`` for levels 0..L (``ranges[-1] ==
    out_range``) and ``pads[l]``, the (before, after) zero padding layer ``l`` applies
    on this tile -- non-zero only where the tile reaches past the image border.
    """
    sizes = level_sizes(chain, n_in)
    start, stop = out_range
    if not 0 <= start < stop <= sizes[-1]:
        raise ValueError(f"out_range must be a non-empty range inside [0, {sizes[-1]}), got {out_range}")
    ranges, pads = [(start, stop)], []
    for w, n in zip(reversed(chain), reversed(sizes[:-1])):
        lo, hi = start * w.stride - w.padding, (stop - 1) * w.stride + w.extent - w.padding
        start, stop = max(lo, 0), min(hi, n)
        ranges.append((start, stop))
        pads.append((start - lo, hi - stop))
    return ranges[::-1], pads[::-1]


def input_range(chain, out_range, n_in: int) -> tuple[int, int]:
    """The input positions a chain needs to compute ``out_range`` (Sec. 3.1: ``{x_0..x_{f//2+o}}`` for a)."""
    return chain_ranges(chain, out_range, n_in)[0][0]


def footprint(chain, level: int, rng, n_in: int) -> tuple[int, int]:
    """The outputs (level L) that depend on positions ``rng`` of ``level``, as a range (the hull).

    Used by the backward pass: a gradient at those positions is complete only once
    every output in this range has sent its contribution.
    """
    sizes = level_sizes(chain, n_in)
    start, stop = rng
    for w, n in zip(chain[level:], sizes[level + 1:]):
        # output k reads [k*s - p, k*s - p + extent): it touches [start, stop) when the two overlap
        start = max(0, -(-(start + w.padding - w.extent + 1) // w.stride))
        stop = min(n, (stop - 1 + w.padding) // w.stride + 1)
    return start, stop


def split(x, ranges, axis: int = -1) -> list:
    """Cut ``x`` along ``axis`` into the (possibly overlapping) tiles ``x[start:stop]``."""
    index = [slice(None)] * x.ndim
    tiles = []
    for start, stop in ranges:
        index[axis] = slice(start, stop)
        tiles.append(x[tuple(index)])
    return tiles


def concat(tiles, axis: int = -1):
    """Eq. 4: ``{(x*w)_0..(x*w)_f} = a ⁀ b``, the tile outputs concatenated in order."""
    return array_module(*tiles).concatenate(list(tiles), axis=axis)


def boxes(*axis_ranges) -> list[tuple]:
    """All products of one range per spatial axis (row-major): the tiles of a 2D grid."""
    return list(itertools.product(*axis_ranges))


def tile_weight_grads(x, grad_out, w_shape, out_boxes, stride=1, dilation=1) -> list:
    """The terms of Eq. 6: Eq. 5 on each piece of ``grad_out`` and the input it reads.

    ``out_boxes`` are disjoint pieces of the output (one ``(start, stop)`` per
    spatial axis each); piece ``[a, b)`` of dp reads the inputs ``[a*s, (b-1)*s +
    extent)``, the same shift by ``f//2`` (times the stride) that Eq. 6 writes.
    """
    ndim = len(w_shape) - 2
    stride = per_axis(stride, ndim, "stride")
    dilation = per_axis(dilation, ndim, "dilation")
    extents = [d * (n - 1) + 1 for n, d in zip(w_shape[2:], dilation)]
    terms = []
    for box in out_boxes:
        if len(box) != ndim:
            raise ValueError(f"each output box needs one (start, stop) per spatial axis ({ndim}), got {box}")
        g_index = (Ellipsis,) + tuple(slice(a, b) for a, b in box)
        x_index = (Ellipsis,) + tuple(slice(a * s, (b - 1) * s + e) for (a, b), s, e in zip(box, stride, extents))
        terms.append(conv.weight_grad(x[x_index], grad_out[g_index], w_shape, stride, dilation))
    return terms


def summed_weight_grad(x, grad_out, w_shape, out_boxes, stride=1, dilation=1):
    """Eq. 6: the kernel gradient as the sum of the tiles' kernel gradients (equals Eq. 5 on the whole)."""
    total = None
    for term in tile_weight_grads(x, grad_out, w_shape, out_boxes, stride, dilation):
        total = term if total is None else total + term
    return total


@dataclass(frozen=True)
class AxisTile:
    """One tile of Algorithm 1 on one axis; every range is in full-image coordinates of its level.

    out          its share of the streamed output (disjoint from the other tiles')
    forward      per level 0..L, what the forward pass computes (forward[0]: the input crop)
    forward_pad  per layer, the (before, after) padding the forward pass applies
    grad_out     the outputs whose gradient the backward pass feeds in (crop_relevant_gradient)
    backward     per level, what the backward pass recomputes (backward[0]: the input crop)
    backward_pad per layer, the padding in the backward pass
    unique       per level, the positions whose gradient this tile contributes (crop_unique)
    """

    out: tuple[int, int]
    forward: tuple
    forward_pad: tuple
    grad_out: tuple[int, int]
    backward: tuple
    backward_pad: tuple
    unique: tuple

    @property
    def size(self) -> int:
        """Input positions the tile holds at most (the backward crop contains the forward one)."""
        return self.backward[0][1] - self.backward[0][0]


def _plan(chain, n_in, n_tiles):
    sizes = level_sizes(chain, n_in)
    filled = [0] * len(sizes)  # per level: positions below this are owned by earlier tiles
    tiles = []
    for out in output_split(sizes[-1], n_tiles):
        forward, forward_pad = chain_ranges(chain, out, n_in)
        unique = []
        for level, (start, stop) in enumerate(forward):
            unique.append((max(start, filled[level]), stop))
            filled[level] = max(filled[level], stop)
        g_start, g_stop = out
        for level, (start, stop) in enumerate(unique):
            if start < stop:
                f_start, f_stop = footprint(chain, level, (start, stop), n_in)
                g_start, g_stop = min(g_start, f_start), max(g_stop, f_stop)
        backward, backward_pad = chain_ranges(chain, (g_start, g_stop), n_in)
        tiles.append(AxisTile(out, tuple(forward), tuple(forward_pad), (g_start, g_stop),
                              tuple(backward), tuple(backward_pad), tuple(unique)))
    return tiles


def plan_axis(chain, n_in: int, tile_size: int, axis: int = 0) -> list[AxisTile]:
    """Algorithm 1's tiles on one axis: the fewest tiles whose input crops fit in ``tile_size``.

    Forward: tile t computes the outputs ``out`` (from :func:`output_split`) from
    the input crop ``forward[0]``. Backward: each level's positions are owned by the
    first tile that holds them (the paper's ``filled``); tile t contributes the
    gradient only on the positions it owns (``unique``, the paper's crop_unique),
    and for those gradients to be complete it must backpropagate every output that
    depends on them. So it feeds in the output gradient on ``grad_out`` (its ``out``
    extended to the right by up to ``(rf - 1)//stride`` outputs) and recomputes the
    larger crop ``backward[0]``. This is the paper's remark that "the overlap o for
    the input x needs to be increased to calculate the full dx" (Sec. 3.2).
    """
    field = chain_field(chain)
    n_out = level_sizes(chain, n_in)[-1]
    # a tile with m outputs holds at least (m-1)*stride + rf - 2*offset inputs: a lower bound on the count
    most_outputs = max(1, (tile_size - field.size + 2 * field.offset) // field.stride + 1)
    fewest = min(n_out, max(1, -(-n_out // most_outputs)))
    candidates = iter(range(fewest, n_out + 1))
    for n_tiles in candidates:  # usually the first few fit
        tiles = _plan(chain, n_in, n_tiles)
        if max(t.size for t in tiles) <= tile_size:
            return tiles
        if n_tiles == fewest + 8:
            break
    finest = _plan(chain, n_in, n_out)  # one output per tile: the smallest crops there are
    smallest = max(t.size for t in finest)
    if smallest > tile_size:
        raise ValueError(
            f"tile_size {tile_size} on axis {axis} is too small for the overlap of this chain "
            f"(receptive field {field.size}, total stride {field.stride}): even with one output per tile "
            f"the backward pass needs {smallest} input positions; use tile_size >= {smallest}")
    for n_tiles in candidates:
        tiles = _plan(chain, n_in, n_tiles)
        if max(t.size for t in tiles) <= tile_size:
            return tiles
    return finest
