"""Dense prediction: a per-pixel loss streamed tile by tile, and outputs written into an array.

A per-pixel loss ``L = reduce(loss_fn(y, t))`` of the output ``y = module(x)`` and a target
``t`` (``reduce``: the mean or the sum over every element ``loss_fn`` returns, ``n`` of them)
needs no stitched output: the loss at an output position depends on that position's output
and target only, so

    dL/dy[p] = d loss_fn(y[p], t[p]) / dy[p] · (1/n for the mean, 1 for the sum)     (D1)

is known as soon as the tile owning ``p`` has computed ``y[p]``. Each tile therefore runs
once, with grad: its owned output, its part of the target, the loss there, (D1), and at once
its backward (Algorithm 1's backward step, with (D1) as its slice of the output gradient).
The owned parts partition the output, so the tiles' parameter and input gradients add up to
conventional backprop's (Eqs. 5-7) and the tiles' loss sums to the loss. Nothing is
recomputed, and neither the output nor its gradient is ever stitched: memory is one tile's
graph plus the gradients.

The gradients are computed before anyone asks for them, for a loss gradient of 1: the loss
carries an autograd node (:class:`PixelLossFunction`) whose backward returns them times the
loss's incoming gradient (they are linear in it), so ``loss.backward()``, a scaled loss
(``GradScaler``), accumulation over several calls and ``torch.autograd.grad`` all give
conventional backprop's gradients.

With normalisations over the image in training mode (:mod:`streamcnn.norms`), their
statistics come first (forward passes), then the whole-map terms of their backward
(``passes.backward_terms``), whose backward passes need each tile's output gradient: (D1)
gives it per tile, from the tile's own output and target. Then the one pass above.

The other direction of dense prediction, inference whose output is larger than memory:
:class:`ArrayOutput` receives each tile's owned output in an array (a memmap, a zarr array)
as the tile loop (``function.TileRunner.forward``) computes it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .errors import StreamingError
from .function import TileRunner, collect, refuse_higher_order
from .norms import counters, update_replayed
from .passes import backward_terms
from .state import Snapshot, TensorUse, backward_here, capture, module_tensors, \
    observing_gradient_hooks, substituted
from .tiling import Tile, iter_tiles

REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------ the loss and its target

@dataclass
class PixelLoss:
    """``loss_fn`` (output, target) -> the loss of every element (torch's ``reduction="none"``),
    reduced by ``reduction`` over all of them; ``target``: a tensor, or an array read one tile's
    part at a time (numpy, ``numpy.memmap``, zarr), indexed at the output's resolution:
    ``(N, C, *spatial)`` like the output (per-channel targets: BCE, MSE) or ``(N, *spatial)``
    (class indices for cross-entropy). ``transform``: applied to each tile's part of it."""

    loss_fn: object
    target: object
    reduction: str = "mean"
    transform: object = None
    count: int | None = field(default=None, init=False)  # elements loss_fn gives for the whole output
    dtype: torch.dtype | None = field(default=None, init=False)  # that loss's
    channels: bool = field(default=False, init=False)  # whether the target has the output's C
    positions: int = field(default=0, init=False)  # pixels of the whole output, batch included

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"pixel_loss reduces the per-pixel loss by 'mean' or 'sum', got "
                             f"reduction={self.reduction!r}; loss_fn itself must not reduce "
                             f"(reduction='none')")
        for name, value in (("loss_fn", self.loss_fn), ("target_transform", self.transform)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        if not isinstance(self.target, torch.Tensor) and not all(
                hasattr(self.target, a) for a in ("shape", "dtype", "__getitem__")):
            raise TypeError(f"the target must be a tensor or an array with .shape, .dtype and "
                            f"numpy-style slicing (numpy, numpy.memmap, zarr), got "
                            f"{type(self.target).__name__}")

    def check(self, out_shape: tuple) -> None:
        """Refuse a target that is neither ``out_shape`` (``(N, C, *spatial)``; C None where the
        graph does not know it) nor ``(N, *spatial)``."""
        shape = tuple(self.target.shape)
        spatial = out_shape[2:]
        self.channels = len(shape) == len(out_shape)
        self.positions = out_shape[0] * math.prod(spatial)
        fits = (shape == (out_shape[0],) + spatial) or (
            self.channels and shape[:1] + shape[2:] == out_shape[:1] + spatial
            and out_shape[1] in (None, shape[1]))
        if not fits:
            shown = tuple("C" if s is None else s for s in out_shape)
            raise ValueError(
                f"the target has shape {shape}, the streamed output {shown}: pass a target of "
                f"the output's shape (one value per output element: binary_cross_entropy, mse, "
                f"huber) or {(out_shape[0],) + spatial} (one class index per pixel: "
                f"cross_entropy), at the output's resolution")

    @property
    def grad(self) -> bool:
        return isinstance(self.target, torch.Tensor) and self.target.requires_grad

    def part(self, tile: Tile, y: torch.Tensor) -> torch.Tensor:
        """The target at the positions ``tile`` owns, on ``y``'s device: a tensor's slice, or an
        array's read as integer labels in int64 and other values in ``y``'s dtype (or as
        ``transform`` makes them)."""
        box = tile.out if self.channels else tile.out[:1] + tile.out[2:]
        if isinstance(self.target, torch.Tensor):
            t = self.target[box]
        else:
            t = torch.from_numpy(np.array(self.target[box], copy=True))
            if self.transform is None:
                integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
                t = t.to(torch.int64 if integer else y.dtype)
        if self.transform is not None:
            t = self.transform(t)
        return t.to(y.device)

    def values(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``loss_fn(y, t)``, refused unless it is one loss per output element or pixel."""
        values = self.loss_fn(y, t)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"loss_fn returned a {type(values).__name__}, not a tensor of "
                            f"per-pixel losses")
        per_pixel = (tuple(y.shape), tuple(y.shape[:1] + y.shape[2:]))
        if tuple(values.shape) not in per_pixel:
            reduced = "a single number" if values.dim() == 0 else f"shape {tuple(values.shape)}"
            raise ValueError(
                f"loss_fn returned {reduced} for a tile's output of shape {tuple(y.shape)} and "
                f"target of shape {tuple(t.shape)}: pixel_loss needs the loss of every output "
                f"element, {per_pixel[0]}, or pixel, {per_pixel[1]} (torch's reduction='none', "
                f"e.g. functools.partial(F.cross_entropy, reduction='none')), and reduces it "
                f"itself (reduction='mean' or 'sum')")
        return values

    def gradient(self, tile: Tile, y: torch.Tensor):
        """The float64 sum of the loss over the positions ``tile`` owns (its owned output ``y``),
        and (D1), the loss's gradient at ``y`` (None where ``y`` needs none). The first tile's
        loss fixes ``count``, the mean's divisor: one per pixel, or per output element."""
        t = self.part(tile, y)
        out = y.detach().requires_grad_(y.requires_grad)
        with torch.set_grad_enabled(y.requires_grad):
            values = self.values(out, t)
        if self.count is None:
            self.count = self.positions * (y.shape[1] if values.dim() == y.dim() else 1)
            self.dtype = values.dtype
        total = values.detach().sum(dtype=torch.float64)
        if not values.requires_grad:
            return total, None
        weight = torch.ones_like(values)
        if self.reduction == "mean":
            weight = weight / self.count  # (as Tensor.mean's backward divides the loss's gradient)
        (g,) = torch.autograd.grad(values, out, weight, allow_unused=True)
        return total, g

    def reduced(self, total: torch.Tensor) -> torch.Tensor:
        """The loss from the float64 sum ``total``, in the per-pixel loss's dtype."""
        value = total / self.count if self.reduction == "mean" else total
        return value.to(self.dtype)


# ------------------------------------------------------------------ the streamed pass

@dataclass
class _Gradients:
    """What one streamed pixel loss computed for a loss gradient of 1: the input's gradient
    (None where it has none) and that of each module tensor the node takes."""

    x: torch.Tensor | None
    tensors: list


class PixelLossFunction(torch.autograd.Function):
    """The autograd node of a streamed per-pixel loss. Inputs: the loss (computed), the
    gradients it has for a loss gradient of 1, the image (None unless a tensor) and the
    module tensors the tiles read that require grad. Saved: the image and those tensors,
    so an in-place change of one before backward raises as in conventional autograd."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: _Gradients, x, *tensors):
        ctx.grads = grads
        ctx.save_for_backward(x, *tensors)
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        refuse_higher_order("Streaming.pixel_loss", "its gradients were computed tile by tile "
                            "during the call, without a graph of them")
        ctx.saved_tensors  # raises if any was changed in place since the call
        grads = [ctx.grads.x] + ctx.grads.tensors
        return (None, None, *(t * g if t is not None and need else None
                              for t, need in zip(grads, ctx.needs_input_grad[2:])))


def pixel_loss(runner: TileRunner, graph, x, loss: PixelLoss, stream_norms) -> torch.Tensor:
    """The reduced per-pixel ``loss`` of the output of ``runner``'s pipeline on its input
    ``x`` (a tensor, or None: an array), each tile run once and backpropagated at once; with
    a node returning the gradients (see the module docstring). ``stream_norms()``: the
    normalisations' state with whole-image statistics (``streaming._stream_norms``), or
    None. Counts the tiles in ``runner.stats.forward``."""
    n = runner.source.shape[0]
    if len(runner.outputs.steps) != 1:
        raise StreamingError(
            f"pixel_loss takes the loss of one output map, and the module returns "
            f"{len(runner.outputs.steps)} ({', '.join(runner.outputs.paths)}): stream a module "
            f"that returns the map the loss is on, or sum pixel losses of the streamed outputs")
    loss.check((n, graph.steps[runner.outputs.maps[0]].channels) + runner.outputs.spatial[0])
    x_grad = isinstance(x, torch.Tensor) and x.requires_grad
    trainable = [(names, t) for names, t in module_tensors(runner.pipeline).values() if t.requires_grad]
    grad = torch.is_grad_enabled() and (x_grad or bool(trainable))
    if grad and loss.grad:
        raise StreamingError("the target requires grad: pixel_loss gives gradients to the module "
                             "and its input only; pass target.detach(), or compute this loss "
                             "on the unstreamed output")
    norms = stream_norms()
    aliases = [t.detach().requires_grad_() for _, t in trainable]
    original = {id(a): t for a, (_, t) in zip(aliases, trainable)}
    if grad and norms is not None:
        backward_terms(runner, graph, norms, runner.source,
                       lambda tile, ys: [loss.gradient(tile, ys[0])[1]],
                       {name: t.detach() for names, t in trainable for name in names}, x_grad=x_grad)
    substitutes = {name: a for a, (names, _) in zip(aliases, trainable) for name in names}
    total, grad_x, sums, captured = _run(runner, loss, grad, x_grad,
                                         substitutes, counters(norms.nodes) if norms else frozenset())
    value = loss.reduced(total)
    if not grad:
        return value
    grads = _Gradients(grad_x, [sums.get(id(a)) for a in captured.grad_tensors])
    return PixelLossFunction.apply(value, grads, x if isinstance(x, torch.Tensor) else None,
                                   *(original[id(a)] for a in captured.grad_tensors))


def _run(runner: TileRunner, loss: PixelLoss, grad: bool,
         x_grad: bool, substitutes: dict, own: frozenset):
    """The one pass: (float64 loss sum, input gradient or None, alias id -> summed gradient,
    ``state.Captured`` of the first tile's reads (its grad tensors: aliases), or None
    without grad)."""
    source, stats = runner.source, runner.stats.forward
    tiles = list(iter_tiles(runner.tilings))
    grad_x = torch.zeros_like(source.tensor) if grad and x_grad else None
    reached = False
    total = captured = None
    replayed: dict = {}  # normalisation -> how often a checkpoint ran it again in a tile
    wrt, sums = [], []
    with contextlib.ExitStack() as stack:
        if grad:
            stack.enter_context(substituted(runner.pipeline, substitutes))
            stack.enter_context(observing_gradient_hooks(runner.pipeline))
        snapshot = Snapshot(runner.pipeline, runner.device)  # (with the hooks observed)
        inputs = stack.enter_context(runner.inputs(
            "pixel loss", tiles, lambda t: (t, runner.read(source, t)), stats))
        for tile, raw in inputs:
            leaf = raw.detach().requires_grad_(grad and x_grad)
            with torch.set_grad_enabled(grad), runner.scope(tile) as mode:
                tile_input = runner.feed(leaf)
                with TensorUse(tile_input) if stats.computed == 0 else contextlib.nullcontext() as use:
                    (y,) = runner.run(tile_input, tile)
                if use is not None and grad:  # (before a backward reaches what it read)
                    captured = capture(runner.pipeline, use.read, own)
                    wrt, sums = list(captured.grad_tensors), [None] * len(captured.grad_tensors)
                if mode is not None:
                    mode.replaying()
                part, g = loss.gradient(tile, y)
                if g is not None:
                    backward_here(y, g)
            del y, g
            if use is not None and mode is not None:
                replayed = mode.replayed
            if grad_x is not None and leaf.grad is not None:
                grad_x[tile.inp] += leaf.grad
                reached = True
            collect(sums, wrt)
            total = part if total is None else total + part
            snapshot.check_tile()
            stats.tiles += 1
            stats.computed += 1
    update_replayed(replayed, runner.norms)
    sums = {id(a): s for a, s in zip(wrt, sums)}
    return total, grad_x if reached else None, sums, captured


# ------------------------------------------------------------------ inference into an array

class ArrayOutput:
    """A streamed output written tile by tile into ``array`` (numpy, ``numpy.memmap``, zarr, or
    anything with ``.shape`` and numpy-style slice assignment; a tensor too) of the output's
    ``shape``, ``(N, C, *spatial)``. Each tile's owned output is copied to the host and
    assigned (values are cast to the array's dtype as numpy assignment casts them)."""

    def __init__(self, array, shape: tuple):
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"out has shape {tuple(array.shape)}, the streamed output "
                             f"{tuple(shape)} (N, C, *spatial): pass an array of the output's "
                             f"shape (plan() or a small run tells it)")
        self.array = array

    @staticmethod
    def into(out, outputs, spec):
        """``TileRunner.forward``'s ``allocate``: (map ``k``, shape) -> an :class:`ArrayOutput`
        of the array ``out`` holds for that map (``out``: one array, or the output's structure
        ``spec`` of arrays; ``outputs``: ``tiling.Outputs``), checked against the shape."""
        leaves, got = tree_flatten(out)
        if got != spec:
            raise ValueError(f"out is structured as {got}, the streamed output as {spec}: pass "
                             f"one array per output map, in the output's structure")
        for array in leaves:
            if not all(hasattr(array, a) for a in ("shape", "__getitem__", "__setitem__")):
                raise TypeError(f"out must be an array with .shape and numpy-style slice "
                                f"assignment (numpy, numpy.memmap, zarr), got "
                                f"{type(array).__name__}")
        per_map = []
        for m in outputs.maps:
            arrays = [a for a, s in zip(leaves, outputs.steps) if s == m]
            if any(a is not arrays[0] for a in arrays):
                raise ValueError("out holds different arrays where the module returns one map "
                                 "twice: pass the same array at each place")
            per_map.append(arrays[0])
        return lambda k, shape: ArrayOutput(per_map[k], shape)

    def __setitem__(self, box: tuple, value: torch.Tensor) -> None:
        if isinstance(self.array, torch.Tensor):
            self.array[box] = value
            return
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # (numpy has no bfloat16)
            value = value.float()
        self.array[box] = value.numpy()

    def __getitem__(self, box: tuple) -> torch.Tensor:
        """What was written at ``box`` (an identical tile's output is copied from there)."""
        part = self.array[box]
        return part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))
