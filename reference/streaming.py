"""Algorithm 1: forward and backward pass through a chain of layers, tile by tile.

:func:`conventional` is ordinary backpropagation over the whole image;
:func:`streamed` is Algorithm 1 with the same result. Both take

* ``layers``: a list of ``reference.layers`` objects (Conv, ReLU, MaxPool), the
  part of the network that is streamed (``layers[0..i]`` in the paper);
  :func:`conventional` also takes ``reference.graph`` blocks (residual sums,
  concatenations), :func:`streamed` refuses them;
* ``x``: the image, (N, C, L) or (N, C, H, W);
* ``grad_fn``: maps the streamed output to dLoss/dOutput. It stands for lines
  9-11 of Algorithm 1 (the rest of the network, the criterion and its backward
  pass), e.g. ``lambda out: R`` for the loss ``sum(out * R)``;

and return ``(output, weight_grads, input_grad)``: ``weight_grads[l]`` is the
dict of parameter gradients of ``layers[l]`` (``{"w": ...}``, plus ``"b"`` with a
bias, for Conv; ``{}`` otherwise) and ``input_grad`` is dLoss/dx.

How the tiles are laid out is ``reference.tiling.plan_axis``; a 2D tile is a
product of one per-axis tile per axis.
"""

from __future__ import annotations

import itertools

from reference._args import per_axis, spatial_rank
from reference._xp import array_module
from reference.tiling import Window, concat, plan_axis


def _call(index, layer, method, *args, where="layer", **kwargs):
    """Run a layer method, naming the layer (``where`` index) in any ValueError it raises."""
    try:
        return getattr(layer, method)(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{where} {index} ({layer!r}): {err}") from None


def _grad(grad_fn, out):
    g = grad_fn(out)
    if tuple(g.shape) != tuple(out.shape):
        raise ValueError(f"grad_fn must return dLoss/dOutput with the output's shape {tuple(out.shape)}, "
                         f"got {tuple(g.shape)}")
    return g


def _check(layers, x):
    if len(layers) == 0:
        raise ValueError("layers must hold at least one layer to stream")
    return spatial_rank(x.shape, "x")


def forward_chain(layers, x, where="layer"):
    """Every level's activation of a chain run on the whole image: ``[x, layers[0](x), ...]``.

    An empty chain is the identity (``[x]``). ``where`` names the layers in errors.
    """
    activations = [x]
    for i, layer in enumerate(layers):
        activations.append(_call(i, layer, "forward", activations[-1], where=where))
    return activations


def backward_chain(layers, activations, grad_out, where="layer"):
    """Backpropagate ``grad_out`` through a chain whose levels are ``activations`` (from :func:`forward_chain`).

    Returns ``(weight_grads, input_grad)`` as :func:`conventional` does.
    """
    g, weight_grads = grad_out, [None] * len(layers)
    for i in reversed(range(len(layers))):
        g, weight_grads[i] = _call(i, layers[i], "backward", activations[i], g, where=where)
    return weight_grads, g


def conventional(layers, x, grad_fn):
    """Ordinary backpropagation over the whole image, keeping every activation."""
    _check(layers, x)
    activations = forward_chain(layers, x)
    weight_grads, input_grad = backward_chain(layers, activations, _grad(grad_fn, activations[-1]))
    return activations[-1], weight_grads, input_grad


def _windows_only(layers, chain):
    """Algorithm 1 here lays out tiles for chains of windows; a graph block (reference.graph) has no tile layout."""
    for i, (layer, node) in enumerate(zip(layers, chain)):
        if not isinstance(node, Window):
            raise ValueError(f"layer {i} ({layer!r}): streamed() runs chains of Conv, ReLU and MaxPool only; "
                             f"a block of parallel paths has no tile layout here. Use conventional() for graphs, "
                             f"and reference.overlap.algorithm2 for their overlap")


def _box(ranges):
    """Index selecting the spatial box given by one (start, stop) per axis."""
    return (Ellipsis,) + tuple(slice(a, b) for a, b in ranges)


def _run(layers, crop, pads_per_layer):
    """Forward a tile through the chain; returns every level's activation (0 = the crop)."""
    activations = [crop]
    for i, layer in enumerate(layers):
        activations.append(_call(i, layer, "forward", activations[-1], pad=pads_per_layer[i]))
    return activations


def _stitch(outputs, counts):
    """Eq. 4 on every axis: concatenate the tile outputs of a 1D or 2D grid."""
    if len(counts) == 1:
        return concat([outputs[(t,)] for t in range(counts[0])], axis=-1)
    rows = [concat([outputs[(r, c)] for c in range(counts[1])], axis=-1) for r in range(counts[0])]
    return concat(rows, axis=-2)


def _unique_param_grads(layer, x_tile, g_tile, tile, i):
    """Lines 18-20: kernel gradient of layer i from the positions this tile owns (crop_unique)."""
    xp = array_module(x_tile)
    out_box, in_box = [], []
    for axis_tile, window in zip(tile, layer.window(len(tile))):
        (b_start, _), (u_start, u_stop) = axis_tile.backward[i + 1], axis_tile.unique[i + 1]
        if u_start >= u_stop:
            return None  # an earlier tile owns all of this level here
        k0, k1 = u_start - b_start, u_stop - b_start  # owned outputs, tile-local
        out_box.append((k0, k1))
        in_box.append((k0 * window.stride, (k1 - 1) * window.stride + window.extent))  # their windows
    pads = ((0, 0), (0, 0)) + tuple(t.backward_pad[i] for t in tile)
    x_padded = xp.pad(x_tile, pads)  # has_params layers pad with zeros
    no_pad = ((0, 0),) * len(tile)
    return layer.param_grads(x_padded[_box(in_box)], g_tile[_box(out_box)], pad=no_pad)


def streamed(layers, x, tile_size, grad_fn, record=None):
    """Algorithm 1: the same ``(output, weight_grads, input_grad)`` as :func:`conventional`, tile by tile.

    ``tile_size`` (an int or one per axis) bounds the input crop of every tile in
    both passes. Forward (lines 1-8): each tile's output is computed from its crop
    and nothing else is kept; the outputs are concatenated (Eq. 4). Backward (lines
    13-22): each tile recomputes its activations from its crop (gradient
    checkpointing), takes its slice of the output gradient, backpropagates it, and
    keeps the input and kernel gradients only on the positions it owns; the kernel
    gradients of all tiles are summed (Eq. 6).

    If ``record`` is a list, one dict per tile is appended with what the tile
    computed (for teaching and tests): ``tile`` (its ``AxisTile`` per axis),
    ``output``, ``grad_out`` (the output gradient it fed in), ``weight_grads``
    (its contributions, None where it owns nothing), ``tile_input_grad`` (dLoss/dx
    over its whole backward crop, incomplete near the crop's inner sides) and
    ``input_grad`` (the owned, complete piece of it that goes into dLoss/dx).
    """
    ndim = _check(layers, x)
    xp = array_module(x)
    tile_size = per_axis(tile_size, ndim, "tile_size")
    plans = []
    for axis in range(ndim):
        chain = [_call(i, layer, "window", ndim)[axis] for i, layer in enumerate(layers)]
        _windows_only(layers, chain)
        plans.append(plan_axis(chain, x.shape[2 + axis], tile_size[axis], axis))
    grid = list(itertools.product(*(range(len(p)) for p in plans)))

    def tile_of(index):
        return tuple(plan[t] for plan, t in zip(plans, index))

    # lines 1-8: forward per tile without keeping activations, then concatenate
    outputs = {}
    for index in grid:
        tile = tile_of(index)
        crop = x[_box(t.forward[0] for t in tile)]
        pads = [tuple(t.forward_pad[i] for t in tile) for i in range(len(layers))]
        outputs[index] = _run(layers, crop, pads)[-1]
    output = _stitch(outputs, [len(p) for p in plans])
    g = _grad(grad_fn, output)  # lines 9-11

    # lines 12-23: backward per tile with recomputation
    weight_grads = [{} for _ in layers]
    input_grad = xp.zeros_like(x, dtype=xp.result_type(x, g))
    for index in grid:
        tile = tile_of(index)
        crop = x[_box(t.backward[0] for t in tile)]
        activations = _run(layers, crop, [tuple(t.backward_pad[i] for t in tile) for i in range(len(layers))])
        g_tile = g[_box(t.grad_out for t in tile)]  # crop_relevant_gradient
        entry = {"index": index, "tile": tile, "output": outputs[index], "grad_out": g_tile,
                 "weight_grads": [None] * len(layers)}
        for i in reversed(range(len(layers))):
            layer = layers[i]
            if layer.has_params:
                contribution = _unique_param_grads(layer, activations[i], g_tile, tile, i)
                entry["weight_grads"][i] = contribution
                for name, value in (contribution or {}).items():  # sum_gradients (Eq. 6)
                    weight_grads[i][name] = weight_grads[i][name] + value if name in weight_grads[i] else value
            g_tile = _call(i, layer, "input_grad", activations[i], g_tile,
                           pad=tuple(t.backward_pad[i] for t in tile))
        owned = [(t.unique[0], t.backward[0][0]) for t in tile]
        local = _box((u0 - b0, u1 - b0) for (u0, u1), b0 in owned)
        input_grad[_box(u for u, _ in owned)] = g_tile[local]
        entry["input_grad"] = g_tile[local]
        entry["tile_input_grad"] = g_tile
        if record is not None:
            record.append(entry)
    # every used position of every level is owned by exactly one tile, so each Conv got its contributions
    return output, weight_grads, input_grad
