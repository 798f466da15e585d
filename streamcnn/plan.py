"""``plan()``: what streaming will do for one input shape, before doing it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .geometry import chain_rf
from .layers import check_channels, check_modes, in_place_first, inspect_layers, layer_ndim
from .memory import chain_peak, no_grad_peak, probe
from .streaming import AXIS_NAMES, tile_image, use_channels_last


@dataclass(frozen=True)
class StreamPlan:
    """The tiling and memory of streaming one input shape.

    Per-axis tuples follow the spatial axes ((length,) or (height, width)).

    ``tile_starts``/``tile_stops``: each axis' list of tile input intervals; the
    tiles are their product. ``overlap``: input pixels shared by consecutive
    regular tiles (the last tile ends at the image edge and may be shorter, and
    share more or less). ``coverage``: pixels computed over image pixels.
    ``receptive_field``/``output_stride``/``min_tile_size``: see
    :func:`streamcnn.geometry.receptive_field`.

    Memory estimates (bytes), for one training step of the streamed module
    (forward, then backward from a given output gradient), counting tensors only:

    * ``conventional_peak_bytes``: plain autograd on the whole image: the input,
      parameters and buffers, parameter gradients, and the peak of the saved
      activations plus gradients during backward (see :mod:`streamcnn.memory`).
    * ``streaming_peak_bytes``: the larger of the streamed forward (input,
      parameters, stitched output, one tile's no-grad forward) and the streamed
      backward (input, parameters, stitched output, its gradient, the input
      gradient if ``requires_input_grad``, the summed and the current tile's
      parameter gradients, and the same autograd replay as above on the largest
      tile, plus the tile's input copy when it is re-laid out channels-last).
    * ``input_bytes``: the input's share of both (a benchmark that allocates the
      input before measuring should compare its growth with ``peak - input_bytes``).
    * ``tile_working_bytes``: the per-tile part of ``streaming_peak_bytes``; the
      rest scales with the image (input, output, gradients) or is parameters.

    Not counted: allocator caching and fragmentation, convolution workspaces
    (cuDNN/oneDNN, im2col), the network after the streamed part, and the loss.

    Measured on CPU (peak resident memory growth over the input, Fig. 2 network,
    float32, default channels-last tiles, 1024-4096 px images, 128-1024 px tiles):
    1.00-1.06x of ``streaming_peak_bytes - input_bytes``; glibc heap
    fragmentation added up to ~25% with small tiles and ReLUs. Conventional
    training on NCHW float32 measured ~1.55x ``conventional_peak_bytes``: oneDNN
    reorders the activations into blocked layouts (workspaces, not counted).
    float64 convolutions on CPU add im2col buffers of ``in_channels * kernel_area``
    planes.
    """

    input_shape: tuple
    tile_size: tuple
    tiles_per_axis: tuple
    tile_starts: tuple
    tile_stops: tuple
    overlap: tuple
    output_stride: tuple
    output_shape: tuple
    min_tile_size: tuple
    receptive_field: tuple
    dtype: torch.dtype
    requires_input_grad: bool
    streaming_peak_bytes: int
    conventional_peak_bytes: int
    input_bytes: int
    tile_working_bytes: int

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles_per_axis)

    @property
    def coverage(self) -> float:
        """Input pixels the tiles compute, overlap counted each time, over image pixels
        (the forward's share of extra work; the backward recomputes the same again)."""
        covered = [sum(b - a for a, b in zip(s, e)) for s, e in zip(self.tile_starts, self.tile_stops)]
        return math.prod(covered) / math.prod(self.input_shape[2:])

    @property
    def memory_ratio(self) -> float:
        """Conventional peak / streaming peak (> 1: streaming needs less memory)."""
        return self.conventional_peak_bytes / self.streaming_peak_bytes

    def __str__(self) -> str:
        ndim = len(self.tile_size)
        names = AXIS_NAMES[ndim]
        x = "×".join
        lines = [
            f"StreamPlan: input {tuple(self.input_shape)} {str(self.dtype).replace('torch.', '')}"
            f" -> output {tuple(self.output_shape)}",
            f"  receptive field {x(map(str, self.receptive_field))} px, output stride "
            f"{x(map(str, self.output_stride))}, minimum tile {x(map(str, self.min_tile_size))} px",
            f"  tile {x(map(str, self.tile_size))} px: {x(map(str, self.tiles_per_axis))} = "
            f"{self.num_tiles} tile{'s' if self.num_tiles != 1 else ''}, overlap "
            f"{x(map(str, self.overlap))} px, covering {self.coverage:.2f}× the input's pixels",
        ]
        for a in range(ndim):
            lines.append(f"  {names[a]:<6} tile starts {_short(self.tile_starts[a])}")
        lines.append(f"  peak memory, one training step{' (with input gradient)' if self.requires_input_grad else ''}:")
        image_part = self.streaming_peak_bytes - self.tile_working_bytes
        lines.append(f"    streaming     {_bytes(self.streaming_peak_bytes):>10}  (image-sized tensors "
                     f"and parameters {_bytes(image_part)} + one tile {_bytes(self.tile_working_bytes)})")
        lines.append(f"    conventional  {_bytes(self.conventional_peak_bytes):>10}")
        if self.streaming_peak_bytes < self.conventional_peak_bytes:
            lines.append(f"    streaming needs {self.memory_ratio:.1f}× less memory")
        elif self.num_tiles == 1:
            lines.append("    streaming saves no memory here: one tile covers the image, so it only "
                         "adds overhead; use a smaller tile, or train conventionally")
        else:
            lines.append("    streaming saves no memory here: the image-sized tensors it keeps plus one "
                         "tile's work exceed conventional backprop's peak; train conventionally")
        return "\n".join(lines)


def _short(values, keep: int = 4) -> str:
    if len(values) <= 2 * keep:
        return str(list(values))
    head = ", ".join(map(str, values[:keep]))
    tail = ", ".join(map(str, values[-2:]))
    return f"[{head}, ..., {tail}] ({len(values)} tiles)"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def plan(module: nn.Module, input_shape, tile_size, *, dtype: torch.dtype | None = None,
         requires_input_grad: bool = False, channels_last: bool | None = None) -> StreamPlan:
    """Plan streaming ``module`` over inputs of ``input_shape`` with ``tile_size`` tiles.

    ``input_shape``: (N, C, L) or (N, C, H, W). ``dtype``: element type for the
    memory estimates (default: the module's parameters', else float32).
    ``requires_input_grad``: count the input gradient (saliency) too.
    ``channels_last``: as for ``Streaming`` (None: its default for this device and dtype).
    Raises the same errors as ``Streaming`` would for this input.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (3, 4):
        raise ValueError(f"input_shape must be (N, C, L) or (N, C, H, W), got {input_shape}")
    ndim = len(input_shape) - 2
    expected = layer_ndim(module)
    if expected is not None and expected != ndim:
        raise ValueError(f"the streamed layers are {expected}-d but input_shape {input_shape} "
                         f"is {ndim}-d")
    layers = inspect_layers(module, ndim)
    check_modes(layers)
    check_channels(layers, input_shape[1])
    spatial = input_shape[2:]
    tilings = tile_image(layers, spatial, tile_size)
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    own_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    dtype = own_dtype if dtype is None else dtype
    esize = torch.empty((), dtype=dtype).element_size()

    saved, channels = [], [input_shape[1]]
    for layer in layers:  # probed in the module's own dtype; sizes use ``dtype``
        s, c = probe(layer, channels[-1], device, own_dtype)
        saved.append(s)
        channels.append(c)
    n = input_shape[0]

    def activations(lengths):
        """Elements of the input and of every layer's output for these spatial lengths."""
        elems = [n * channels[0] * math.prod(lengths)]
        for i, layer in enumerate(layers):
            lengths = [node.out_length(L) for node, L in zip(layer.nodes, lengths)]
            elems.append(n * channels[i + 1] * math.prod(lengths))
        return elems

    full = activations(spatial)
    tile = activations([min(t.tile_size, t.length) for t in tilings])
    full_bytes = [e * esize for e in full]
    tile_bytes = [e * esize for e in tile]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    param_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    x_bytes, out_bytes = full_bytes[0], full_bytes[-1]

    conventional = x_bytes + param_bytes + grad_bytes + max(
        chain_peak(full_bytes, full, saved, requires_input_grad))
    if channels_last is None:
        channels_last = use_channels_last(torch.empty((1,) * len(input_shape), device=device,
                                                      dtype=dtype))
    # the tile handed to the first layer is a copy when its layout changes or an
    # in-place first layer must not write into the image
    clone = tile_bytes[0] if (channels_last and ndim == 2) or in_place_first(layers) else 0
    fwd_image = x_bytes + param_bytes + out_bytes
    fwd_tile = clone + no_grad_peak(tile_bytes, saved)
    bwd_image = (x_bytes + param_bytes + 2 * out_bytes + 2 * grad_bytes
                 + (x_bytes if requires_input_grad else 0))
    bwd_tile = clone + max(chain_peak(tile_bytes, tile, saved, requires_input_grad))
    image_part, tile_part = max((fwd_image, fwd_tile), (bwd_image, bwd_tile), key=sum)
    rfs = [chain_rf([layer.nodes[a] for layer in layers]) for a in range(ndim)]
    return StreamPlan(
        input_shape=input_shape,
        tile_size=tuple(t.tile_size for t in tilings),
        tiles_per_axis=tuple(len(t.starts) for t in tilings),
        tile_starts=tuple(list(t.starts) for t in tilings),
        tile_stops=tuple(list(t.stops) for t in tilings),
        overlap=tuple(t.overlap for t in tilings),
        output_stride=tuple(rf.stride for rf in rfs),
        output_shape=(n, channels[-1]) + tuple(t.out_length for t in tilings),
        min_tile_size=tuple(t.min_tile_size for t in tilings),
        receptive_field=tuple(rf.size for rf in rfs),
        dtype=dtype,
        requires_input_grad=requires_input_grad,
        streaming_peak_bytes=int(image_part + tile_part),
        conventional_peak_bytes=int(conventional),
        input_bytes=int(x_bytes),
        tile_working_bytes=int(tile_part),
    )
