"""Checks of an input against the streamed module, before any tile runs.

Shared by ``Streaming`` (a tensor) and ``plan`` (a shape): each error names the
quantity or the layer and says what would work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import rules
from ._args import AXIS_NAMES, SHAPES
from .trace import autocasting, layer_tensors, tensor_owner

def expected_ndim(module: nn.Module) -> int | None:
    """Spatial rank implied by the first 1d/2d layer in ``module`` (None if none says)."""
    for m in module.modules():
        for kind, rank in rules.RANK.items():
            if isinstance(m, kind):
                return rank
    return None


def check_shape(module: nn.Module, shape, what: str = "input") -> int:
    """Rank checks of an (N, C, *spatial) shape; returns the number of spatial axes."""
    if len(shape) not in (3, 4):
        start = "Streaming expects an input" if what == "input" else f"{what} must be"
        raise ValueError(f"{start} of shape (N, C, L) or (N, C, H, W), got shape "
                         f"{tuple(shape)} ({len(shape)} dimensions)")
    ndim = len(shape) - 2
    expected = expected_ndim(module)
    if expected is not None and expected != ndim:
        raise ValueError(f"the streamed layers are {expected}-d and expect {what} of shape "
                         f"{SHAPES[expected]}, got shape {tuple(shape)}")
    check_sizes(shape, what)
    return ndim


def check_sizes(shape, what: str = "input") -> None:
    """Sizes a tile loop can cover: N, C >= 0 (an empty batch runs, as in torch) and at
    least one pixel along each spatial axis (an image without pixels has no tiles)."""
    names = ("batch size", "channel count") + AXIS_NAMES[len(shape) - 2]
    negative = [f"{name} {n}" for name, n in zip(names[:2], shape[:2]) if n < 0]
    empty = [f"{name} {n}" for name, n in zip(names[2:], shape[2:]) if n < 1]
    if not negative and not empty:
        return
    start = f"the input has shape {tuple(shape)}:" if what == "input" else \
        f"{what} {tuple(shape)} has"
    why = ("a streamed image needs at least one pixel along each spatial axis" if empty
           else "sizes cannot be negative (an empty batch, 0, is fine)")
    raise ValueError(f"{start} {' and '.join(negative + empty)}; {why}")


def module_device(module: nn.Module) -> torch.device | None:
    """The one device of the module's parameters and buffers (None if it has none). All on
    the meta device is a device (``plan`` can plan such a module); some is an error."""
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    if len(devices) > 1 and torch.device("meta") in devices:
        check_materialised(module)
    if len(devices) > 1:
        raise ValueError(f"the streamed module has parameters or buffers on several devices "
                         f"{sorted(map(str, devices))}; move it to one with .to(device)")
    return devices.pop() if devices else None


def check_materialised(module: nn.Module) -> None:
    """Refuse a module with tensors on the meta device: they have a shape but no data, so
    every tile would compute nothing (torch returns meta tensors, then fails in backward)."""
    meta = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta]
    if not meta:
        return
    names = ", ".join(f"'{n}'" for n in meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3
                                                     else "")
    raise ValueError(
        f"the streamed module has no data: {names} {'is' if len(meta) == 1 else 'are'} on the "
        f"meta device (shapes only, as when built under torch.device('meta')). Materialise it "
        f"first: module.to_empty(device=...) and then initialise its weights (reset_parameters() "
        f"of each layer) or load them (load_state_dict); or load a state dict straight into it "
        f"with module.load_state_dict(state, assign=True)")


def module_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def check_source(module: nn.Module, source, transform=None) -> int:
    """Errors for an input (a source) the module cannot take; returns its spatial rank.

    The input may live on another device than the module (each tile is copied over);
    an integer image needs a ``transform`` that makes each tile floating point.
    """
    ndim = check_shape(module, source.shape)
    check_materialised(module)
    module_device(module)
    if transform is not None:
        return ndim  # the transform decides the dtype the module sees (checked on each tile)
    if not (source.dtype.is_floating_point or source.dtype.is_complex):
        raise TypeError(
            f"the input is {source.dtype}: give Streaming a transform that makes each tile "
            f"floating point on the module's device, e.g. Streaming(module, tile_size, "
            f"transform=lambda t: t.float() / 255)")
    check_input_dtype(module, source.dtype, source.device.type)
    return ndim


def check_input_dtype(module: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """An input the module's torch layers take: their dtype, or any with autocast on."""
    if autocasting(device_type):
        return
    for name, p in layer_tensors(module):
        if p.is_floating_point() and p.dtype != dtype:
            raise TypeError(f"the input is {dtype} but {tensor_owner(module, name)} has "
                            f"{name.rpartition('.')[2]} of dtype {p.dtype}; convert one of them, "
                            f"e.g. x.to({p.dtype}), or pass a transform that does")
