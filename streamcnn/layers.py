"""Which layers can be streamed, and their geometry.

``inspect_layers`` flattens the (possibly nested) ``nn.Sequential`` into its leaf
layers and gives each its per-axis geometry (``Window`` or ``Pointwise``).
Layers that are not local - they mix values across the whole image or change
the grid in ways tiles cannot reproduce - raise ``StreamingError`` naming the
layer, the reason and what to do instead. ``check_modes`` repeats the checks
that depend on ``.train()``/``.eval()``, which can change after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .geometry import Pointwise, Window


class StreamingError(TypeError):
    """A layer that cannot be streamed exactly."""


#: Elementwise layers: each output position depends on that position only.
POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.Identity,
)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
CONV = {nn.Conv1d: 1, nn.Conv2d: 2}
MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2}
AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2}

_MOVE = "move it after the Streaming module (into the part of the network that sees the whole feature map)"

#: Known non-local layers and why they cannot be streamed.
_NON_LOCAL = (
    ((nn.Linear, nn.Bilinear, nn.LazyLinear), "it connects every position of the feature map"),
    ((nn.Flatten, nn.Unflatten), "it reshapes the feature map, mixing space and channels"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d), "adaptive/global pooling looks at the whole feature map"),
    ((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ConvTranspose1d,
      nn.ConvTranspose2d, nn.PixelShuffle, nn.PixelUnshuffle),
     "upsampling is not supported by the tile geometry"),
    ((nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm,
      nn.LocalResponseNorm),
     "it normalises with statistics computed over the feature map, which a tile does not see"),
    ((nn.FractionalMaxPool2d,), "its random pooling regions depend on the whole feature map"),
)


@dataclass(frozen=True)
class Layer:
    """One leaf layer of the streamed module."""

    path: str
    module: nn.Module
    nodes: tuple  # per-axis Window or Pointwise

    @property
    def name(self) -> str:
        return describe(self.path, self.module)


def describe(path: str, module: nn.Module) -> str:
    where = f"'{path}'" if path else "(the module itself)"
    return f"layer {where} ({type(module).__name__})"


def layer_ndim(module: nn.Module) -> int | None:
    """Spatial rank implied by the first 1d/2d layer in ``module`` (None if only pointwise)."""
    for m in module.modules():
        for table in (CONV, MAXPOOL, AVGPOOL):
            if type(m) in table:
                return table[type(m)]
        if isinstance(m, BATCHNORM):
            return 1 if isinstance(m, nn.BatchNorm1d) else 2
    return None


def inspect_layers(module: nn.Module, ndim: int) -> list[Layer]:
    """Leaf layers of ``module`` in execution order, with their geometry on ``ndim`` axes."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"Streaming needs an nn.Module, got {type(module).__name__}")
    layers: list[Layer] = []
    _collect(module, "", ndim, layers)
    return layers


def _collect(module: nn.Module, path: str, ndim: int, out: list[Layer]) -> None:
    if isinstance(module, nn.Sequential):
        if type(module).forward is not nn.Sequential.forward:
            raise StreamingError(
                f"{describe(path, module)} overrides Sequential.forward, so the order of its "
                f"layers is unknown; stream a plain nn.Sequential of supported layers")
        for name, child in module.named_children():
            _collect(child, f"{path}.{name}" if path else name, ndim, out)
        return
    out.append(Layer(path, module, _geometry(module, path, ndim)))


def _geometry(m: nn.Module, path: str, ndim: int) -> tuple:
    name = describe(path, m)
    # exact types: a subclass may override forward with anything
    if type(m) in POINTWISE + DROPOUT + BATCHNORM:
        if isinstance(m, BATCHNORM):
            _check_rank(m, name, 1 if isinstance(m, nn.BatchNorm1d) else 2, ndim)
        return (Pointwise(),) * ndim
    if type(m) in CONV:
        _check_rank(m, name, CONV[type(m)], ndim)
        return _conv_geometry(m, name, ndim)
    if type(m) in MAXPOOL:
        _check_rank(m, name, MAXPOOL[type(m)], ndim)
        if m.return_indices:
            raise StreamingError(
                f"{name} has return_indices=True: its second output (indices into the whole "
                f"feature map) cannot be stitched from tiles; use return_indices=False")
        return _windows(m, ndim, dilation=m.dilation, pads=_pairs(m.padding, ndim), max_pool=True)
    if type(m) in AVGPOOL:
        _check_rank(m, name, AVGPOOL[type(m)], ndim)
        return _windows(m, ndim, dilation=1, pads=_pairs(m.padding, ndim))
    for kinds, why in _NON_LOCAL:
        if isinstance(m, kinds):
            raise StreamingError(f"{name} cannot be streamed: {why}; {_MOVE}")
    raise StreamingError(
        f"{name} is not a layer streamcnn knows how to stream (supported: Conv1d/2d, "
        f"MaxPool1d/2d, AvgPool1d/2d, elementwise activations, Identity, BatchNorm in eval "
        f"mode, Dropout in eval mode, nested nn.Sequential); {_MOVE}")


def _check_rank(m: nn.Module, name: str, layer_ndim: int, ndim: int) -> None:
    if layer_ndim != ndim:
        shape = "(N, C, L)" if ndim == 1 else "(N, C, H, W)"
        raise StreamingError(
            f"{name} works on {layer_ndim}-d feature maps but the input is {ndim}-d {shape}; "
            f"use {ndim}-d layers throughout the streamed module")


def _tuple(v, ndim: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * ndim


def _pairs(padding, ndim: int) -> tuple:
    return tuple((p, p) for p in _tuple(padding, ndim))


def _conv_geometry(m: nn.Conv1d | nn.Conv2d, name: str, ndim: int) -> tuple:
    if m.padding_mode != "zeros":
        raise StreamingError(
            f"{name} uses padding_mode='{m.padding_mode}'; only 'zeros' is streamed exactly "
            f"(other modes read the tile's own edge pixels at interior tile borders); use "
            f"padding_mode='zeros' or move it after the Streaming module")
    # torch stores the actual (possibly asymmetric, for padding='same') padding here,
    # last axis first: (left_W, right_W, left_H, right_H)
    rev = m._reversed_padding_repeated_twice
    pads = tuple((rev[2 * (ndim - 1 - a)], rev[2 * (ndim - 1 - a) + 1]) for a in range(ndim))
    return _windows(m, ndim, dilation=m.dilation, pads=pads)


def _windows(m: nn.Module, ndim: int, dilation, pads, max_pool: bool = False) -> tuple:
    kernel = _tuple(m.kernel_size, ndim)
    stride = _tuple(m.stride if m.stride is not None else m.kernel_size, ndim)
    dilation = _tuple(dilation, ndim)
    ceil = bool(getattr(m, "ceil_mode", False))
    return tuple(
        Window(kernel=kernel[a], stride=stride[a], pad_left=pads[a][0], pad_right=pads[a][1],
               dilation=dilation[a], ceil_mode=ceil, max_pool=max_pool)
        for a in range(ndim))


def check_modes(layers: list[Layer]) -> None:
    """Errors for layers whose training-mode behaviour cannot be streamed."""
    for layer in layers:
        m, name = layer.module, layer.name
        if isinstance(m, BATCHNORM):
            if m.training:
                raise StreamingError(
                    f"{name} is in training mode: it would normalise each tile with that tile's "
                    f"own batch statistics, not the whole image's; call .eval() on it (frozen "
                    f"statistics, as when fine-tuning) after model.train(), or {_MOVE}")
            if m.running_mean is None:
                raise StreamingError(
                    f"{name} has track_running_stats=False, so even in eval mode it normalises "
                    f"with each tile's statistics; use running statistics or {_MOVE}")
        elif isinstance(m, DROPOUT) and m.training and m.p > 0:
            raise StreamingError(
                f"{name} is in training mode: its random mask would be drawn anew for every "
                f"tile and again in the backward recomputation; call .eval() on it or {_MOVE}")
        elif isinstance(m, nn.RReLU) and m.training:
            raise StreamingError(
                f"{name} is in training mode: its random slopes would differ between tiles "
                f"and the backward recomputation; call .eval() on it or {_MOVE}")


def in_place_first(layers: list[Layer]) -> bool:
    """Whether an in-place layer could write into the input tile (a view of the image)."""
    for layer in layers:
        m = layer.module
        if getattr(m, "inplace", False):
            return True
        if not isinstance(m, (nn.Identity,) + DROPOUT):  # these return their input as is
            return False
    return False


def out_channels(layers: list[Layer], in_channels: int) -> int:
    """Channels after the chain (convolutions change them, nothing else does)."""
    c = in_channels
    for layer in layers:
        if isinstance(layer.module, (nn.Conv1d, nn.Conv2d)):
            c = layer.module.out_channels
    return c


def check_channels(layers: list[Layer], in_channels: int) -> None:
    """Clear error when the channels reaching a layer do not fit it."""
    c, source = in_channels, "the input has"
    for layer in layers:
        m = layer.module
        expect = None
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            expect = m.in_channels
        elif isinstance(m, BATCHNORM):
            expect = m.num_features
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            expect = m.num_parameters
        if expect is not None and expect != c:
            raise ValueError(f"{layer.name} expects {expect} channels but {source} {c}")
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            c, source = m.out_channels, f"{layer.name} gives"
