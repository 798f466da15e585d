"""Which torch operations stream, and how each acts on a tile's geometry.

The trace (``streamcnn.trace``) walks the streamed module's torch.fx graph and
asks this registry what each operation on a feature map does:

* a *window* (convolution, pooling, zero padding) - :class:`geometry.Window`
  per spatial axis;
* *pointwise* in space (activations, eval BatchNorm, Dropout in eval mode,
  LayerNorm / Linear / softmax over the channel dimension, arithmetic with
  scalars or per-channel tensors, permutes, channel slices, reductions over
  channels or the batch);
* a *merge* of feature maps on the same grid (add, sub, mul, div, max of two feature
  maps; an elementwise operation with a feature map as another argument, such as
  ``clamp(x, min=a)``; ``torch.cat`` / chunk / split along channels; ``torch.stack``
  along a new dimension of groups);
* a *refusal*: everything whose output at one position depends on positions a
  tile does not hold (global or adaptive pooling, normalisation over space,
  reshapes that mix space into channels, upsampling, attention, indexing of
  positions, the spatial size itself), or that draws random numbers (a new draw
  per tile and again in the backward recomputation).

Layouts. A feature map's ``dims`` give each tensor dimension's role: ``"N"``
(batch), ``"C"`` (channels) or a spatial axis ``0``/``1``. The input is
``("N", "C", 0, 1)``; ``permute(0, 2, 3, 1)`` makes it ``("N", 0, 1, "C")``, after
which LayerNorm and Linear act on channels, as in ConvNeXt. Windows, and operations
that act on dimension 1 as the channels (BatchNorm, local response norm, PReLU),
need the channels-first layout. A dimension of groups (:func:`group_role`: ResNeSt's
``x.reshape((B, r, RC // r, H, W))``, ``torch.stack(branches, dim=1)``) is neither: a
tile holds all of it. A sequence of positions (:func:`positions_role`: ``x.flatten(2)``,
``x.reshape(B, C, H * W)``) holds the spatial axes flattened: pointwise operations and
global steps over all of it stream (global-context attention pooling).

Arguments. ``streamcnn.binding`` binds every call as torch does before a handler
sees it, so handlers take the tracing context ``ctx`` and then keyword arguments
under torch's parameter names (``input``, ``dim``, ``p``, ``other``, ``keepdim``),
defaults filled in. A handler's feature-map parameters are declared with
:func:`takes_maps` (``input`` alone unless it says otherwise): a feature map in any
other argument (a convolution's weight computed from the image, say) is refused by
the trace, so that no feature map an output depends on is left out of its step.
``ctx`` provides ``ndim``, ``name`` (the node, for messages),
``step(rule, inputs, dims, channels)`` (records a step, returns its feature map),
``refuse(why)`` and ``dtype``/``device``/``batch`` of the input.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .channels_last import onednn_mishandles
from .errors import StreamingError
from .geometry import Arithmetic, Length, Merge, Pointwise, SizedWindow, Transposed, Upsample, Window

MOVE = "move it after the Streaming module (into the part of the network that sees the whole feature map)"
ANY = "any"  # takes_maps(ANY): every argument may be a feature map


@dataclass(frozen=True)
class FMap:
    """A feature map: a value computed from the streamed input."""

    index: int  # its step in the traced graph
    dims: tuple  # role of each tensor dimension: "N", "C" or a spatial axis
    channels: int | None  # size of the "C" dimension (None: not known yet)
    source: str = "the input has"  # who gave it ``channels``, for messages

    def spatial(self) -> tuple:
        return tuple(d for d in self.dims if isinstance(d, int))


@dataclass(frozen=True)
class Shape:
    """``x.shape`` / ``x.size()`` of a feature map: its spatial entries differ per tile."""

    fmap: FMap


@dataclass(frozen=True)
class Refused:
    """A value streaming cannot compute exactly; raised only if the output depends on it."""

    error: StreamingError


class Unknown:
    """A value not known until the input is (batch or channel count before the first call)."""


@dataclass(frozen=True)
class SpatialSize(Refused):
    """A feature map's size along spatial axis ``axis``: it differs from tile to tile, so it
    is refused (``error``) wherever it is used as a number, and streams only where it makes
    one map the size of another (``F.interpolate(x, size=y.shape[-2:])``: handlers marked
    :func:`takes_sizes`)."""

    fmap: FMap = None
    axis: int = 0


@dataclass(frozen=True)
class Norm:
    """A normalisation whose statistics span the feature map: BatchNorm in training mode or
    without running statistics (per channel, over the batch and space), GroupNorm (per
    sample and group of channels, over space), InstanceNorm using its input's statistics
    (per sample and channel, over space). Pointwise once the statistics of its input are
    known, which the caller streams for it."""

    kind: str  # "batch", "group" or "instance"
    eps: float
    momentum: float | None
    training: bool  # updates running statistics (it has them, and is in training mode)
    groups: int = 1  # GroupNorm's num_groups


@dataclass(frozen=True)
class Global:
    """A reduction of a feature map over all its spatial positions (a global step:
    squeeze-and-excitation's pooling, GRN's norm), one value per sample and channel, which
    the caller streams (``streamcnn.reductions``). ``kind``: "mean", "sum", "amax"/"amin"
    (torch shares the gradient evenly among tied extremes), "max"/"min" (adaptive max
    pooling and ``max(dim)``: the gradient goes to the first extreme in row-major order), or
    "norm" (the L2 norm). ``dims``: the reduced dimensions of its input (its spatial ones);
    ``keepdim``: whether the result keeps them (as size 1); ``indices``: the call also
    returns indices (``torch.max(x, dim)``), which only a tile computes."""

    kind: str
    dims: tuple
    keepdim: bool = True
    indices: bool = False
    training = False  # (updates no running statistics)


@dataclass(frozen=True)
class Pooled:
    """A value computed from whole-map reductions (:class:`Global`) and constants only: one
    value per sample and channel, the same for every tile, so that any deterministic
    operation on it streams. ``value``: a tensor of its shape and dtype (zeros; None before
    the input's batch and channels are known); ``steps``: the global steps it depends on."""

    value: torch.Tensor | None
    steps: tuple  # FMaps of Global steps


class UnknownNumber(Unknown):
    """A batch or channel count not known until the input is, or number arithmetic on it
    (``x.size(1) ** -0.5``): one number, the same at every position."""


_NUMBER_OPS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv,
                         operator.floordiv, operator.pow, operator.neg, operator.pos})


def unknown(op: str, target, args, kwargs) -> Unknown:
    """The value of a call on values not known yet: a number where it is arithmetic on numbers."""
    numbers = all(isinstance(a, (UnknownNumber, int, float)) for a in args)
    if op == "call_function" and target in _NUMBER_OPS and numbers and not kwargs:
        return UnknownNumber()
    return Unknown()


def contains(value, kinds) -> bool:
    """Whether ``value``, or anything in the tuples, lists, dicts and slices it holds, is
    an instance of ``kinds``."""
    if isinstance(value, kinds):
        return True
    if isinstance(value, (tuple, list)):
        return any(contains(v, kinds) for v in value)
    if isinstance(value, dict):
        return any(contains(v, kinds) for v in value.values())
    if isinstance(value, slice):
        return any(contains(v, kinds) for v in (value.start, value.stop, value.step))
    return False


def is_dynamic(value) -> bool:
    """Whether ``value`` (or anything inside it) depends on the streamed input."""
    return contains(value, (FMap, Shape, Refused, Unknown, Pooled))


def first_refused(value, skip=()):
    """The first :class:`Refused` in ``value`` (or in what it holds) that is not a ``skip``."""
    if isinstance(value, Refused) and not isinstance(value, skip):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return next((r for r in (first_refused(v, skip) for v in items) if r is not None), None)


def takes_maps(*names):
    """Declare which parameters of a handler may hold feature maps (``ANY``: all)."""
    def mark(handler):
        handler.map_params = names
        return handler
    return mark


@dataclass(frozen=True)
class SizeExpr(Refused):
    """Integer arithmetic on spatial sizes (``(x.size(2) - y.size(2)) // 2``): refused
    (``error``: its first size read's) wherever it is used as a number; a crop or padding
    by it streams (:func:`_sized_windows`)."""

    op: str = ""
    left: object = None
    right: object = None


_SIZE_OPS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//"}


def size_arithmetic(target, args: tuple, kwargs: dict):
    """``target(*args)`` as a :class:`SizeExpr` where it is arithmetic on sizes and ints;
    None for any other call."""
    sizes = (SpatialSize, SizeExpr)
    if target not in _SIZE_OPS or len(args) != 2 or kwargs or not contains(args, sizes):
        return None
    if not all(isinstance(a, sizes) or (isinstance(a, int) and not isinstance(a, bool)) for a in args):
        return None
    return SizeExpr(first_refused(args).error, _SIZE_OPS[target], *args)


def takes_sizes(handler):
    """Declare that a handler takes :class:`SpatialSize` values in its arguments (and checks
    them itself): the trace does not refuse the call for holding them."""
    handler.takes_sizes = True
    return handler


def map_params(handler) -> tuple:
    """The parameters of ``handler`` that may hold feature maps (default: ``input``)."""
    return getattr(handler, "map_params", ("input",))


def standard_dims(ndim: int) -> tuple:
    """The channels-first layout ``("N", "C", 0, ..., ndim - 1)``."""
    return ("N", "C") + tuple(range(ndim))


def _per_axis(v, ndim: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * ndim


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def layout(x: FMap) -> str:
    names = {"N": "N", "C": "C", 0: "H" if len(x.spatial()) == 2 else "L", 1: "W"}
    return "(" + ", ".join("G" if is_group(d) else "P" if is_positions(d) else names[d]
                           for d in x.dims) + ")"


def group_role(size: int | None) -> tuple:
    """The role of a dimension that splits the channels into groups (ResNeSt's radix, the
    branches ``torch.stack`` puts side by side in a selective kernel): ``("G", size)``, the
    size None while the channels are not known. It is neither spatial nor the channels: a
    tile holds all of it, and operations over it (a sum over the branches) are pointwise."""
    return ("G", size)


def is_group(role) -> bool:
    return isinstance(role, tuple) and role[:1] == ("G",)


def positions_role(k: int) -> tuple:
    """The role of a dimension that holds the ``k`` spatial axes flattened in row-major
    order (``x.flatten(2)``, ``x.reshape(B, C, H * W)``): a sequence of positions. A tile's
    sequence is its own positions, not a piece of the image's, so only what treats the
    positions alike streams: pointwise operations, and reductions over all of them (global
    steps: a mean, a softmax over the positions, the matrix product that sums over them)."""
    return ("P", k)


def is_positions(role) -> bool:
    return isinstance(role, tuple) and role[:1] == ("P",)


def is_space(role) -> bool:
    """A spatial axis, or the spatial axes flattened."""
    return isinstance(role, int) or is_positions(role)


def all_positions(dims: tuple, d: int) -> bool:
    """Whether dimension ``d`` holds every position of the map: the spatial axes flattened,
    or the one spatial axis of a 1-d map."""
    return is_positions(dims[d]) or (isinstance(dims[d], int) and sum(map(is_space, dims)) == 1)


def _need_channels(ctx, x: FMap, expect: int, what: str = "channels") -> None:
    if x.channels is not None and expect != x.channels:
        raise ValueError(f"{ctx.name} expects {expect} {what} but {x.source} {x.channels}")


def _pointwise(ctx, x: FMap, dims=None, channels=-1) -> FMap:
    return ctx.step(Pointwise(), [x], x.dims if dims is None else dims,
                    x.channels if channels == -1 else channels,
                    x.source if channels == -1 else f"{ctx.name} gives")


def _channels_first(ctx, x: FMap, what: str):
    """Refusal unless dimension 1 of ``x`` is its channels (ops that act on dimension 1)."""
    if len(x.dims) < 2 or x.dims[1] != "C":
        return ctx.refuse(f"{what} dimension 1 as the channels, but in layout {layout(x)} "
                          f"dimension 1 is not the channels: it would mix spatial positions")
    return None


# --------------------------------------------------------------------------- windows

def _window_input(ctx, x: FMap, rank: int, what: str):
    if len(x.spatial()) != rank:
        raise StreamingError(
            f"{ctx.name} works on {rank}-d feature maps but the input is {len(x.spatial())}-d; "
            f"use {len(x.spatial())}-d layers throughout the streamed module")
    if x.dims != standard_dims(rank):
        return ctx.refuse(f"it applies a {what} to a feature map in layout {layout(x)}; "
                          f"windows need the channels-first layout (N, C, *spatial)")
    return None


def _windows(rank, kernel, stride, pads, dilation=1, ceil_mode=False, max_pool=False):
    kernel, stride, dilation = (_per_axis(v, rank) for v in (kernel, stride, dilation))
    return tuple(Window(kernel=kernel[a], stride=stride[a], pad_left=pads[a][0],
                        pad_right=pads[a][1], dilation=dilation[a], ceil_mode=bool(ceil_mode),
                        max_pool=max_pool) for a in range(rank))


def _conv_pads(padding, kernel, dilation, rank):
    """Per-axis (left, right) padding of a convolution, as torch applies it ('same' included)."""
    if padding == "valid":
        return ((0, 0),) * rank
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(_per_axis(kernel, rank), _per_axis(dilation, rank))]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in _per_axis(padding, rank))


def conv(ctx, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, rank):
    problem = _window_input(ctx, input, rank, "convolution")
    if problem is not None:
        return problem
    _need_channels(ctx, input, weight.shape[1] * groups)
    kernel = tuple(weight.shape[2:])
    rules = _windows(rank, kernel, stride, _conv_pads(padding, kernel, dilation, rank),
                     dilation)
    # nn.Conv2d layers are found by walking the module; a functional call only here
    unsafe = rank == 2 and onednn_mishandles(kernel, _per_axis(stride, rank), weight.shape[1])
    return ctx.step(rules, [input], input.dims, weight.shape[0], f"{ctx.name} gives",
                    channels_last_unsafe=unsafe)


def conv_module(ctx, m, input, *, rank):
    if m.padding_mode != "zeros":
        return ctx.refuse(
            f"it uses padding_mode='{m.padding_mode}'; only 'zeros' is streamed exactly",
            fix="use padding_mode='zeros' or move it after the Streaming module")
    problem = _window_input(ctx, input, rank, "convolution")
    if problem is not None:
        return problem
    _need_channels(ctx, input, m.in_channels)
    # torch stores the actual (possibly asymmetric) padding here, last axis first
    rev = m._reversed_padding_repeated_twice
    pads = tuple((rev[2 * (rank - 1 - a)], rev[2 * (rank - 1 - a) + 1]) for a in range(rank))
    rules = _windows(rank, m.kernel_size, m.stride, pads, m.dilation)
    return ctx.step(rules, [input], input.dims, m.out_channels, f"{ctx.name} gives")


def max_pool(ctx, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=False, *, rank):
    if return_indices:
        return ctx.refuse("it has return_indices=True: its second output (indices into the whole "
                          "feature map) cannot be stitched from tiles",
                          fix="use return_indices=False")
    return _pool(ctx, input, rank, "max-pool", kernel_size, stride, padding, dilation, ceil_mode,
                 max_pool=True)


def _with_indices(rank: int):
    """``F.max_pool2d(..., return_indices=True)``, which fx records as the function it
    dispatches to, ``max_pool2d_with_indices`` (whose own default says False)."""
    def pool(ctx, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=True):
        return max_pool(ctx, input, kernel_size, stride, padding, dilation, ceil_mode, True,
                        rank=rank)
    return pool


def avg_pool(ctx, input, kernel_size, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None, *, rank):
    return _pool(ctx, input, rank, "average pool", kernel_size, stride, padding, 1, ceil_mode)


def _pool(ctx, input, rank, what, kernel_size, stride, padding, dilation, ceil_mode,
          max_pool=False):
    problem = _window_input(ctx, input, rank, what)
    if problem is not None:
        return problem
    stride = kernel_size if stride is None or stride == [] else stride
    pads = tuple((p, p) for p in _per_axis(padding, rank))
    rules = _windows(rank, kernel_size, stride, pads, dilation, ceil_mode, max_pool=max_pool)
    return ctx.step(rules, [input], input.dims, input.channels, input.source)


@takes_sizes
def pad(ctx, input, pad, mode="constant", value=None):
    """Constant padding is a 1-tap window with padding: zeros at interior tile sides
    only reach outputs that are cropped away, exactly as for a convolution's padding.
    Negative amounts crop; amounts computed from map sizes (milesial's U-Net pads the
    upsampled map to the skip's size) stream where they are the same for every length."""
    if mode != "constant":
        return ctx.refuse(f"it pads in mode '{mode}'", fix="use constant padding or " + MOVE)
    if len(pad) % 2:
        return ctx.refuse(f"it crops or pads unevenly specified sides ({pad})")
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]  # last dimension first
    sides = {}
    for k, pair in enumerate(pairs):
        role = input.dims[len(input.dims) - 1 - k]
        if pair == (0, 0):
            continue
        if not isinstance(role, int):
            return ctx.refuse(f"it pads the {'channel' if role == 'C' else 'batch'} dimension")
        sides[role] = pair
    return _sized_windows(ctx, input, sides, input.channels, input.source)


def _sized_windows(ctx, input: FMap, sides: dict, channels, source):
    """One step padding (negative: cropping) each spatial axis ``role`` of ``sides`` by its
    (left, right) amounts: ints, or sizes the module read (:class:`SpatialSize`,
    :class:`SizeExpr`), which become :class:`geometry.SizedWindow` s whose amounts the
    trace finds constant, or a refusal."""
    refs: list = []
    rules = [Pointwise()] * len(input.spatial())
    for role, pair in sides.items():
        exprs = tuple(_expression(v, input, role, refs) for v in pair)
        if None in exprs:
            return ctx.refuse("it pads or crops by sizes of other axes or of values that are not "
                              "feature maps")
        if all(isinstance(e, int) for e in exprs):
            rules[role] = Window(kernel=1, pad_left=exprs[0], pad_right=exprs[1])
            continue
        left = ctx.constant_size(exprs[0], [input] + refs, role)
        if left is None:
            return ctx.refuse("it pads or crops its start by an amount it computes from map sizes "
                              "that differs from one image size to another (a tile's would differ "
                              "from the whole map's)")
        right = ctx.constant_size(exprs[1], [input] + refs, role, first=True)
        rules[role] = SizedWindow(kernel=1, pad_left=left, pad_right=right, sizes=exprs)
    return ctx.step(tuple(rules), [input] + refs, input.dims, channels, source)


def _expression(value, x: FMap, axis: int, refs: list):
    """A size value as a ``geometry`` expression over the lengths along ``axis`` of ``x``
    (input 0) and of ``refs`` (appended to as sizes of other maps are met); None where a
    size is of another axis or of no feature map."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, SpatialSize):
        if value.fmap is None or value.axis != axis:
            return None
        if value.fmap.index == x.index:
            return Length(0)
        if value.fmap not in refs:
            refs.append(value.fmap)
        return Length(1 + refs.index(value.fmap))
    if isinstance(value, SizeExpr):
        left, right = (_expression(v, x, axis, refs) for v in (value.left, value.right))
        return None if left is None or right is None else Arithmetic(value.op, left, right)
    return None


# --------------------------------------------------------------------------- pointwise

@takes_maps(ANY)
def pointwise(ctx, *args, **kwargs):
    """An elementwise operation: every tensor argument is an operand, broadcast against the
    others. One feature map: pointwise; several (``clamp(x, min=a)``, ``where``): a merge."""
    values = list(args) + list(kwargs.values())
    maps = [v for v in values if isinstance(v, FMap)]
    pooled = [v for v in values if isinstance(v, Pooled)]
    if any(contains(v, (FMap, Pooled)) and not isinstance(v, (FMap, Pooled)) for v in values):
        return ctx.refuse("it takes feature maps inside a list or tuple argument")
    if not maps or any(contains(v, Shape) or (contains(v, Unknown) and
                                              not isinstance(v, UnknownNumber)) for v in values):
        return ctx.refuse("it uses the feature map's shape (or a size not known before the "
                          "input) as an operand")
    constants = [c.value if isinstance(c, Pooled) else c for c in values
                 if isinstance(c, torch.Tensor) or (isinstance(c, Pooled) and c.value is not None)]
    for c in constants:
        problem = _broadcastable(ctx, maps[0], c)
        if problem is not None:
            return problem
    # a one-channel map broadcast against per-channel constants has their channels
    widths = [_constant_channels(maps[0], c) for c in constants]
    channels = _broadcast_channels(ctx, maps, widths)
    if pooled:
        return _broadcast(ctx, maps, pooled, channels)
    if len(maps) == 1:
        return _pointwise(ctx, maps[0], channels=-1 if channels == maps[0].channels else channels)
    return merge(ctx, maps, channels=channels)


def _broadcast(ctx, maps, pooled, channels) -> FMap:
    """Feature maps combined elementwise with values reduced over the whole map: a merge
    whose inputs are the maps and the global steps those values come from (a tile uses
    the whole image's values; the merge is valid where the maps and the reductions' inputs
    are, as for any merge)."""
    longest = max(maps, key=lambda x: len(x.dims))
    if any(x.dims != longest.dims[len(longest.dims) - len(x.dims):] for x in maps):
        return ctx.refuse("it combines feature maps in different layouts "
                          + " and ".join(layout(x) for x in maps))
    steps = list({g.index: g for p in pooled for g in p.steps}.values())
    return ctx.step(Merge(), list(maps) + steps, longest.dims, channels, f"{ctx.name} gives")


@takes_maps("input", "other")
def expand_as(ctx, input, other):
    """``gate.expand_as(x)`` (ECA): a value reduced over the whole map broadcast to a map's
    shape streams as the broadcast it is; a feature map expanded is refused."""
    if isinstance(input, Pooled) and isinstance(other, FMap):
        if input.value is not None:
            problem = _broadcastable(ctx, other, input.value)
            if problem is not None:
                return problem
        return _broadcast(ctx, [other], [input], other.channels)
    return ctx.refuse("it expands a feature map to the shape of another value")


def _channel_dim_op(ctx, input, dim, what):
    if dim is None:
        return ctx.refuse(f"it applies {what} without a dim (over every dimension)")
    if not isinstance(dim, int) or input.dims[_dim(dim, len(input.dims))] != "C":
        return ctx.refuse(f"it applies {what} over a dimension that is not the channels")
    return None


def softmax_like(ctx, input, dim=None, *, kind="softmax", **_):
    """A softmax over the channels (pointwise in space), or over a sequence of positions
    (:func:`positions_role`): a global step, ``exp(x - R)`` (``x - R`` for log_softmax) with
    ``R`` the log-sum-exp of ``x`` over all positions, as global-context pooling's attention
    weights."""
    if isinstance(dim, int) and kind in ("softmax", "log_softmax") and \
            all_positions(input.dims, _dim(dim, len(input.dims))):
        if _.get("dtype") is not None:
            return ctx.refuse(f"it applies {kind} over the positions with a dtype argument",
                              fix="convert the map with .to(dtype) first")
        return ctx.step(Pointwise(), [input], input.dims, input.channels, input.source,
                        norm=Global(kind, (_dim(dim, len(input.dims)),)))
    return _channel_dim_op(ctx, input, dim, "softmax") or _pointwise(ctx, input)


def _softmax_of(kind: str):
    return lambda ctx, input, dim=None, **kw: softmax_like(ctx, input, dim, kind=kind, **kw)


@takes_maps("input", "other")
def matmul(ctx, input, other, *, out=None):
    """``x @ w`` with ``x`` (..., C, P) and ``w`` (..., P, K) sequences of positions of one
    grid (global context: ``x.reshape(B, C, H * W).unsqueeze(1) @ softmax(...).unsqueeze(3)``):
    a sum over all positions of ``x[..., :, p, None] * w[..., None, p, :]``, a global step
    whose value is the product (:class:`Pooled`). Products over other dimensions of maps are
    refused (attention between positions)."""
    if not (isinstance(input, FMap) and isinstance(other, FMap)):
        return ctx.refuse("it multiplies a feature map by a constant matrix (a feature map is no "
                          "matrix of a tile's own size)")
    a, b = input.dims, other.dims
    if len(a) < 2 or len(b) < 2 or len(a) != len(b) or not all_positions(a, -1) or b[-2] != a[-1] \
            or any(is_space(r) for r in a[:-1] + b[:-2] + b[-1:]):
        return ctx.refuse(ATTENTION + " (a matrix product of feature maps streams only where it "
                          "sums over all positions: x (..., C, H*W) @ w (..., H*W, K))")
    dims = a + (b[-1],)
    rank = len(dims)
    step = ctx.step(Merge(), [input, other], dims, input.channels, f"{ctx.name} gives",
                    norm=Global("matmul", (rank - 2,), keepdim=False))
    stand_ins = [_stand_in(ctx, x) for x in (input, other)]
    value = None if None in stand_ins else torch.matmul(*stand_ins)
    return Pooled(value, (step,))


def _stand_in(ctx, x: FMap) -> torch.Tensor | None:
    """Zeros of the shape of ``x`` with one position (None: a size not known yet)."""
    shape = [ctx.batch if r == "N" else x.channels if r == "C" else r[1] if is_group(r) else 1
             for r in x.dims]
    return None if None in shape else torch.zeros(shape, dtype=ctx.map_dtype, device=ctx.device or "cpu")


def normalize(ctx, input, p=2.0, dim=1, eps=1e-12, out=None):
    return _channel_dim_op(ctx, input, dim, "a p-norm normalisation") or _pointwise(ctx, input)


def glu(ctx, input, dim=-1):
    refused = _channel_dim_op(ctx, input, dim, "GLU")
    if refused:
        return refused
    half = None if input.channels is None else input.channels // 2
    return _pointwise(ctx, input, channels=half)


def local_response_norm(ctx, input, size, alpha=1e-4, beta=0.75, k=1.0):
    return _channels_first(ctx, input, "it sums a window along") or _pointwise(ctx, input)


def prelu(ctx, input, weight):
    if weight.numel() > 1:
        refused = _channels_first(ctx, input, "its per-channel slopes act on")
        if refused:
            return refused
        _need_channels(ctx, input, weight.numel())
    return _pointwise(ctx, input)


def dropout(ctx, input, p=0.5, training=True, inplace=False):
    if training and p > 0:
        return ctx.refuse(
            "it is in training mode: its random mask would be drawn anew for every tile and again "
            "in the backward recomputation", fix=f"call .eval() on it or {MOVE}")
    return _pointwise(ctx, input)


_FUNCTIONAL_RUNNING = ("it updates the running statistics it is given in training mode; streaming "
                       "updates those of BatchNorm and InstanceNorm layers (once per forward)")
_USE_A_LAYER = "use an nn.BatchNorm2d / nn.InstanceNorm2d layer, or pass running_mean=None"


def batch_norm(ctx, input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, layer=False):
    if training and running_mean is not None and not layer and ctx.spatial_norms:
        return ctx.refuse(_FUNCTIONAL_RUNNING, fix=_USE_A_LAYER)
    if (training or running_mean is None) and ctx.spatial_norms:
        if running_mean is not None:
            _need_channels(ctx, input, running_mean.numel())
        return _norm(ctx, input, Norm("batch", eps, momentum, training and running_mean is not None))
    if training or running_mean is None:
        why = ("it is in training mode: it would normalise each tile with that tile's own batch "
               "statistics, not the whole image's" if training else
               "it has track_running_stats=False, so even in eval mode it normalises with each "
               "tile's statistics")
        return ctx.refuse(why, fix=f"call .eval() on it (frozen statistics, as when fine-tuning) "
                                   f"after model.train(), or {MOVE}")
    refused = _channels_first(ctx, input, "it normalises")
    if refused:
        return refused
    _need_channels(ctx, input, running_mean.numel())
    return _pointwise(ctx, input)


def _norm(ctx, input, norm: Norm):
    """A normalisation over space, as a step the caller streams (``ctx.spatial_norms``)."""
    refused = _channels_first(ctx, input, "it normalises")
    if refused:
        return refused
    return ctx.step(Pointwise(), [input], input.dims, input.channels, input.source, norm=norm)


def group_norm(ctx, input, num_groups, weight=None, bias=None, eps=1e-5):
    if not ctx.spatial_norms:
        return ctx.refuse(NORM_OVER_SPACE)
    if input.channels is not None and input.channels % num_groups:
        raise ValueError(f"{ctx.name} splits {input.channels} channels into {num_groups} groups")
    return _norm(ctx, input, Norm("group", eps, None, False, num_groups))


def instance_norm(ctx, input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, layer=False):
    if not use_input_stats and running_mean is not None:  # eval with running statistics
        refused = _channels_first(ctx, input, "it normalises")
        return refused or _pointwise(ctx, input)
    if not ctx.spatial_norms:
        return ctx.refuse(NORM_OVER_SPACE)
    if running_mean is not None and not layer:
        return ctx.refuse(_FUNCTIONAL_RUNNING, fix=_USE_A_LAYER)
    return _norm(ctx, input, Norm("instance", eps, momentum, running_mean is not None))


def _sync_batch_norm(ctx, m, x):
    if m.training and ctx.spatial_norms:
        return ctx.refuse("SyncBatchNorm in training mode would reduce each tile's statistics "
                          "across processes", fix="convert it to BatchNorm2d for streaming "
                          "(DistributedDataParallel then averages the gradients as usual), call "
                          f".eval() on it, or {MOVE}")
    return batch_norm(ctx, x, m.running_mean, m.running_var, training=m.training,
                      momentum=m.momentum, eps=m.eps, layer=True)


def layer_norm(ctx, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or input.dims[-1] != "C":
        return ctx.refuse("it normalises with statistics computed over the feature map's spatial "
                          "positions, which a tile does not all hold (only a LayerNorm over the "
                          "channel dimension alone, as in ConvNeXt, is pointwise in space)")
    _need_channels(ctx, input, shape[0])
    return _pointwise(ctx, input)


def rms_norm(ctx, input, normalized_shape, weight=None, eps=None):
    return layer_norm(ctx, input, normalized_shape)


def linear(ctx, input, weight, bias=None):
    if input.dims[-1] != "C":
        return ctx.refuse("it connects every position of the feature map (it acts on the last "
                          "dimension, which is not the channels; ConvNeXt-style blocks permute "
                          "channels last first)")
    _need_channels(ctx, input, weight.shape[-1], "features")
    return _pointwise(ctx, input, channels=weight.shape[0])


def rrelu(ctx, input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if training:
        return ctx.refuse("it is in training mode: its random slopes would differ between tiles "
                          "and the backward recomputation", fix=f"call .eval() on it or {MOVE}")
    return _pointwise(ctx, input)


def channel_shuffle(ctx, input, groups):
    return _channels_first(ctx, input, "it shuffles") or _pointwise(ctx, input)


@takes_maps(ANY)
def draws_random(ctx, *args, **kwargs):
    return ctx.refuse("it draws random numbers, anew for every tile and again in the backward "
                      "recomputation, not once for the whole image",
                      fix=f"call .eval() on the layer that draws them or {MOVE}")


@takes_maps(ANY)
def to(ctx, input, *args, **kwargs):
    """``x.to(...)``, ``x.type_as(y)``: a dtype or device conversion (``y`` gives only its type)."""
    return _pointwise(ctx, input)


# --------------------------------------------------------------------------- merges and arithmetic

def _broadcastable(ctx, x: FMap, other):
    """Refusal unless ``other`` (a constant tensor or number) is constant over the spatial
    positions of ``x``."""
    shape = tuple(other.shape) if isinstance(other, torch.Tensor) else ()
    if len(shape) > len(x.dims):
        return ctx.refuse(f"it combines the feature map with a tensor of shape {shape}, which has "
                          f"more dimensions")
    for role, size in zip(x.dims[len(x.dims) - len(shape):], shape):
        if is_space(role) and size != 1:
            return ctx.refuse(f"it combines the feature map with a tensor of shape {shape} that "
                              f"varies over the spatial positions (e.g. a positional embedding "
                              f"of a fixed size)")
        if role == "C" and size != 1 and x.channels != 1:  # (one channel broadcasts)
            _need_channels(ctx, x, size)
    return None


def _constant_channels(x: FMap, other: torch.Tensor) -> int:
    """The size of constant ``other`` along the channels of ``x`` (1 where it has none)."""
    roles = x.dims[len(x.dims) - other.dim():] if other.dim() else ()
    return next((size for role, size in zip(roles, other.shape) if role == "C"), 1)


@takes_maps("input", "other")
def arithmetic(ctx, input, other, alpha=1, rounding_mode=None):
    """Binary arithmetic: a merge of two feature maps, or pointwise with a constant."""
    return pointwise(ctx, input, other)


@takes_maps("input", "exponent")
def power(ctx, input, exponent):
    return pointwise(ctx, input, exponent)


def merge(ctx, inputs, dims=None, channels=-1):
    """A merge step of feature maps broadcast against each other: their dimensions are
    aligned from the right (torch's broadcasting) and must have the same roles."""
    longest = max(inputs, key=lambda x: len(x.dims))
    dims = longest.dims if dims is None else dims
    if any(x.dims != longest.dims[len(longest.dims) - len(x.dims):] for x in inputs):
        return ctx.refuse("it combines feature maps in different layouts "
                          + " and ".join(layout(x) for x in inputs))
    if channels == -1:
        channels = _broadcast_channels(ctx, inputs)
    return ctx.step(Merge(), inputs, dims, channels, f"{ctx.name} gives")


def _broadcast_channels(ctx, inputs, constants=()):
    """The channels of feature maps (and constants' channel sizes) broadcast together."""
    counts = {x.channels for x in inputs if "C" in x.dims} | set(constants)
    if None in counts:
        return None
    if len(counts - {1}) > 1:
        raise ValueError(f"{ctx.name} combines feature maps with "
                         f"{' and '.join(map(str, sorted(counts)))} channels")
    return max(counts)


@takes_maps("tensors")
def cat(ctx, tensors, dim=0, *, out=None):
    maps = list(tensors)
    if not all(isinstance(t, FMap) for t in maps):
        return ctx.refuse("it concatenates the feature map with a constant tensor")
    if not isinstance(dim, int) or maps[0].dims[_dim(dim, len(maps[0].dims))] != "C":
        return ctx.refuse("it concatenates along a dimension that is not the channels")
    if any(len(t.dims) != len(maps[0].dims) for t in maps):
        return ctx.refuse("it concatenates feature maps of different ranks")
    counts = [t.channels for t in maps]
    return merge(ctx, maps, maps[0].dims, None if None in counts else sum(counts))


def _channel_parts(ctx, x, dim, what, sizes_of):
    """Pieces of ``x`` along the channels: one pointwise step each."""
    refused = _channel_dim_op(ctx, x, dim, what)
    if refused:
        return refused
    sizes = sizes_of(x.channels)
    if sizes is None:
        return Unknown()
    return tuple(_pointwise(ctx, x, channels=s) for s in sizes)


def _pieces(total: int, each: int) -> list[int]:
    return [min(each, total - i) for i in range(0, total, each)]


def chunk(ctx, input, chunks, dim=0):
    return _channel_parts(ctx, input, dim, "a chunk",
                          lambda c: None if c is None else _pieces(c, -(-c // chunks)))


def split(ctx, input, split_size_or_sections, dim=0):
    sections = split_size_or_sections
    if isinstance(sections, int):
        return _channel_parts(ctx, input, dim, "a split",
                              lambda c: None if c is None else _pieces(c, sections))
    refused = _channel_dim_op(ctx, input, dim, "a split")  # before the sections meet the channels
    if refused:
        return refused
    if input.channels is not None and sum(sections) != input.channels:
        raise ValueError(f"{ctx.name} splits {input.channels} channels into sections "
                         f"{list(sections)}, which sum to {sum(sections)}")
    return _channel_parts(ctx, input, dim, "a split", lambda c: list(sections))


@takes_maps("condition", "input", "other")
def where(ctx, condition, input=None, other=None):
    if input is None or other is None:
        return ctx.refuse("torch.where(condition) returns the positions where it holds")
    return pointwise(ctx, condition, input, other)


# --------------------------------------------------------------------------- layout and indexing

def permute(ctx, input, *dims_, dims=None):
    order = dims if dims is not None else (
        dims_[0] if len(dims_) == 1 and isinstance(dims_[0], (tuple, list)) else dims_)
    rank = len(input.dims)
    return ctx.step(Pointwise(), [input], tuple(input.dims[_dim(d, rank)] for d in order),
                    input.channels, input.source)


def transpose(ctx, input, dim0, dim1):
    rank = len(input.dims)
    order = list(range(rank))
    a, b = _dim(dim0, rank), _dim(dim1, rank)
    order[a], order[b] = order[b], order[a]
    return permute(ctx, input, order)


def movedim(ctx, input, source, destination):
    rank = len(input.dims)
    src = [_dim(s, rank) for s in _per_axis(source, 1)]
    dst = [_dim(d, rank) for d in _per_axis(destination, 1)]
    rest = [d for d in range(rank) if d not in src]
    order = [None] * rank
    for s, d in zip(src, dst):
        order[d] = s
    it = iter(rest)
    return permute(ctx, input, [o if o is not None else next(it) for o in order])


def flatten(ctx, input, start_dim=0, end_dim=-1):
    rank = len(input.dims)
    start, end = _dim(start_dim, rank), _dim(end_dim, rank)
    merged = input.dims[start:end + 1]
    if len(merged) <= 1:
        return _pointwise(ctx, input)
    if merged == tuple(range(len(input.spatial()))) and merged == input.spatial():
        return _positions(ctx, input, start, end)
    if all(isinstance(role, int) for role in merged):
        return ctx.refuse(FLATTENS_SPACE)
    return ctx.refuse(f"it reshapes the feature map: it flattens dimensions {start}..{end} of "
                      f"layout {layout(input)} together, mixing space and channels")


FLATTENS_SPACE = ("it flattens some spatial dimensions but not all, or not in order: what streams "
                  "is x.flatten(2) or x.reshape(B, C, H * W) of a channels-first map")


def _positions(ctx, x: FMap, start: int, end: int) -> FMap:
    """``x`` with dimensions ``start..end`` (its spatial axes, in order) flattened into one
    sequence of positions (:func:`positions_role`)."""
    dims = x.dims[:start] + (positions_role(end - start + 1),) + x.dims[end + 1:]
    return ctx.step(Pointwise(), [x], dims, x.channels, x.source)


def reshape_refused(ctx, *args, **kwargs):
    return ctx.refuse("it reshapes the feature map (view/reshape), which can mix space into "
                      "channels and needs the whole feature map's spatial size; what streams: "
                      "x.reshape(B, r, C // r, H, W) and back, with B, C, H, W = x.shape")


@takes_sizes
def reshape(ctx, input, *shape, **kwargs):
    """``x.reshape((B, r, RC // r, H, W))`` (ResNeSt's split attention, ``B, RC, H, W =
    x.shape``) and back (``x.view(B, -1, H, W)``): the channels split into groups and
    channels (:func:`group_role`), or groups merged into the channels, with the batch first
    and the map's own spatial sizes last, unchanged (or a map's of the same length on every
    tile). On a tile ``H, W`` are the tile's
    sizes, so the tile's reshape is the whole map's restricted to the tile. Anything else
    could move values between positions and is refused (``H * W``: a sequence of positions)."""
    shape = kwargs.get("shape", shape)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if any(is_positions(r) for r in input.dims):
        return ctx.refuse("it reshapes a sequence of positions (x.flatten(2)) back into a map or "
                          "otherwise: a tile's sequence is its own positions")
    spatial = input.spatial()
    if shape and isinstance(shape[-1], SizeExpr):
        return _flattened(ctx, input, shape)
    if contains(shape, SizeExpr):
        return ctx.refuse(FLATTENS_SPACE)
    k, rank = len(spatial), len(input.dims)
    head, tail = list(shape[:len(shape) - k]), tuple(shape[len(shape) - k:])
    own_sizes = all(isinstance(s, SpatialSize) and s.fmap is not None and s.axis == a and
                    _same_length(ctx, s.fmap, input, a) for s, a in zip(tail, spatial))
    if input.dims[0] != "N" or input.dims[rank - k:] != tuple(range(k)) or not own_sizes \
            or len(head) < 2 or "N" in input.dims[1:rank - k]:
        return reshape_refused(ctx)
    batch, rest = head[0], head[1:]
    if not (isinstance(batch, UnknownNumber) or (type(batch) is int and batch > 0 and
                                                  (ctx.batch is None or batch == ctx.batch))):
        return ctx.refuse("it reshapes the batch dimension of the feature map (the batch must "
                          "stay first, as B of B, C, H, W = x.shape)")
    if len(rest) > 2 or rest.count(-1) > 1 or not all(
            isinstance(r, UnknownNumber) or (type(r) is int and (r > 0 or r == -1)) for r in rest):
        return ctx.refuse("it reshapes the channels into more than two dimensions, or into sizes "
                          "that are not numbers; what streams: (B, groups, channels, *spatial)")
    sizes = [input.channels if r == "C" else r[1] for r in input.dims[1:rank - k]]
    total = None if None in sizes else math.prod(sizes)
    new = _resolve(rest, total)
    if total is not None and None not in new and math.prod(new) != total:
        raise ValueError(f"{ctx.name} reshapes {total} channels into {'x'.join(map(str, new))}")
    roles = ("C",) if len(new) == 1 else (group_role(new[0]), "C")
    return ctx.step(Pointwise(), [input], ("N",) + roles + input.dims[rank - k:], new[-1],
                    input.source if new[-1] == input.channels else f"{ctx.name} gives")


def _flattened(ctx, x: FMap, shape) -> FMap | Refused:
    """``x.reshape(B, C, H * W)`` (timm's global context): the spatial sizes of ``x`` (or of
    a map of the same lengths), multiplied in order, flatten the spatial axes of a
    channels-first map into a sequence of positions; batch and channels stay."""
    k = len(x.spatial())
    factors, expr = [], shape[-1]
    while isinstance(expr, SizeExpr) and expr.op == "*":
        factors.insert(0, expr.right)
        expr = expr.left
    factors.insert(0, expr)
    head = list(shape[:-1])
    ok = (x.dims == standard_dims(k) and len(factors) == k and len(head) == 2 and all(
        isinstance(f, SpatialSize) and f.fmap is not None and f.axis == a and
        _same_length(ctx, f.fmap, x, a) for a, f in enumerate(factors)))
    batch, channels = (head + [None, None])[:2]
    ok = ok and (isinstance(batch, UnknownNumber) or batch == ctx.batch or ctx.batch is None) \
        and (isinstance(channels, UnknownNumber) or channels in (x.channels, -1) or x.channels is None)
    if not ok:
        return ctx.refuse(FLATTENS_SPACE)
    return _positions(ctx, x, 2, 1 + k)


def _same_length(ctx, a: FMap, b: FMap, axis: int) -> bool:
    """Whether maps ``a`` and ``b`` have the same length along ``axis`` on every tile (one
    computed from the other pointwise, say)."""
    return a.index == b.index or ctx.constant_size(
        Arithmetic("-", Length(0), Length(1)), [a, b], axis) == 0


def _resolve(sizes: list, total: int | None) -> list:
    """Sizes of a reshape with -1 worked out from ``total`` (None: not known yet)."""
    known = [s if type(s) is int else None for s in sizes]
    if -1 in known:
        others = [s for s in known if s != -1]
        fill = None if total is None or None in others else total // max(1, math.prod(others))
        known[known.index(-1)] = fill
    return known


def _new_dim(dims: tuple, dim) -> int | None:
    """Where a new dimension ``dim`` (as torch counts it, on a value of rank + 1) goes in a
    map of layout ``dims``; None before the batch or between two spatial axes."""
    at = _dim(dim, len(dims) + 1) if isinstance(dim, int) else -1
    if at < 1 or at > len(dims) or (at < len(dims) and isinstance(dims[at - 1], int)
                                     and isinstance(dims[at], int)):
        return None
    return at


def unsqueeze(ctx, input, dim):
    """A new dimension of size 1 (a group of one, :func:`group_role`), after the batch and
    not between spatial axes."""
    at = _new_dim(input.dims, dim)
    if at is None:
        return ctx.refuse("it inserts a dimension before the batch or between spatial axes")
    return _pointwise(ctx, input, dims=input.dims[:at] + (group_role(1),) + input.dims[at:])


@takes_maps("tensors")
def stack(ctx, tensors, dim=0, *, out=None):
    """``torch.stack(branches, dim=1)`` (timm's selective kernel): feature maps on one grid
    side by side along a new dimension of groups (:func:`group_role`) - a merge."""
    maps = list(tensors)
    if not maps or not all(isinstance(t, FMap) for t in maps):
        return ctx.refuse("it stacks the feature map with a constant tensor")
    dims = maps[0].dims
    if any(t.dims != dims for t in maps):
        return ctx.refuse("it stacks feature maps in different layouts "
                          + " and ".join(layout(x) for x in maps))
    at = _new_dim(dims, dim)
    if at is None:
        return ctx.refuse("it stacks feature maps along a new dimension before the batch or "
                          "between spatial ones (what streams: torch.stack(maps, dim=1))")
    counts = {t.channels for t in maps}
    if len(counts) > 1 and None not in counts:
        raise ValueError(f"{ctx.name} stacks feature maps with "
                         f"{' and '.join(map(str, sorted(counts)))} channels")
    return merge(ctx, maps, dims[:at] + (group_role(len(maps)),) + dims[at:],
                 maps[0].channels if len(counts) == 1 else None)


@takes_maps(ANY)
@takes_sizes
def getitem(ctx, value, index):
    """Indexing: of a tuple of values, of a shape, or of a feature map (channels, and
    crops of spatial axes)."""
    if isinstance(value, (tuple, list)):
        if contains(index, Refused):
            return first_refused(index)
        return value[index]
    if isinstance(value, Unknown):
        return Unknown()
    if isinstance(value, Shape):
        if isinstance(index, slice):
            sizes = tuple(_size(ctx, value.fmap, d) for d in range(len(value.fmap.dims))[index])
            refused = first_refused(sizes)
            return sizes if refused is None or isinstance(refused, SpatialSize) else refused
        return _size(ctx, value.fmap, index)
    return _index_fmap(ctx, value, index)


def _index_fmap(ctx, x: FMap, index):
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index) or sum(i is Ellipsis for i in index) > 1:
        return ctx.refuse("it indexes the feature map with None or several ellipses")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(x.dims) - len(index) + 1) + index[k + 1:]
    channels, crops = x.channels, {}
    for role, i in zip(x.dims, index):
        if i == slice(None):
            continue
        if isinstance(role, int) and _is_crop(i):
            crops[role] = _crop_sides(i, x, role)
            continue
        if role != "C" or not isinstance(i, slice) or contains(i, (Shape, Unknown, Refused)):
            return ctx.refuse("it indexes spatial positions or the batch of the feature map "
                              "(a tile holds only some positions)" if role != "C" else
                              "it indexes the channel dimension with an integer, a tensor or "
                              "a size not known before the input")
        channels = None if channels is None else len(range(channels)[i])
    if crops:
        return _sized_windows(ctx, x, crops, channels, x.source if channels == x.channels
                              else f"{ctx.name} gives")
    return _pointwise(ctx, x, channels=channels)


def _is_crop(i) -> bool:
    """A slice that crops a spatial axis by amounts not set by its length: a start from
    the left (a non-negative int, or computed from sizes), a stop from the right (a
    negative int, or computed from sizes), unit step (``x[..., 2:-2]``, or the original
    U-Net's ``x[..., d:d + y.size(2)]``)."""
    sizes = (SpatialSize, SizeExpr)
    return isinstance(i, slice) and i.step in (None, 1) and (
        i.start is None or isinstance(i.start, sizes) or (type(i.start) is int and i.start >= 0)) and (
        i.stop is None or isinstance(i.stop, sizes) or (type(i.stop) is int and i.stop < 0))


def _crop_sides(i: slice, x: FMap, role: int) -> tuple:
    """A crop's (left, right) padding: minus the start, and the stop minus ``x`` 's length."""
    start = 0 if i.start is None else i.start
    left = -start if isinstance(start, int) else SizeExpr(start.error, "-", 0, start)
    if i.stop is None or isinstance(i.stop, int):
        return left, 0 if i.stop is None else i.stop
    return left, SizeExpr(i.stop.error, "-", i.stop, SpatialSize(i.stop.error, x, role))


def _size(ctx, x: FMap, dim):
    role = x.dims[_dim(dim, len(x.dims))]
    if role == "C":
        return UnknownNumber() if x.channels is None else x.channels
    if role == "N":
        return UnknownNumber() if ctx.batch is None else ctx.batch
    if is_group(role):
        return UnknownNumber() if role[1] is None else role[1]
    refused = ctx.refuse("it reads the feature map's spatial size, which differs from tile to "
                         "tile (a size streams only where it makes one map the size of another, "
                         "as in F.interpolate(x, size=y.shape[-2:]))")
    return SpatialSize(refused.error, x, role)


def size(ctx, input, dim=None):
    return Shape(input) if dim is None else _size(ctx, input, dim)


@takes_maps(ANY)
def attribute(ctx, obj, name, *default):
    """``getattr(value, name)``, as fx records ``x.shape`` and ``torch.max(x, 1).values``."""
    if isinstance(obj, tuple) and hasattr(type(obj), "n_fields"):  # torch.return_types
        return getattr(obj, name, *default)
    if not isinstance(obj, FMap):
        return Unknown()
    if name == "shape":
        return Shape(obj)
    if name in ("dtype", "device", "ndim"):
        return {"dtype": ctx.dtype, "device": ctx.device, "ndim": len(obj.dims)}[name]
    return ctx.refuse(f"it reads the attribute '{name}' of a feature map")


def dim_method(ctx, input):
    return len(input.dims)


def _reduced(dim, rank: int) -> list[int]:
    """The dimensions a reduction reduces: all of them for ``dim=None`` and for an empty
    ``dim`` (torch's ``sum(dim=())`` reduces everything)."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(rank))
    return sorted({_dim(d, rank) for d in _per_axis(dim, 1)})


_WITH_INDICES = {"max": torch.return_types.max, "min": torch.return_types.min}


@takes_maps("input", "other")
def reduction(ctx, input, dim=None, keepdim=False, other=None, out=None, *, kind="", **_):
    """mean/sum/amax/max/std/norm/...: pointwise in space when they reduce over channels or
    the batch only. ``max(input, other)`` is elementwise; ``max(input, dim)`` also gives
    the indices."""
    if other is not None:
        return pointwise(ctx, input, other)
    if not isinstance(input, FMap):
        return ctx.refuse("it reduces a value that is not a feature map")
    if contains(dim, (Shape, Unknown)):
        return ctx.refuse("it reduces over dimensions not known before the input")
    rank = len(input.dims)
    dims = _reduced(dim, rank)
    if any(is_space(input.dims[d]) for d in dims):
        return global_step(ctx, input, dims, keepdim, kind, _.get("p", "fro"),
                           indices=kind in _WITH_INDICES and dim is not None)
    new_dims = tuple(group_role(1) if k in dims and is_group(r) else r
                     for k, r in enumerate(input.dims)) if keepdim else \
        tuple(r for k, r in enumerate(input.dims) if k not in dims)
    if "C" not in new_dims:
        return ctx.refuse("it removes the channel dimension")
    channels = 1 if "C" in [input.dims[d] for d in dims] else -1
    values = _pointwise(ctx, input, dims=new_dims, channels=channels)
    if kind in _WITH_INDICES and dim is not None:
        return _WITH_INDICES[kind]((values, _pointwise(ctx, input, dims=new_dims, channels=channels)))
    return values


GLOBAL_KINDS = ("mean", "sum", "amax", "amin", "max", "min", "norm", "logsumexp")


def global_step(ctx, x: FMap, dims, keepdim: bool, kind: str, p=None, indices: bool = False):
    """A reduction of ``x`` over all its spatial positions: a global step (:class:`Global`),
    whose value, one per sample and channel, is a :class:`Pooled`. Reductions over some
    spatial axes only, or over space and channels together, are refused."""
    spatial = {k for k, role in enumerate(x.dims) if is_space(role)}
    if set(dims) != spatial:
        return ctx.refuse(
            "it reduces over spatial positions, but over some spatial axes only or over the "
            "channels or the batch too (per-row or per-column pooling, a mean of the whole "
            "tensor): streamcnn streams a reduction over all the spatial positions of each "
            "sample and channel (global pooling, as in squeeze-and-excitation)")
    if kind not in GLOBAL_KINDS or (kind == "norm" and p not in (2, 2.0, "fro")):
        what = f"a {p}-norm" if kind == "norm" else kind
        return ctx.refuse(
            f"it reduces over spatial positions with {what}, which streamcnn does not stream "
            f"(it streams the mean, sum, amax, amin, max, min, log-sum-exp and the L2 norm over "
            f"all positions)")
    if kind in ("max", "min") and any(is_positions(x.dims[d]) for d in dims):
        return ctx.refuse(f"it takes the {kind} over a sequence of positions, whose gradient goes to "
                          f"the first extreme in a tile's order, not the image's; amax/amin stream")
    step = ctx.step(Pointwise(), [x], x.dims, x.channels, x.source,
                    norm=Global(kind, tuple(dims), keepdim, indices))
    shape = [1 if k in spatial else ctx.batch if role == "N" else role[1] if is_group(role)
             else x.channels for k, role in enumerate(x.dims) if keepdim or k not in spatial]
    value = None if None in shape else torch.zeros(
        shape, dtype=ctx.map_dtype, device=ctx.device or "cpu")
    out = Pooled(value, (step,))
    if indices:
        return _WITH_INDICES[kind]((out, ctx.refuse(
            "it uses the indices of an extreme over the whole feature map, which no tile holds")))
    return out


def adaptive_pool(ctx, input, output_size, return_indices=False, *, rank, kind):
    """Adaptive pooling to size 1 (global pooling): a global step; to other sizes refused."""
    problem = _window_input(ctx, input, rank, f"adaptive {kind} pool")
    if problem is not None:
        return problem
    if return_indices:
        return ctx.refuse("it has return_indices=True: its indices point into the whole feature "
                          "map", fix="use return_indices=False")
    if any(o != 1 for o in _per_axis(output_size, rank)):
        return ctx.refuse(f"{GLOBAL} to a size other than 1 (only global pooling, output size "
                          f"1, streams)")
    spatial = tuple(k for k, role in enumerate(input.dims) if isinstance(role, int))
    return global_step(ctx, input, spatial, True, kind)


def _reducer(kind: str):
    """``reduction`` for one function, which needs its name (max/min also give indices)."""
    @takes_maps("input", "other")
    def reduce(ctx, input, **kwargs):
        return reduction(ctx, input, kind=kind, **kwargs)
    return reduce


def register_hook(ctx, input, hook):
    return ctx.refuse(
        "it registers a gradient hook (Tensor.register_hook) on an activation inside the streamed "
        "module: streaming never builds that activation for the whole image, only tile by tile, "
        "so the hook would see tile-sized gradients", fix="register the hook on the Streaming "
        "module's output (the stitched feature map) instead, or " + MOVE)


# --------------------------------------------------------------------------- upsampling

_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear",
          "bilinear": "linear"}
_LINEAR_RANK = {"linear": 1, "bilinear": 2}


def _factor(value) -> int | None:
    """A scale factor as an integer of at least 1, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value >= 1 and float(value).is_integer() else None


@takes_maps("input")
@takes_sizes
def interpolate(ctx, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    """``F.interpolate`` upsampling by an integer factor per axis (a power of two for the
    interpolating modes), given by ``scale_factor`` or by ``size`` read from a map that
    many times finer: :class:`geometry.Upsample`."""
    rank = len(input.spatial())
    problem = _window_input(ctx, input, rank, "resampling")
    if problem is not None:
        return problem
    if mode not in _MODES or _LINEAR_RANK.get(mode, rank) != rank:
        return ctx.refuse(f"it resamples with mode='{mode}'; streamcnn streams 'nearest', "
                          f"'nearest-exact' and {'linear' if rank == 1 else 'bilinear'} "
                          f"upsampling", fix="use one of those modes, or " + MOVE)
    if align_corners:
        return ctx.refuse("it has align_corners=True, which samples at positions set by the "
                          "whole map's size (a tile's would differ)",
                          fix="use align_corners=False (the default), or " + MOVE)
    if antialias:
        return ctx.refuse("it has antialias=True", fix="use antialias=False (it changes nothing "
                          "when upsampling), or " + MOVE)
    like = None
    if size is not None:
        like, factors = _size_factors(ctx, input, size, rank)
        if isinstance(factors, Refused):
            return factors
    else:
        factors = tuple(_factor(f) for f in _per_axis(scale_factor, rank))
        if None in factors:
            return ctx.refuse(f"it resamples by scale_factor={scale_factor}; streamcnn streams "
                              f"upsampling by whole factors (2, 3, ...) only",
                              fix="use an integer scale_factor, or " + MOVE)
    if any(k & (k - 1) for k in factors):
        return ctx.refuse(f"it resamples by {max(factors)}: torch computes the source positions "
                          f"in floating point with the scale 1/{max(factors)}, which rounds "
                          f"differently at a tile's positions than at the whole map's",
                          fix="upsample by a power of two, use ConvTranspose or PixelShuffle "
                          "(exact for any factor), or " + MOVE)
    rules = tuple(Upsample(k, _MODES[mode]) for k in factors)
    return ctx.step(rules, [input] if like is None else [input, like], input.dims, input.channels,
                    input.source)


def _size_factors(ctx, input: FMap, size, rank: int):
    """The map whose sizes ``size`` reads and the factor of each axis (an integer: that
    map's grid is that many times finer than ``input`` 's), or a refusal."""
    sizes = _per_axis(size, rank)
    if len(sizes) != rank or not all(isinstance(v, SpatialSize) for v in sizes) or \
            len({v.fmap for v in sizes}) != 1 or [v.axis for v in sizes] != list(range(rank)):
        refused = next((v for v in sizes if isinstance(v, Refused)), None)
        if refused is not None and not isinstance(refused, SpatialSize):
            return None, refused
        return None, ctx.refuse(
            f"it resamples to size={size}: a size fixed in advance, or not another feature map's "
            f"sizes in axis order, depends on the whole map's size, which a tile does not have",
            fix="pass scale_factor, or size=y.shape[-2:] of the map it should match, or " + MOVE)
    like = sizes[0].fmap
    factors = []
    for a in range(rank):
        ratio = Fraction(ctx.stride(input, a)) / Fraction(ctx.stride(like, a))
        if ratio < 1 or ratio != int(ratio):
            return None, ctx.refuse(
                f"it resamples to the size of a map whose grid is {ratio} times as fine along "
                f"axis {a}; streamcnn streams upsampling by whole factors only")
        factors.append(int(ratio))
    return like, tuple(factors)


@takes_maps("input")
@takes_sizes
def upsample(ctx, input, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """The deprecated ``F.upsample`` (``F.interpolate`` by another name; fx records the
    inner call, this entry serves a direct one)."""
    return interpolate(ctx, input, size, scale_factor, mode, align_corners)


@takes_maps("input")
@takes_sizes
def upsample_nearest(ctx, input, size=None, scale_factor=None):
    return interpolate(ctx, input, size, scale_factor, "nearest")


@takes_maps("input")
@takes_sizes
def upsample_bilinear(ctx, input, size=None, scale_factor=None):
    return interpolate(ctx, input, size, scale_factor, "bilinear", align_corners=True)


def conv_transpose(ctx, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1, *, rank):
    """A transposed convolution: :class:`geometry.Transposed` per axis."""
    problem = _window_input(ctx, input, rank, "transposed convolution")
    if problem is not None:
        return problem
    _need_channels(ctx, input, weight.shape[0])
    kernel, stride, padding, output_padding, dilation = (
        _per_axis(v, rank) for v in (tuple(weight.shape[2:]), stride, padding, output_padding,
                                     dilation))
    rules = tuple(Transposed(kernel[a], stride[a], padding[a], output_padding[a], dilation[a])
                  for a in range(rank))
    return ctx.step(rules, [input], input.dims, weight.shape[1] * groups, f"{ctx.name} gives")


def conv_transpose_module(ctx, m, input, *, rank):
    if m.padding_mode != "zeros":
        return ctx.refuse(f"it uses padding_mode='{m.padding_mode}'; only 'zeros' is streamed "
                          f"exactly", fix="use padding_mode='zeros' or " + MOVE)
    return conv_transpose(ctx, input, m.weight, None, m.stride, m.padding, m.output_padding,
                          m.groups, m.dilation, rank=rank)


def pixel_shuffle(ctx, input, upscale_factor):
    """Channels into a finer grid: each axis upsampled by ``upscale_factor`` (output ``j``
    holds a channel of input ``j // r``), channels divided by its square."""
    problem = _window_input(ctx, input, 2, "pixel shuffle")
    if problem is not None:
        return problem
    r = upscale_factor
    channels = None if input.channels is None else input.channels // (r * r)
    if input.channels is not None and input.channels % (r * r):
        raise ValueError(f"{ctx.name} needs channels divisible by {r * r} but {input.source} "
                         f"{input.channels}")
    return ctx.step((Upsample(r),) * 2, [input], input.dims, channels, f"{ctx.name} gives")


def pixel_unshuffle(ctx, input, downscale_factor):
    """A finer grid into channels: a ``r`` x ``r`` window of stride ``r`` whose input length
    must be a multiple of ``r`` (torch refuses others)."""
    problem = _window_input(ctx, input, 2, "pixel unshuffle")
    if problem is not None:
        return problem
    r = downscale_factor
    channels = None if input.channels is None else input.channels * r * r
    return ctx.step((Window(kernel=r, stride=r, divides=True),) * 2, [input], input.dims,
                    channels, f"{ctx.name} gives")


def _upsample_module(ctx, m, x):
    return interpolate(ctx, x, m.size, m.scale_factor, m.mode, m.align_corners,
                       recompute_scale_factor=getattr(m, "recompute_scale_factor", None))


# --------------------------------------------------------------------------- registries

def _why(reason):
    @takes_maps(ANY)
    def refuse(ctx, *args, **kwargs):
        return ctx.refuse(reason)
    return refuse


GLOBAL = "it pools over the whole feature map (adaptive or global pooling)"
UPSAMPLE = "it samples the feature map at positions it computes, or reshapes it into patches"
NORM_OVER_SPACE = "it normalises with statistics computed over the feature map, which a tile does not see"
ATTENTION = "attention connects every position of the feature map"

POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.Identity,
)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
NORM_MODULES = BATCHNORM_MODULES + (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)
NORM_FUNCTIONS = (F.batch_norm, F.group_norm, F.instance_norm)
#: the function each normalisation layer calls (what a tile's torch-function mode sees)
NORM_LAYER_FUNCTIONS = {**{t: F.batch_norm for t in BATCHNORM_MODULES}, nn.GroupNorm: F.group_norm,
                        nn.InstanceNorm1d: F.instance_norm, nn.InstanceNorm2d: F.instance_norm}
#: calls that may reduce over every spatial position (global steps), as a tile makes them
GLOBAL_LAYER_FUNCTIONS = {nn.AdaptiveAvgPool1d: F.adaptive_avg_pool1d,
                          nn.AdaptiveAvgPool2d: F.adaptive_avg_pool2d,
                          nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
                          nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
                          nn.Softmax: F.softmax, nn.Softmax2d: F.softmax,
                          nn.LogSoftmax: F.log_softmax}
GLOBAL_FUNCTIONS = frozenset(GLOBAL_LAYER_FUNCTIONS.values()) | {
    torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.norm,
    torch.logsumexp, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.matmul}
GLOBAL_METHODS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "norm", "logsumexp",
                            "softmax", "log_softmax", "matmul"})
#: layer types that fix the spatial rank of their input
RANK = {nn.Conv1d: 1, nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.BatchNorm1d: 1, nn.ConvTranspose1d: 1,
        nn.Conv2d: 2, nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.BatchNorm2d: 2, nn.ConvTranspose2d: 2,
        nn.PixelShuffle: 2, nn.PixelUnshuffle: 2, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
        nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2}


def _max_pool_module(ctx, m, x):
    return max_pool(ctx, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                    m.return_indices, rank=RANK[type(m)])


def _avg_pool_module(ctx, m, x):
    return avg_pool(ctx, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, rank=RANK[type(m)])


MODULES = {
    nn.Conv1d: lambda ctx, m, x: conv_module(ctx, m, x, rank=1),
    nn.Conv2d: lambda ctx, m, x: conv_module(ctx, m, x, rank=2),
    nn.MaxPool1d: _max_pool_module, nn.MaxPool2d: _max_pool_module,
    nn.AvgPool1d: _avg_pool_module, nn.AvgPool2d: _avg_pool_module,
    **{t: lambda ctx, m, x: pad(ctx, x, m.padding, value=getattr(m, "value", 0.0))
       for t in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)},
    nn.ConvTranspose1d: lambda ctx, m, x: conv_transpose_module(ctx, m, x, rank=1),
    nn.ConvTranspose2d: lambda ctx, m, x: conv_transpose_module(ctx, m, x, rank=2),
    **{t: _upsample_module for t in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)},
    nn.PixelShuffle: lambda ctx, m, x: pixel_shuffle(ctx, x, m.upscale_factor),
    nn.PixelUnshuffle: lambda ctx, m, x: pixel_unshuffle(ctx, x, m.downscale_factor),
    **{t: (lambda r, k: lambda ctx, m, x: adaptive_pool(
        ctx, x, m.output_size, getattr(m, "return_indices", False), rank=r, kind=k))(r, k)
       for t, r, k in ((nn.AdaptiveAvgPool1d, 1, "mean"), (nn.AdaptiveAvgPool2d, 2, "mean"),
                       (nn.AdaptiveMaxPool1d, 1, "max"), (nn.AdaptiveMaxPool2d, 2, "max"))},
    nn.PReLU: lambda ctx, m, x: prelu(ctx, x, m.weight),
    nn.RReLU: lambda ctx, m, x: rrelu(ctx, x, training=m.training),
    **{t: (lambda k: lambda ctx, m, x: softmax_like(ctx, x, m.dim, kind=k))(k)
       for t, k in ((nn.Softmax, "softmax"), (nn.LogSoftmax, "log_softmax"), (nn.Softmin, "softmin"))},
    nn.Softmax2d: lambda ctx, m, x: softmax_like(ctx, x, -3),
    nn.GLU: lambda ctx, m, x: glu(ctx, x, m.dim),
    nn.ChannelShuffle: lambda ctx, m, x: channel_shuffle(ctx, x, m.groups),
    nn.LocalResponseNorm: lambda ctx, m, x: local_response_norm(ctx, x, m.size),
    nn.LayerNorm: lambda ctx, m, x: layer_norm(ctx, x, m.normalized_shape),
    nn.RMSNorm: lambda ctx, m, x: layer_norm(ctx, x, m.normalized_shape),
    nn.Linear: lambda ctx, m, x: linear(ctx, x, m.weight),
    nn.Flatten: lambda ctx, m, x: flatten(ctx, x, m.start_dim, m.end_dim),
    **{t: lambda ctx, m, x: _pointwise(ctx, x) for t in POINTWISE_MODULES},
    **{t: lambda ctx, m, x: dropout(ctx, x, m.p, m.training) for t in DROPOUT_MODULES},
    **{t: lambda ctx, m, x: batch_norm(ctx, x, m.running_mean, m.running_var, training=m.training,
                                       momentum=m.momentum, eps=m.eps, layer=True)
       for t in (nn.BatchNorm1d, nn.BatchNorm2d)},
    nn.SyncBatchNorm: _sync_batch_norm,
    nn.GroupNorm: lambda ctx, m, x: group_norm(ctx, x, m.num_groups, eps=m.eps),
    **{t: lambda ctx, m, x: instance_norm(ctx, x, m.running_mean, m.running_var,
                                          use_input_stats=m.training or not m.track_running_stats,
                                          momentum=m.momentum, eps=m.eps, layer=True)
       for t in (nn.InstanceNorm1d, nn.InstanceNorm2d)},
}

#: Modules that are local in no way a tile can reproduce, and why.
NON_LOCAL_MODULES = (
    ((nn.Bilinear, nn.LazyLinear), "it connects every position of the feature map"),
    ((nn.Unflatten,), "it reshapes the feature map, mixing space and channels"),
    ((nn.Fold, nn.Unfold), "it reshapes the feature map into patches, mixing space and channels"),
    ((nn.FractionalMaxPool2d,), "its random pooling regions depend on the whole feature map"),
    ((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
      nn.Transformer), ATTENTION),
)

_REDUCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
               torch.max: "max", torch.min: "min", torch.std: "std", torch.var: "var",
               torch.norm: "norm", torch.logsumexp: "logsumexp"}

FUNCTIONS = {
    F.conv1d: lambda ctx, *a, **k: conv(ctx, *a, **k, rank=1),
    F.conv2d: lambda ctx, *a, **k: conv(ctx, *a, **k, rank=2),
    F.max_pool1d: lambda ctx, *a, **k: max_pool(ctx, *a, **k, rank=1),
    F.max_pool2d: lambda ctx, *a, **k: max_pool(ctx, *a, **k, rank=2),
    F.max_pool1d_with_indices: _with_indices(1), F.max_pool2d_with_indices: _with_indices(2),
    F.avg_pool1d: lambda ctx, *a, **k: avg_pool(ctx, *a, **k, rank=1),
    F.avg_pool2d: lambda ctx, *a, **k: avg_pool(ctx, *a, **k, rank=2),
    F.pad: pad,
    F.dropout: dropout, F.dropout1d: dropout, F.dropout2d: dropout, F.alpha_dropout: dropout,
    F.feature_alpha_dropout: dropout,
    F.batch_norm: batch_norm,
    F.layer_norm: layer_norm,
    F.rms_norm: rms_norm,
    F.linear: linear,
    F.prelu: prelu,
    F.rrelu: rrelu,
    F.glu: glu,
    F.local_response_norm: local_response_norm,
    F.softmax: _softmax_of("softmax"), F.log_softmax: _softmax_of("log_softmax"),
    F.softmin: _softmax_of("softmin"), torch.softmax: _softmax_of("softmax"),
    torch.log_softmax: _softmax_of("log_softmax"),
    operator.matmul: matmul, torch.matmul: matmul,
    F.normalize: normalize,
    F.channel_shuffle: channel_shuffle,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.chunk: chunk, torch.split: split,
    torch.where: where,
    torch.permute: permute, torch.transpose: transpose, torch.movedim: movedim,
    torch.flatten: flatten, torch.reshape: reshape,
    operator.getitem: getitem,
    getattr: attribute,
    **{f: arithmetic for f in (operator.add, operator.sub, operator.mul, operator.truediv,
                               operator.iadd, operator.isub, operator.imul, operator.itruediv,
                               torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                               torch.minimum, operator.gt, operator.ge, operator.lt, operator.le,
                               operator.eq, operator.ne, torch.gt, torch.ge, torch.lt, torch.le,
                               torch.eq, torch.ne, torch.logical_and, torch.logical_or)},
    operator.pow: arithmetic, torch.pow: power,
    **{f: _reducer(kind) for f, kind in _REDUCTIONS.items()},
    **{f: pointwise for f in (
        F.relu, F.relu_, F.relu6, F.elu, F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_,
        F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.sigmoid,
        F.tanh, F.softplus, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.logsigmoid,
        F.threshold, F.threshold_, torch.relu, torch.relu_, torch.sigmoid,
        torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
        torch.square, torch.clamp, torch.clip, torch.erf, torch.sin, torch.cos, operator.neg,
        operator.pos, torch.clone, torch.detach, torch.logical_not)},
    **{f: (lambda r, k: lambda ctx, *a, **kw: adaptive_pool(ctx, *a, **kw, rank=r, kind=k))(r, k)
       for f, r, k in ((F.adaptive_avg_pool1d, 1, "mean"), (F.adaptive_avg_pool2d, 2, "mean"),
                       (F.adaptive_max_pool1d, 1, "max"), (F.adaptive_max_pool2d, 2, "max"))},
    **{f: _why(GLOBAL + " with indices") for f in (F.adaptive_max_pool1d_with_indices,
                                                   F.adaptive_max_pool2d_with_indices)},
    F.interpolate: interpolate, F.upsample: upsample, F.upsample_nearest: upsample_nearest,
    F.upsample_bilinear: upsample_bilinear,
    F.conv_transpose1d: lambda ctx, *a, **k: conv_transpose(ctx, *a, **k, rank=1),
    F.conv_transpose2d: lambda ctx, *a, **k: conv_transpose(ctx, *a, **k, rank=2),
    F.pixel_shuffle: pixel_shuffle, F.pixel_unshuffle: pixel_unshuffle,
    **{f: _why(UPSAMPLE) for f in (F.grid_sample, F.unfold, F.fold)},
    F.group_norm: group_norm, F.instance_norm: instance_norm,
    F.scaled_dot_product_attention: _why(ATTENTION),
    **{f: draws_random for f in (torch.bernoulli, torch.rand, torch.randn, torch.randint, torch.rand_like,
                           torch.randn_like, torch.randint_like, torch.randperm, torch.normal,
                           torch.multinomial, torch.poisson)},
}

METHODS = {
    **{name: pointwise for name in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "abs",
        "abs_", "neg", "neg_", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip", "clip_",
        "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "contiguous", "clone", "detach",
        "float", "double", "half", "bfloat16", "erf", "sin", "cos")},
    "to": to, "type_as": to,
    **{name: arithmetic for name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                                     "maximum", "minimum", "gt", "ge", "lt", "le", "eq", "ne")},
    "pow": power, "pow_": power,
    **{kind: _reducer(kind) for kind in _REDUCTIONS.values()},
    "softmax": _softmax_of("softmax"), "log_softmax": _softmax_of("log_softmax"),
    "matmul": matmul, "unsqueeze": unsqueeze,
    "permute": permute, "transpose": transpose, "movedim": movedim,
    "flatten": flatten, "view": reshape, "reshape": reshape, "view_as": reshape_refused,
    "reshape_as": reshape_refused, "unflatten": reshape_refused,
    "chunk": chunk, "split": split,
    "size": size, "dim": dim_method, "expand_as": expand_as,
    "register_hook": register_hook,
    **{name: draws_random for name in ("bernoulli", "bernoulli_", "normal_", "uniform_", "random_",
                                 "exponential_", "geometric_", "cauchy_", "log_normal_")},
}

IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_in_place(op: str, target, kwargs: dict) -> bool:
    """Whether a call writes its result into its first argument (which then holds it): the
    in-place operators, torch's methods and functions named with a trailing underscore
    (``add_``, ``relu_``, ``masked_fill_``: in the registry or not) and ``inplace=True``."""
    if op == "call_function" and target in IN_PLACE_FUNCTIONS:
        return True
    name = target if op == "call_method" else getattr(target, "__name__", "")
    underscore = isinstance(name, str) and name.endswith("_") and not name.startswith("_")
    return op in ("call_method", "call_function") and (underscore or kwargs.get("inplace") is True)

RANDOM_FUNCTIONS = {f for f, h in FUNCTIONS.items() if h is draws_random}
RANDOM_METHODS = {name for name, h in METHODS.items() if h is draws_random}


def module_handler(m: nn.Module):
    """The handler for a leaf module, or a refusal reason (str)."""
    kind = type(m)
    if parametrize.is_parametrized(m):  # ParametrizedConv2d etc.: geometry of the layer it wraps
        kind = kind.__bases__[0]
    if kind in MODULES:
        return MODULES[kind]
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return ("it is a lazy module whose parameters are not initialised yet; call the module once "
                "on an input (e.g. a small tile) before streaming it")
    for kinds, why in NON_LOCAL_MODULES:
        if isinstance(m, kinds):
            return why
    return None


def supported_summary() -> str:
    return ("supported: Conv1d/2d, MaxPool1d/2d, AvgPool1d/2d, zero padding, elementwise "
            "activations, Identity, BatchNorm and Dropout in eval mode, LayerNorm/Linear over "
            "channels, arithmetic, residual adds and torch.cat along channels, torch.stack and "
            "reshapes into groups of channels, global pooling and what is computed from it "
            "(squeeze-and-excitation, split attention, global-context attention pooling)")


def is_random_call(op: str, target) -> bool:
    """Whether a call draws random numbers (refused even on constants)."""
    if op == "call_method":
        return target in RANDOM_METHODS
    return op == "call_function" and target in RANDOM_FUNCTIONS
