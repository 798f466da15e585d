"""``Streaming``: run a local CNN front end tile by tile, forward and backward.

Forward (no graph): every tile of the input goes through the user's own module;
each tile's output is cropped to the part it owns (inside its valid outputs)
and written into a preallocated output. Only the input is saved for backward.

Backward (gradient checkpointing, one tile at a time): each tile is recomputed
with grad enabled, its owned output is backpropagated with the matching slice
of the output gradient, and the parameter and input gradients of all tiles are
summed. The owned regions partition the output and every owned value is a
function of its tile alone, so by linearity the sums equal conventional
backprop's gradients (paper Eqs. 5-7).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from .geometry import AxisTiling, tile_axis
from .layers import (Layer, check_channels, check_modes, in_place_first, inspect_layers,
                     layer_ndim)

AXIS_NAMES = {1: ("length",), 2: ("height", "width")}


@dataclass(frozen=True)
class Tile:
    """Index tuples for one tile: its input, its output crop, and where that goes."""

    inp: tuple
    crop: tuple
    out: tuple
    out_shape: tuple  # spatial shape of the tile's uncropped output


def iter_tiles(tilings: tuple[AxisTiling, ...]):
    """All tiles: the product of the per-axis tilings, row-major."""
    every = (slice(None), slice(None))
    for idx in itertools.product(*(range(len(t.starts)) for t in tilings)):
        yield Tile(
            inp=every + tuple(slice(t.starts[i], t.stops[i]) for t, i in zip(tilings, idx)),
            crop=every + tuple(slice(t.own_starts[i] - t.out_starts[i],
                                     t.own_stops[i] - t.out_starts[i])
                               for t, i in zip(tilings, idx)),
            out=every + tuple(slice(t.own_starts[i], t.own_stops[i])
                              for t, i in zip(tilings, idx)),
            out_shape=tuple(t.out_stops[i] - t.out_starts[i] for t, i in zip(tilings, idx)),
        )


def normalize_tile_size(tile_size, ndim: int) -> tuple[int, ...]:
    if isinstance(tile_size, bool):
        raise TypeError(f"tile_size must be an int or a tuple of ints, got {tile_size!r}")
    if isinstance(tile_size, int):
        sizes = (tile_size,) * ndim
    elif isinstance(tile_size, (tuple, list)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in tile_size):
        sizes = tuple(tile_size)
        if len(sizes) != ndim:
            raise ValueError(f"tile_size {tile_size!r} has {len(sizes)} entries but the input "
                             f"has {ndim} spatial axes {AXIS_NAMES[ndim]}")
    else:
        raise TypeError(f"tile_size must be an int or a tuple of ints, got {tile_size!r}")
    for s in sizes:
        if s < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size!r}")
    return sizes


def tile_image(layers: list[Layer], spatial: tuple[int, ...], tile_size) -> tuple[AxisTiling, ...]:
    """Per-axis tilings of an image with spatial shape ``spatial``."""
    ndim = len(spatial)
    sizes = normalize_tile_size(tile_size, ndim)
    return tuple(
        tile_axis([layer.nodes[a] for layer in layers], spatial[a], sizes[a], AXIS_NAMES[ndim][a])
        for a in range(ndim))


class _TileRunner:
    """Runs the module over the tiles of one input shape."""

    def __init__(self, module: nn.Module, layers: list[Layer], tilings, progress: bool,
                 channels_last: bool):
        self.module = module
        self.tilings = tilings
        self.out_spatial = tuple(t.out_length for t in tilings)
        self.clone_input = in_place_first(layers)
        self.channels_last = channels_last
        self.progress = progress

    def tiles(self, what: str):
        tiles = iter_tiles(self.tilings)
        if not self.progress:
            return tiles
        from tqdm.auto import tqdm
        total = 1
        for t in self.tilings:
            total *= len(t.starts)
        return tqdm(tiles, total=total, desc=f"streaming {what}", unit="tile", leave=False)

    def layout(self, view: torch.Tensor) -> torch.Tensor:
        """The tensor the first layer gets for a tile (a view of the image, or a copy)."""
        if self.channels_last:
            tile = view.contiguous(memory_format=torch.channels_last)
            if tile is view and self.clone_input:
                tile = view.clone(memory_format=torch.channels_last)
            return tile
        # an in-place first layer must not write into the image
        return view.clone() if self.clone_input else view

    def run_tile(self, view: torch.Tensor, tile: Tile) -> torch.Tensor:
        tile_input = self.layout(view)
        y = self.module(tile_input)
        if tuple(y.shape[2:]) != tile.out_shape:
            raise RuntimeError(
                f"a tile of shape {tuple(view.shape)} gave an output of shape "
                f"{tuple(y.shape)}, expected spatial shape {tile.out_shape}: a layer does not "
                f"behave like its declared geometry")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stitched output, computed without building a graph."""
        out = None
        with torch.no_grad():
            for tile in self.tiles("forward"):
                y = self.run_tile(x[tile.inp], tile)
                if out is None:
                    out = y.new_empty(y.shape[:2] + self.out_spatial)
                out[tile.out] = y[tile.crop]
                del y
        return out

    def backward(self, x, grad_out, need_x: bool, params: list[torch.Tensor]):
        """Input gradient (or None) and the summed gradient of each of ``params``."""
        grad_x = torch.zeros_like(x) if need_x else None
        sums: list = [None] * len(params)
        for tile in self.tiles("backward"):
            leaf = x[tile.inp].detach()
            with torch.enable_grad():
                if need_x:
                    leaf.requires_grad_(True)
                y = self.run_tile(leaf, tile)
                wrt = ([leaf] if need_x else []) + params
                grads = torch.autograd.grad(y[tile.crop], wrt, grad_out[tile.out],
                                            allow_unused=True)
            del y
            if need_x:
                grad_x[tile.inp] += grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:  # (own the first: a gradient may alias grad_out)
                    sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)
            del grads
        return grad_x, sums


class _StreamFunction(torch.autograd.Function):
    """Autograd node for the whole streamed module: saves only its input."""

    @staticmethod
    def forward(ctx, runner: _TileRunner, x: torch.Tensor, *params: torch.Tensor):
        ctx.runner = runner
        ctx.params = params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        return runner.forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # the engine enables grad mode exactly for create_graph=True
            raise RuntimeError(
                "Streaming does not support higher-order gradients (backward or autograd.grad "
                "with create_graph=True, e.g. gradient penalties): its backward recomputes tiles "
                "outside the graph. Use create_graph=False, or the unstreamed module")
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            grad_x, sums = ctx.runner.backward(x, grad_out, need_x,
                                               [ctx.params[i] for i in wanted])
        param_grads = [None] * len(ctx.params)
        for i, g in zip(wanted, sums):
            param_grads[i] = g
        return (None, grad_x, *param_grads)


def _autocast_state(device_type: str):
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (RuntimeError, AttributeError):  # device without autocast support
        return device_type, False, None


class Streaming(nn.Module):
    """Wrap a local CNN front end so it runs tile by tile, forward and backward.

    ``Streaming(features, tile_size)(x)`` equals ``features(x)`` and backpropagates
    the same gradients to ``features``' parameters and to ``x``, but never holds an
    activation of the whole image: memory is set by the tile, plus the input, the
    stitched output, its gradient and (if ``x.requires_grad``) the input gradient.

    Args:
        module: an ``nn.Sequential`` (possibly nested) of supported layers:
            Conv1d/2d (padding_mode='zeros'), MaxPool1d/2d, AvgPool1d/2d, elementwise
            activations, Identity, BatchNorm1d/2d in eval mode, Dropout in eval mode.
        tile_size: edge of the input tile in pixels, overlap included; an int or one
            int per spatial axis. Use :meth:`plan` to see the tiles and memory.
        progress: show a tqdm bar over the tiles of each forward and backward.
        channels_last: give each 2D tile to the module in channels-last memory layout.
            The default (None) does so on CPU for float32/bfloat16, where oneDNN then
            convolves about twice as fast and without reordering copies; the values
            are the same up to floating-point summation order.

    Inputs are ``(N, C, L)`` or ``(N, C, H, W)``. The tiles run through the user's
    own layer modules, so forward hooks fire once per tile in the forward pass and
    again per tile in the backward recomputation. An in-place first layer writes
    into a copy of each tile, never into ``x``. Higher-order gradients
    (``create_graph=True``) raise an error.
    """

    def __init__(self, module: nn.Module, tile_size, *, progress: bool = False,
                 channels_last: bool | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"Streaming needs an nn.Module, got {type(module).__name__}")
        ndim = layer_ndim(module)
        layers = inspect_layers(module, ndim or 2)  # structural errors early
        if not layers:
            raise ValueError("the streamed module has no layers")
        if ndim is not None:  # else the input's rank decides, checked in forward
            normalize_tile_size(tile_size, ndim)
        self.module = module
        self.tile_size = tile_size
        self.progress = progress
        self.channels_last = channels_last

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}"

    def prepare(self, x: torch.Tensor):
        """Validate ``x`` against the module and return (layers, per-axis tilings)."""
        layers = check_input(self.module, x)
        return layers, tile_image(layers, tuple(x.shape[2:]), self.tile_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, tilings = self.prepare(x)
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = use_channels_last(x)
        runner = _TileRunner(self.module, layers, tilings, self.progress,
                             channels_last and x.dim() == 4)
        params = tuple(self.module.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _StreamFunction.apply(runner, x, *params)
        return runner.forward(x)

    def plan(self, input_shape, **kwargs):
        """``streamcnn.plan(self.module, input_shape, self.tile_size, **kwargs)``."""
        from .plan import plan
        return plan(self.module, input_shape, self.tile_size, **kwargs)


def use_channels_last(x: torch.Tensor) -> bool:
    """Default tile layout: channels-last where oneDNN (CPU) convolves it natively."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def check_input(module: nn.Module, x: torch.Tensor) -> list[Layer]:
    """Errors for inputs the module cannot take; returns the module's layers."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Streaming expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"Streaming expects an input of shape (N, C, L) or (N, C, H, W), got "
                         f"shape {tuple(x.shape)} ({x.dim()} dimensions)")
    ndim = x.dim() - 2
    expected = layer_ndim(module)
    if expected is not None and expected != ndim:
        shape = "(N, C, L)" if expected == 1 else "(N, C, H, W)"
        raise ValueError(f"the streamed layers are {expected}-d and expect input of shape "
                         f"{shape}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"the input must be a floating-point tensor, got {x.dtype}")
    layers = inspect_layers(module, ndim)
    check_modes(layers)
    check_channels(layers, x.shape[1])
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    for layer in layers:
        for name, p in itertools.chain(layer.module.named_parameters(recurse=False),
                                       layer.module.named_buffers(recurse=False)):
            if p.device != x.device:
                raise ValueError(f"the input is on {x.device} but {layer.name} has {name} on "
                                 f"{p.device}; move the module or the input with .to(device)")
            if p.is_floating_point() and p.dtype != x.dtype and not autocast:
                raise TypeError(f"the input is {x.dtype} but {layer.name} has {name} of dtype "
                                f"{p.dtype}; convert one of them, e.g. x.to({p.dtype})")
    return layers
