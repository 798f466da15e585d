"""Checks of an input against the streamed module, before any tile runs.

Shared by ``Streaming`` (a tensor) and ``plan`` (a shape): each error names the
quantity or the layer and says what would work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._args import SHAPES
from .trace import describe_layer

#: layer types that fix the spatial rank of their input
_RANK = {nn.Conv1d: 1, nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.BatchNorm1d: 1,
         nn.Conv2d: 2, nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.BatchNorm2d: 2}


def expected_ndim(module: nn.Module) -> int | None:
    """Spatial rank implied by the first 1d/2d layer in ``module`` (None if none says)."""
    for m in module.modules():
        for kind, rank in _RANK.items():
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
    return ndim


def check_tensor(module: nn.Module, x) -> int:
    """Errors for a tensor the module cannot take; returns the number of spatial axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Streaming expects a torch.Tensor, got {type(x).__name__}")
    ndim = check_shape(module, tuple(x.shape))
    if not x.is_floating_point():
        raise TypeError(f"the input must be a floating-point tensor, got {x.dtype}")
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p.device != x.device:
            raise ValueError(f"the input is on {x.device} but {_owner(module, name)} has "
                             f"{_attr(name)} on {p.device}; move the module or the input with "
                             f".to(device)")
        if p.is_floating_point() and p.dtype != x.dtype and not autocast:
            raise TypeError(f"the input is {x.dtype} but {_owner(module, name)} has {_attr(name)} "
                            f"of dtype {p.dtype}; convert one of them, e.g. x.to({p.dtype})")
    return ndim


def _owner(module: nn.Module, name: str) -> str:
    path = name.rpartition(".")[0]
    return describe_layer(path, type(module.get_submodule(path)).__name__)


def _attr(name: str) -> str:
    return name.rpartition(".")[2]
