"""When 2D tiles may run in channels-last memory layout.

Channels-last is oneDNN's native layout, and faster on CPUs, but oneDNN's 1x1 strided
convolution on channels-last input computes a wrong weight gradient, spins or corrupts the
heap on AVX2 CPUs when its input channels per group are not a multiple of its channel block
(uxlfoundation/oneDNN#6035; 8 on AVX2, 16 on AVX-512). Such a convolution can be a module
(found by walking the module) or a functional call (found by the trace, which marks its step).
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: The larger of oneDNN's channel blocks (AVX-512's); a multiple of it is one of AVX2's too.
ONEDNN_CHANNEL_BLOCK = 16


def onednn_mishandles(kernel: tuple, stride: tuple, in_per_group: int) -> bool:
    """Whether oneDNN#6035 hits a 2D convolution of this kernel, stride and input channels per
    group in channels-last layout."""
    return (tuple(kernel) == (1, 1) and tuple(stride) != (1, 1)
            and in_per_group % ONEDNN_CHANNEL_BLOCK != 0)


def onednn_unsafe_convs(module: nn.Module, graph=None) -> list[str]:
    """The 2D convolutions oneDNN mishandles in channels-last layout: module paths of
    ``nn.Conv2d`` layers, and, given the module's traced graph, the names of its functional
    convolution steps (``F.conv2d`` calls) that are such."""
    found = [name or type(m).__name__ for name, m in module.named_modules()
             if isinstance(m, nn.Conv2d)
             and onednn_mishandles(m.kernel_size, m.stride, m.in_channels // m.groups)]
    if graph is not None:
        found += [s.name for s in graph.steps if s.channels_last_unsafe]
    return found


def use_channels_last(device: torch.device, dtype: torch.dtype, module: nn.Module | None = None,
                      graph=None) -> bool:
    """Default 2D tile layout: channels-last where oneDNN (CPU) convolves it natively, unless
    the module (or its traced graph) has a convolution oneDNN mishandles in that layout."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and not (module is not None and onednn_unsafe_convs(module, graph)))
