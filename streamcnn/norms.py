"""Normalisations whose statistics span the feature map, streamed exactly.

BatchNorm in training mode normalises each channel by the mean and variance of its input
over the batch and every position; GroupNorm and InstanceNorm by those of each sample's
group of channels, or each channel, over every position. A tile holds only some positions,
so streamcnn computes the statistics first, by streamed passes (``streamcnn.passes``), and
then runs every tile with each normalisation normalising by the whole image's statistics:
pointwise, as frozen BatchNorm is. The backward needs the whole map too. With
``x̂ = (x - mean) · rstd`` and ``h = dL/dx̂`` (the output gradient times the affine weight),
the input gradient of each statistic group ``S`` of ``n`` values is

    dx = rstd · (h - sum_S(h) / n - x̂ · sum_S(h · x̂) / n)                     (N1)

whose sums run over the whole map. A tile's backward gives only its part of ``h`` (the
part that flows from the outputs it owns), and the parts add up to ``h``: so the sums are
collected by streamed backward passes, from the deepest normalisation to the first (each
pass with the deeper ones' terms already known), each tile adding its part over all its
positions (its part is zero where its values are not valid). In the final backward every
tile then adds the two whole-map terms once, at the positions it owns of each
normalisation's input (:class:`Normalise`). The affine weight and bias gradients have no
whole-map term: their per-tile parts add up as any parameter's do.

This module holds what one tile needs: the torch-function mode that replaces every
normalisation call of a tile (:class:`NormMode`), the autograd step with the correction
(:class:`Normalise`), the statistic groups of each kind, and the running statistics'
update, once per forward, as torch's training mode makes it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import reductions, rules
from .binding import bind_call
from .errors import StreamingError, internal_assert
from .moments import ChannelStats

_FUNCTIONS = {F.batch_norm: "batch", F.group_norm: "group", F.instance_norm: "instance"}
#: files whose frames lie between a normalisation's caller and :class:`NormMode`
_DISPATCH_FILES = frozenset({F.__file__, torch.overrides.__file__, __file__})


@dataclass(frozen=True)
class NormNode:
    """A normalisation of the traced graph streamed with whole-image statistics."""

    name: str  # its fx node
    step: int
    norm: rules.Norm
    module: nn.Module | None  # the layer (None: a functional call)

    @property
    def updates_running(self) -> bool:
        return self.norm.training and self.module is not None and getattr(
            self.module, "running_mean", None) is not None


def norm_calls(graph) -> list:
    """Every normalisation call of a tile, in order: a :class:`NormNode`, or None for one with
    frozen statistics (or not needed), which runs as it is."""
    calls = []
    for node, step, _ in graph.norm_nodes():
        if step is None:
            calls.append(None)
            continue
        module = graph.root.get_submodule(node.target) if node.op == "call_module" else None
        calls.append(NormNode(node.name, step, graph.steps[step].norm, module))
    return calls


def levels(graph, nodes: list[NormNode]) -> dict[str, int]:
    """node name -> 1 + the deepest level of the normalisations it depends on."""
    by_step = {n.step: n for n in nodes}
    depth = [0] * len(graph.steps)
    for i, step in enumerate(graph.steps):
        above = max((depth[j] for j in step.inputs), default=0)
        depth[i] = above + 1 if i in by_step else above
    return {n.name: depth[n.step] for n in nodes}


# ------------------------------------------------------------------ statistic groups

def statistic_groups(x: torch.Tensor, norm: rules.Norm) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` (N, C, *spatial), perhaps reshaped, and the dimensions to reduce so that what is
    left is one value per statistic group: per channel for BatchNorm, per sample and group
    for GroupNorm, per sample and channel for InstanceNorm."""
    if norm.kind == "batch":
        return x, (0,) + tuple(range(2, x.dim()))
    if norm.kind == "group":
        return x.reshape(x.shape[0], norm.groups, -1), (2,)
    return x, tuple(range(2, x.dim()))


def group_sums(x: torch.Tensor, norm: rules.Norm) -> torch.Tensor:
    """The sum of ``x`` over each statistic group, one value per group."""
    values, dims = statistic_groups(x, norm)
    return values.sum(dims).reshape(-1)


def per_channel(values: torch.Tensor, norm: rules.Norm, n: int, c: int) -> torch.Tensor:
    """One value per statistic group -> (1 or N, C): what broadcasts against (N, C, ...)."""
    if norm.kind == "batch":
        return values.reshape(1, c)
    if norm.kind == "group":
        return values.reshape(n, norm.groups).repeat_interleave(c // norm.groups, dim=1)
    return values.reshape(n, c)


def _spread(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (ndim - 2))


@dataclass
class Terms:
    """The whole-map sums of (N1) for one normalisation, float64: ``sum_S(h)`` and
    ``sum_S(h · x̂)`` per statistic group."""

    h: torch.Tensor | None = None
    hx: torch.Tensor | None = None

    def add(self, h: torch.Tensor, hx: torch.Tensor) -> None:
        h, hx = h.double(), hx.double()
        self.h = h if self.h is None else self.h + h
        self.hx = hx if self.hx is None else self.hx + hx


# ------------------------------------------------------------------ the autograd step

class Normalise(torch.autograd.Function):
    """``y = (x - mean) · rstd · weight + bias`` with ``mean``/``rstd`` the whole image's
    (constants, broadcast as (1 or N, C, 1, ...)); the backward is (N1): ``h · rstd`` from
    this tile, minus the whole-map terms at the positions ``crop`` this tile owns."""

    @staticmethod
    def forward(ctx, x, mean, rstd, weight, bias, tile):
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.tile = tile
        return _normalised(x, mean, rstd, weight, bias, tile.batch)

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight = ctx.saved_tensors
        tile = ctx.tile
        fused = _fused_backward(ctx, g, x, mean, rstd, weight)
        if fused is not None:
            return fused
        xhat = (x - mean) * rstd
        reduce = [0] + list(range(2, x.dim()))
        grad_w = (g * xhat).sum(reduce) if ctx.needs_input_grad[3] else None
        grad_b = g.sum(reduce) if ctx.needs_input_grad[4] else None
        if not ctx.needs_input_grad[0]:
            return None, None, None, grad_w, grad_b, None
        h = g if weight is None else g * _spread(weight.view(1, -1), x.dim())
        dx = h * rstd
        if tile.correction is not None and tile.crop is not None:
            a, b = tile.terms(x.dtype, x.dim())
            dx[tile.crop] -= rstd * (a + xhat[tile.crop] * b)
        return dx, None, None, grad_w, grad_b, None


def fusable(g, x, mean, weight) -> bool:
    """Whether torch's fused batch-norm backward takes these: it wants one dtype (not the
    mix autocast makes)."""
    return x.dtype == g.dtype == mean.dtype and (weight is None or weight.dtype == x.dtype)


def _fused_backward(ctx, g, x, mean, rstd, weight):
    """:meth:`Normalise.backward` per channel (BatchNorm) by torch's fused eval-mode kernel
    (``g · weight · rstd``, ``sum(g · x̂)``, ``sum(g)`` in one pass over the map), plus the
    correction at the owned positions; None where dtypes differ (autocast), as the kernel
    wants one."""
    tile = ctx.tile
    if tile.batch is None or not fusable(g, x, mean, weight):
        return None
    mean_c, var_c, eps = tile.batch
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
    if not any(mask):
        return None, None, None, None, None, None
    dx, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
        g, x, weight, mean_c, var_c, None, None, False, eps, mask)
    if dx is not None and tile.correction is not None and tile.crop is not None:
        a, b = tile.terms(x.dtype, x.dim())
        dx[tile.crop] -= rstd * (a + (x[tile.crop] - mean) * rstd * b)
    return dx, None, None, grad_w, grad_b, None


def _normalised(x, mean, rstd, weight, bias, batch=None):
    """``(x - mean) · rstd · weight + bias``; per-channel statistics (``batch``: the mean and
    variance per channel, and eps) through torch's fused kernel, which keeps x's layout."""
    if batch is not None:
        mean_c, var_c, eps = batch
        return F.batch_norm(x, mean_c, var_c, weight, bias, False, 0.0, eps)
    return _affine((x - mean) * rstd, weight, bias)


def _affine(xhat, weight, bias):
    if weight is not None:
        xhat = xhat * _spread(weight.view(1, -1), xhat.dim())
    if bias is not None:
        xhat = xhat + _spread(bias.view(1, -1), xhat.dim())
    return xhat


@dataclass
class _Tile:
    """What one normalisation's autograd step needs of the tile it runs in."""

    crop: tuple | None  # this tile's owned part of the normalisation's input (an index)
    correction: tuple | None  # (sum_S(h) / n, sum_S(h · x̂) / n), per channel, or None
    batch: tuple | None = None  # per-channel (mean, var, eps), for torch's fused kernel
    #: the tiles whose correction this tile's backward adds (:mod:`streamcnn.dedup`: identical
    #: tiles recomputed once, owning the same positions; read when the backward runs); None:
    #: this tile alone
    members: list | None = None

    def terms(self, dtype, ndim: int) -> tuple:
        """The correction ``(a, b)`` broadcast over ``ndim`` dimensions in ``dtype``, once for
        each tile this one stands for (float64 products: the same as adding it per tile, to
        rounding)."""
        n = len(self.members) if self.members else 1
        return tuple(_spread((t * n if n > 1 else t).to(dtype), ndim) for t in self.correction)


# ------------------------------------------------------------------ a tile's mode

@dataclass
class NormState:
    """Everything the normalisations of one input know: statistics found so far, the
    whole-map terms of (N1) found so far, and each tile's owned part of each input map."""

    calls: list
    funcs: list = field(default_factory=list)  # the function a tile calls for each of calls
    stats: dict = field(default_factory=dict)  # node name -> ChannelStats of its input (Reduced)
    terms: dict = field(default_factory=dict)  # node name -> (a, b) broadcast per channel (G)
    crops: dict = field(default_factory=dict)  # node name -> {tile index: index of its owned part}

    @classmethod
    def of(cls, graph) -> "NormState":
        """The whole-map steps of ``graph`` (normalisations over space and global steps)."""
        return cls(norm_calls(graph), [f for _, _, f in graph.norm_nodes()])

    @property
    def nodes(self) -> list[NormNode]:
        return [c for c in self.calls if c is not None]


class NormMode(TorchFunctionMode):
    """Replaces the normalisation calls of one tile: one with known statistics normalises by
    them (with grad: through :class:`Normalise`); ``record`` sees a probed one's input;
    ``leaves`` collects, per probed node, each output it made a leaf that requires grad (a
    backward pass reads their gradients, which add up); the rest pass their input on (not
    needed).

    The mode holds while the tile's module code runs anywhere: its forward, and its backward,
    where ``torch.utils.checkpoint`` inside the module runs parts of it again. In the forward
    the calls come in graph order and are numbered; each call's site (:func:`call_site`) is
    noted. After :meth:`replaying`, a call is a recomputation of one the forward made, and
    its site says which (a site that made calls of different normalisations, a layer used
    twice or a loop, is refused there: its statistics cannot be told apart)."""

    def __init__(self, state: NormState, tile_index, *, probes=(), record=None, leaves=None,
                 order=None):
        super().__init__()
        self.order = order  # which of state.calls a run from a checkpoint makes, in order
        self.state, self.index = state, tile_index
        self.probes, self.record, self.leaves = set(probes), record, leaves
        self.k = 0
        self.sites: dict = {}  # call site -> the node of every call the forward made there
        self.replay = False
        self.replayed: dict = {}  # node -> how often a recomputation ran it
        self.intercepted = frozenset(state.funcs)  # (with global steps: reductions too)
        self.members = [tile_index]  # whose whole-map corrections a backward adds (stand_for)

    def stand_for(self, indices) -> None:
        """The backward calls from now on stand for the tiles ``indices`` (identical tiles,
        :mod:`streamcnn.dedup`): each whole-map correction is added once for each. The
        tile's autograd steps hold this list and read it when they run."""
        self.members[:] = indices

    def replaying(self) -> None:
        """The tile's forward is done: calls from now on recompute ones it made."""
        self.replay = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _FUNCTIONS and func not in self.intercepted:
            return func(*args, **kwargs)
        node = self._node(call_site(), func)
        if node is None:
            return func(*args, **kwargs)
        if isinstance(node.norm, rules.Global):
            return self._global(node, func, args, kwargs)
        _, bound = bind_call(func, args, kwargs, lambda v: isinstance(v, torch.Tensor))
        x = bound["input"]
        if node.name in self.probes and self.record is not None:
            self.record(node, x)
        stats = self.state.stats.get(node.name)
        if stats is None:
            return x
        weight, bias = bound.get("weight"), bound.get("bias")
        dtype = statistics_dtype(x, weight)
        n, c = x.shape[:2]
        mean = _spread(per_channel(stats.mean, node.norm, n, c).to(dtype), x.dim())
        rstd = _spread(per_channel((stats.var + node.norm.eps).rsqrt(), node.norm, n, c).to(dtype),
                       x.dim())
        batch = ((stats.mean.to(dtype), stats.var.to(dtype), node.norm.eps)
                 if node.norm.kind == "batch" else None)
        if self.leaves is not None and node.name in self.probes:
            with torch.no_grad():
                leaf = _normalised(x, mean, rstd, weight, bias, batch).requires_grad_()
            self.leaves.setdefault(node.name, []).append((leaf, x, mean, rstd, weight))
            return leaf.clone()  # (a non-leaf: an in-place layer after it may write into it)
        if not torch.is_grad_enabled():
            return _normalised(x, mean, rstd, weight, bias, batch)
        crops = self.state.crops.get(node.name)
        tile = _Tile(crops[self.index] if crops is not None else None,
                     self.state.terms.get(node.name), batch, self.members)
        return Normalise.apply(x, mean, rstd, weight, bias, tile)

    def _global(self, node, func, args, kwargs):
        """A reduction over every position (a global step): the whole map's value (with grad:
        through :class:`reductions.Reduce`); ``record`` sees a probed one's input; a backward
        pass makes a probed one's value a leaf; not yet known: the tile's own (not needed)."""
        g = node.norm
        x = reductions.reduced_input(g, args, kwargs)
        if node.name in self.probes and self.record is not None:
            self.record(node, x)
        reduced = self.state.stats.get(node.name)
        if reduced is None:
            return func(*args, **kwargs)
        value = reductions.value_of(reduced, g, x)
        after = reductions.after(g, x)  # (a softmax's exp(x - R))
        if g.indices:  # (values and the tile's indices, which the trace lets nothing use)
            with torch.no_grad():
                own = func(*args, **kwargs)
            wrap = lambda v: type(own)((v, own.indices))  # noqa: E731
        else:
            wrap = lambda v: v  # noqa: E731
        if self.leaves is not None and node.name in self.probes:
            leaf = value.detach().requires_grad_()
            self.leaves.setdefault(node.name, []).append((leaf, x, None, None, None))
            return wrap(after(leaf.clone()))
        if not torch.is_grad_enabled() or not x.requires_grad:
            return wrap(after(value))
        crops = self.state.crops.get(node.name)
        tile = reductions.TileGrad(crops[self.index] if crops is not None else None,
                                   self.state.terms.get(node.name), reduced, self.index,
                                   self.members)
        return wrap(after(reductions.Reduce.apply(x, value, tile, g)))

    def _node(self, site, func=None):
        """The :class:`NormNode` (or None: runs as it is) a call at ``site`` belongs to."""
        if not self.replay:
            order = self.order if self.order is not None else range(len(self.state.calls))
            internal_assert(self.k < len(order), "more normalisation calls than traced nodes")
            k = order[self.k]
            node = self.state.calls[k]
            if self.state.funcs and func is not None and self.state.funcs[k] is not func:
                raise StreamingError(
                    f"a tile called {getattr(func, '__name__', func)} where the traced graph "
                    f"calls {getattr(self.state.funcs[k], '__name__', '?')}: the module "
                    f"makes a normalisation or reduction call outside the code torch.fx traced "
                    f"(a hook, or a value computed in Python), so streaming cannot tell which "
                    f"whole-map step each call is; move that call out of the streamed module")
            self.k += 1
            self.sites.setdefault(site, []).append(node)
            return node
        made = self.sites.get(site)
        internal_assert(made is not None, "a normalisation recomputed that the forward did not call")
        if any(n is not made[0] for n in made):
            raise StreamingError(
                f"a normalisation ({', '.join(sorted({n.name for n in made if n is not None}))}) is "
                f"run again inside the backward (by torch.utils.checkpoint) from a place that "
                f"called several normalisations in the forward (a layer used twice, or a loop): "
                f"streaming cannot tell which statistics the recomputation needs; use one layer "
                f"per call, or keep that part out of the checkpoint")
        if made[0] is not None:
            self.replayed[made[0]] = self.replayed.get(made[0], 0) + 1
        return made[0]


def call_site(skip=1) -> tuple:
    """Where a normalisation call is made: the code, line and ``self`` of the first frame
    outside torch's functional layer and this module (for a layer, its own ``forward``).
    A recomputation (by ``torch.utils.checkpoint``) calls from the same place."""
    frame = sys._getframe(skip)
    while frame is not None and frame.f_code.co_filename in _DISPATCH_FILES:
        frame = frame.f_back
    if frame is None:
        return (None, None, None)
    return frame.f_code, frame.f_lineno, id(frame.f_locals.get("self"))


def statistics_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The dtype a tile normalises with: the affine weight's, as torch's kernels keep
    statistics with float32 parameters under bfloat16/float16 autocast; else the input's."""
    return weight.dtype if weight is not None and weight.is_floating_point() else x.dtype


@contextlib.contextmanager
def frozen_modules(nodes: list[NormNode]):
    """While a tile runs, its normalisation layers are in eval mode: they then neither count
    the call nor update running statistics (streaming does both once per forward), and the
    mode supplies the statistics."""
    modules = [(n.module, n.module.training) for n in nodes if n.module is not None]
    for m, _ in modules:
        m.training = False
    try:
        yield
    finally:
        for m, training in modules:
            m.training = training


def check_values(node: NormNode, stats: ChannelStats, layer: str) -> None:
    """Raise torch's own ValueError where a normalisation by its input's statistics would:
    BatchNorm with one value per channel over the whole batch and map, InstanceNorm with one
    position. (A tile's call never sees it: the mode replaces the call before torch checks
    the size.)"""
    if stats.count > 1 or node.norm.kind == "group":  # (torch checks no size for GroupNorm)
        return
    what = "value per channel" if node.norm.kind == "batch" else "spatial element"
    raise ValueError(f"Expected more than 1 {what} when training, got {stats.count} in the whole "
                     f"feature map that {layer} normalises (torch raises this for the same "
                     f"input without streaming)")


def counters(nodes: list[NormNode]) -> frozenset:
    """Ids of the running statistics streaming updates itself (not checked per tile)."""
    found = set()
    for n in nodes:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(n.module, name, None) if n.module is not None else None
            if isinstance(t, torch.Tensor):
                found.add(id(t))
    return frozenset(found)


# ------------------------------------------------------------------ running statistics

def update_replayed(replayed: dict, state: "NormState") -> None:
    """The running statistics of each normalisation a ``torch.utils.checkpoint`` inside the
    module ran again in a tile's backward (``NormMode.replayed``: node -> times), updated as
    many times: conventionally each recomputation updates them once more."""
    for node, times in replayed.items():
        for _ in range(times):
            update_running([node], state.stats)


def update_running(nodes: list[NormNode], stats: dict) -> None:
    """Each layer's running statistics updated once, as one training-mode forward updates
    them: BatchNorm with its momentum (``None``: the cumulative average) and the unbiased
    variance; InstanceNorm with the batch average of each instance's statistics."""
    with torch.no_grad():
        for node in nodes:
            if not node.updates_running:
                continue
            m, s = node.module, stats[node.name]
            mean, var = s.mean, s.unbiased_var
            if node.norm.kind == "instance":
                c = m.running_mean.numel()
                mean, var = mean.reshape(-1, c).mean(0), var.reshape(-1, c).mean(0)
                factor = m.momentum if m.momentum is not None else 0.0
            else:
                m.num_batches_tracked.add_(1)
                factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean) * factor)
            m.running_var.mul_(1 - factor).add_(var.to(m.running_var) * factor)


def correction_terms(node: NormNode, terms: Terms, stats: ChannelStats, n: int, c: int) -> tuple:
    """(sum_S(h) / n, sum_S(h · x̂) / n) per channel, broadcastable, from a backward pass."""
    count = stats.count
    return (per_channel(terms.h / count, node.norm, n, c), per_channel(terms.hx / count, node.norm, n, c))
