"""``plan()`` and ``receptive_field()``: what streaming will do for one input shape,
before doing it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

from ._args import AXIS_NAMES, normalize_shape, normalize_tile_size
from .geometry import AxisReceptiveField, Span, axis_receptive_field, fields, lengths, spans
from .errors import StreamingError
from .inputs import check_input_dtype, check_shape, module_device, module_dtype
from .memory import graph_peak, no_grad_peak, probe
from .rules import Global
from .norms import levels, norm_calls
from .keeping import tiles_kept
from . import reuse as _reuse
from . import checkpoints as _checkpoints
from .strips import check_strip_options, exact_steps, reuse_axes, strip_weights, why_not
from .tiling import count
from .trace import analyse, analyse_structure


def receptive_field(module: nn.Module, ndim: int, tile_size=None, *,
                    channels: int | None = None) -> tuple[AxisReceptiveField, ...]:
    """Per-axis receptive field, output stride and interior-tile invalid borders.

    ``module``: the streamed module (traced as ``Streaming`` traces it, every layer
    taken in eval mode); ``ndim``: 1 for (N, C, L) inputs, 2 for (N, C, H, W);
    ``tile_size``: optional int or per-axis tuple, the input tile edge in pixels;
    ``channels``: the input's channel count, where the module's operations need it.
    ``layers`` lists every step of the traced graph. The receptive field of a
    graph is the hull over all its paths. For a module that returns several feature maps,
    the output is a step after them on their common grid (``trace.common_grid``, last in
    ``layers``): stride the least common multiple of theirs, field that of the map needing
    the longest tile.

    Example: three 3x3 convolutions with padding 1 have ``size=7, stride=1,
    offset=3``; an interior 32-pixel tile gives 32 outputs of which 3 at each
    side are invalid.
    """
    graph = analyse_structure(module, ndim, channels)
    sizes = normalize_tile_size(tile_size, ndim) if tile_size is not None else (None,) * ndim
    return tuple(axis_receptive_field(graph.axis(a), sizes[a]) for a in range(ndim))


@dataclass(frozen=True)
class StepPlan:
    """One step of the traced graph at the planned input size."""

    name: str
    kind: str  # "input", "window", "pointwise", "merge", "upsample" or "norm"
    inputs: tuple[int, ...]
    shape: tuple  # (N, C, *spatial) of its output on the whole image (C: None if unknown)
    receptive_field: tuple  # per axis, on the input
    stride: tuple  # per axis, total stride from the input


@dataclass(frozen=True)
class StripChoice:
    """Reused overlaps under one ``strip_budget``: the steps keeping strips, the strips'
    bytes, and the positions computed per pass over the maps' (as ``reuse_factor``)."""

    label: str  # the budget ("None": every step)
    budget: int | None
    steps: int
    strip_bytes: int
    factor: float


@dataclass(frozen=True)
class StreamPlan:
    """The tiling and memory of streaming one input shape.

    Per-axis tuples follow the spatial axes ((length,) or (height, width)).

    ``tile_starts``/``tile_stops``: each axis' list of tile input intervals; the
    tiles are their product. ``overlap``: input pixels shared by consecutive
    regular tiles (the last tile ends at the image edge and may be shorter, and
    share more or less). ``coverage``: pixels computed over image pixels.
    ``receptive_field``/``output_stride``/``min_tile_size``: see
    :func:`streamcnn.receptive_field` (the output stride is a ``Fraction`` below 1 where the
    output is finer than the input). ``tile_grid``: tiles start at multiples of it, where
    every map of the graph has a position (the output stride, or an encoder-decoder's
    deepest stride). ``steps``: the traced graph, one
    :class:`StepPlan` per step (``step_table()`` prints them).

    A module that returns a structure of feature maps (tuples, lists, dicts) has
    ``output_shape`` and ``output_stride`` in that structure, one shape and one per-axis
    stride per map, and ``outputs`` lists them as ``(path, shape, stride)``, ``path`` as
    ``torch.utils._pytree.keystr`` writes it (``"['layer2']"``); ``receptive_field`` is
    then the largest map's. (``outputs`` is empty for one bare feature map.)

    Memory estimates (bytes), for one training step of the streamed module
    (forward, then backward from a given output gradient), counting tensors only.
    ``device_peak_bytes`` is the peak on the module's device (``device``); the image
    lives there too unless ``input_location`` is ``"host"`` (a tensor on another
    device: ``host_bytes`` holds it and its gradient) or ``"array"`` (read tile by
    tile, never held). ``streaming_peak_bytes`` adds the two:

    * ``conventional_peak_bytes``: plain autograd on the whole image: the input,
      parameters and buffers, parameter gradients, and the peak of the saved
      activations plus gradients during backward (see :mod:`streamcnn.memory`).
    * ``streaming_peak_bytes``: the larger of the streamed forward (input,
      parameters, stitched output, one tile's no-grad forward) and the streamed
      backward (input, parameters, stitched output, its gradient, the input
      gradient if ``requires_input_grad``, the summed and the current tile's
      parameter gradients, and the same autograd replay as above on the largest
      tile, plus the copy of the tile's input that the module is given).
    * ``pixel_loss_peak_bytes``: a :meth:`Streaming.pixel_loss` step, each tile's forward
      followed at once by its backward: the input (and its gradient), parameters, the
      summed and the current tile's parameter gradients, and one tile's autograd replay;
      no stitched output, no output gradient (the target is the caller's).
    * ``inference_peak_bytes``: the streamed forward under ``torch.no_grad()``: the input,
      parameters, the stitched output (``out_bytes``; none where ``out=`` writes it into an
      array) and one tile's no-grad forward.
    * ``input_bytes``: the input's share of both (a benchmark that allocates the
      input before measuring should compare its growth with ``peak - input_bytes``).
    * ``tile_working_bytes``: the per-tile part of ``streaming_peak_bytes``; the
      rest scales with the image (input, output, gradients) or is parameters.

    Not counted: allocator caching and fragmentation, convolution workspaces
    (cuDNN/oneDNN, im2col), the network after the streamed part, and the loss.

    Measured on CPU (peak resident memory growth over the input, float32, default
    channels-last tiles, glibc's mmap threshold fixed so that freed buffers are
    unmapped at once): 1.00-1.02x of the estimate less ``input_bytes`` for the
    Fig. 2 network (1024-16384 px images, 128-2048 px tiles), 0.88-0.99x for
    ResNet-34 through layer3 (1024-16384 px, tiles 1280-2800), streamed or not
    (``verify/test_plan_memory.py``). With glibc's defaults, buffers under its
    adaptive mmap threshold (up to 32 MiB), and larger ones that fit a freed hole,
    come from the heap, which keeps freed memory resident and fragments; that is
    not modelled, as it depends on the order of every allocation torch makes. The
    peak was then 1.00-1.13x for the Fig. 2 network, and for ResNet-34 1.25-1.41x
    where its activations are all under 32 MiB (tiles 1280 and 1536 px, or a
    1024 px image), 1.03-1.15x elsewhere. Conventional
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
    steps: tuple = ()
    input_dtype: torch.dtype | None = None
    input_location: str = "device"
    device: str = "cpu"
    device_peak_bytes: int = 0
    host_bytes: int = 0
    norms: int = 0  # normalisations streamed with whole-image statistics
    norm_levels: int = 0  # their levels: one more statistics pass forward and backward each
    forward_passes: int = 1  # streamed passes over the tiles, forward (statistics + the forward)
    backward_passes: int = 1  # and backward (whole-map gradient terms + the backward)
    kept_tiles: int = 0  # the forward's last tiles that keep their graphs (keep_graphs)
    global_steps: int = 0  # reductions over the whole map (squeeze-and-excitation's pooling)
    tile_grid: tuple = ()
    pixel_loss_peak_bytes: int = 0
    inference_peak_bytes: int = 0
    out_bytes: int = 0
    outputs: tuple = ()  # (path, shape, stride) of each output map of a structured output
    checkpoint_bytes: int = 0  # level checkpoints' stored maps (streamcnn.checkpoints)
    checkpoint_time_factor: float | None = None  # a step's estimated time factor with them
    overlap_mode: str = "recompute"  # how the tiles' overlap is handled (Streaming's overlap=)
    recompute_factor: float = 1.0  # positions computed per pass over the maps' positions
    reuse_factor: float | None = None  # the same reusing overlaps (None: the graph cannot)
    strip_bytes: int = 0  # reused overlaps' activation strips (their gradients: as much again)
    reuse_refusal: str | None = None  # why the overlaps cannot be reused, or None
    strip_budget: int | None = None  # Streaming's strip_budget (None: strips at every step)
    strip_memory: str = "device"  # where the strips live ("device" or "host")
    strip_steps: tuple = ()  # the steps keeping strips under the budget (all: every step)
    strip_choices: tuple = ()  # StripChoice per budget: all steps, 1/2, 1/4, 1/8 of their bytes, 0

    @property
    def reuse_time_factor(self) -> float | None:
        """A step's time over conventional backprop's with reused overlaps (F + F + B ~ 4F per
        pass against F + B ~ 3F, the positions computed per pass ``reuse_factor``), None where
        the graph cannot reuse them."""
        return None if self.reuse_factor is None else 4 * self.reuse_factor / 3

    @property
    def time_factor(self) -> float:
        """Upper bound on the time of a training step over one with frozen statistics: a
        backward pass (recompute and backpropagate) costs about three forwards, and every
        statistics pass at most a whole pass (those forward stop after their level)."""
        return (self.forward_passes + 3 * self.backward_passes) / 4

    @property
    def pixel_loss_time_factor(self) -> float:
        """The same bound for a :meth:`Streaming.pixel_loss` step over one without whole-map
        steps, whose one pass (a forward and its backward) costs about three forwards: each
        level adds a statistics pass (a forward at most) and a backward-terms pass (three)."""
        return (4 * self.norm_levels + 3) / 3

    @property
    def recommended_overlap(self) -> str:
        """``"reuse"`` where the graph allows it, the overlap is worth it (recomputing computes
        at least a quarter more: reuse's copies cost about that much in the benchmarks,
        reports/BENCH.md), and the peak with its strips (and their gradients) stays below
        conventional backprop's; else ``"recompute"``."""
        if self.reuse_factor is None or self.recompute_factor < 1.25 * self.reuse_factor:
            return "recompute"
        extra = 0 if self.overlap_mode == "reuse" else 2 * self.strip_bytes  # (else counted)
        return "reuse" if self.streaming_peak_bytes + extra < self.conventional_peak_bytes \
            else "recompute"

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
            f"StreamPlan: input {tuple(self.input_shape)} {_name(self.input_dtype or self.dtype)}"
            + (f" ({_name(self.dtype)} activations)" if self.input_dtype not in (None, self.dtype) else "")
            + (f" -> output {tuple(self.output_shape)}" if not self.outputs else
               f" -> {len(self.outputs)} outputs")]
        lines += [f"    {path} {tuple(shape)}, output stride {x(map(str, stride))}"
                  for path, shape, stride in self.outputs]
        stride = "" if self.outputs else f", output stride {x(map(str, self.output_stride))}"
        lines += [
            f"  receptive field {x(map(str, self.receptive_field))} px{stride}, minimum tile "
            f"{x(map(str, self.min_tile_size))} px"
            + (f", tiles start on a {x(map(str, self.tile_grid))} px grid"
               if self.tile_grid and self.tile_grid != self.output_stride else ""),
            f"  tile {x(map(str, self.tile_size))} px: {x(map(str, self.tiles_per_axis))} = "
            f"{self.num_tiles} tile{'s' if self.num_tiles != 1 else ''}, overlap "
            f"{x(map(str, self.overlap))} px, covering {self.coverage:.2f}× the input's pixels",
        ]
        for a in range(ndim):
            lines.append(f"  {names[a]:<6} tile starts {_short(self.tile_starts[a])}")
        lines.append(f"  peak memory, one training step{' (with input gradient)' if self.requires_input_grad else ''}:")
        image_part = self.device_peak_bytes - self.tile_working_bytes
        where = f" on {self.device}" if self.input_location != "device" else ""
        lines.append(f"    streaming     {_bytes(self.device_peak_bytes):>10}{where}  (image-sized tensors "
                     f"and parameters {_bytes(image_part)} + one tile {_bytes(self.tile_working_bytes)})")
        if self.input_location == "host":
            lines.append(f"                  + {_bytes(self.host_bytes)} in host memory (the input"
                         f"{' and its gradient' if self.requires_input_grad else ''})")
        elif self.input_location == "array":
            lines.append("                  + the input, read tile by tile from its array (never "
                         "held in memory)")
        lines.append(f"    conventional  {_bytes(self.conventional_peak_bytes):>10}")
        if self.streaming_peak_bytes < self.conventional_peak_bytes:
            lines.append(f"    streaming needs {self.memory_ratio:.1f}× less memory")
        elif self.num_tiles == 1:
            lines.append("    streaming saves no memory here: one tile covers the image, so it only "
                         "adds overhead; use a smaller tile, or train conventionally")
        else:
            lines.append("    streaming saves no memory here: the image-sized tensors it keeps plus one "
                         "tile's work exceed conventional backprop's peak; train conventionally")
        lines.append(f"  peak memory, a pixel_loss step: {_bytes(self.pixel_loss_peak_bytes)} (each tile's "
                     f"forward then its backward; no stitched output)")
        lines.append(f"  peak memory, inference (no grad): {_bytes(self.inference_peak_bytes)}, of which "
                     f"the stitched output {_bytes(self.out_bytes)} (none with out= an array)")
        lines += self._overlap_lines() + self._norm_lines() + self._kept_lines()
        return "\n".join(lines)

    def _overlap_lines(self) -> list[str]:
        # a step costs about F (forward) + F (recomputation) + B (backward, ~2F) = 4/3 (F + B)
        lines = [f"  overlap between tiles (this plan: overlap={self.overlap_mode!r}, recommended: "
                 f"{self.recommended_overlap!r}):",
                 f"    recomputed: each map computed {self.recompute_factor:.2f}x per pass, a step "
                 f"about {4 * self.recompute_factor / 3:.1f}x conventional time"]
        if self.reuse_factor is None:
            lines.append(f"    reused: cannot run here: {self.reuse_refusal}")
            return lines
        where = " in host memory" if self.strip_memory == "host" else ""
        budget = "" if self.strip_budget is None else (
            f" (strip_budget {_bytes(self.strip_budget)}: strips at {len(self.strip_steps)} of "
            f"{len(self.steps) - 1} steps)")
        lines.append(f"    reused: {self.reuse_factor:.2f}x, about {self.reuse_time_factor:.1f}x, "
                     f"for {_bytes(self.strip_bytes)} of strips{where}{budget} (and up to as much "
                     f"again for their gradients in the backward"
                     f"{', counted above' if self.overlap_mode == 'reuse' else ''})")
        if self.strip_choices:
            lines.append("    strip_budget   strips at    strip bytes   computed per pass   step time")
            lines += [f"    {c.label:<14} {c.steps:>4} steps {_bytes(c.strip_bytes):>14} "
                      f"{c.factor:>17.2f}x {4 * c.factor / 3:>10.1f}x" for c in self.strip_choices]
        return lines

    def _kept_lines(self) -> list[str]:
        if not self.kept_tiles:
            return []
        # a step costs about F (forward) + F (recomputation) + 2F (backward): each kept tile
        # saves its share of one recomputation
        saved = self.kept_tiles / self.num_tiles / 4
        return [f"  keep_graphs: the last {self.kept_tiles} of {self.num_tiles} tiles keep their graphs "
                f"(up to {_bytes(self.kept_tiles * self.tile_working_bytes)} more, counted above); the "
                f"backward does not recompute them, about {100 * saved:.0f}% of the step"]

    def _norm_lines(self) -> list[str]:
        if not self.norms and not self.global_steps:
            return []
        what = [f"{self.norms} normalisation{'s' if self.norms != 1 else ''} with whole-image "
                f"statistics (BatchNorm in training mode, GroupNorm, InstanceNorm)"] if self.norms else []
        what += [f"{self.global_steps} global step{'s' if self.global_steps != 1 else ''} (pooling "
                 f"over the whole map: squeeze-and-excitation, GRN)"] if self.global_steps else []
        lines = [f"  {' and '.join(what)} in {self.norm_levels} "
                 f"level{'s' if self.norm_levels != 1 else ''}: {self.forward_passes} forward and "
                 f"{self.backward_passes} backward passes over the tiles,",
                 f"    up to {self.time_factor:.1f}× the time of a step with frozen statistics "
                 f"(a pixel_loss step: {self.pixel_loss_time_factor:.1f}× one without them)"]
        if self.checkpoint_time_factor is not None:
            lines.append(f"    with level checkpoints (each pass starts at the maps its level "
                         f"begins at, {_bytes(self.checkpoint_bytes)} stored): about "
                         f"{self.checkpoint_time_factor:.1f}×")
        if (self.checkpoint_time_factor or self.time_factor) > 4:
            lines.append("    that is many passes: to avoid them, freeze BatchNorm's statistics (call "
                         ".eval() on its layers after model.train(), as the prostate paper did)")
        return lines

    def step_table(self) -> str:
        """The traced graph, one line per step: kind, output shape, receptive field, stride."""
        x = "×".join
        rows = [f"{'#':>3}  {'kind':<9} {'output shape':<24} {'rf':>9} {'stride':>7}  step (inputs)"]
        for i, s in enumerate(self.steps):
            shape = "(" + ", ".join("?" if d is None else str(d) for d in s.shape) + ")"
            inputs = f" <- {', '.join(map(str, s.inputs))}" if s.inputs else ""
            rows.append(f"{i:>3}  {s.kind:<9} {shape:<24} {x(map(str, s.receptive_field)):>9} "
                        f"{x(map(str, s.stride)):>7}  {s.name}{inputs}")
        return "\n".join(rows)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
         requires_input_grad: bool = False, input_dtype: torch.dtype | None = None,
         input_device=None, transform=None, keep_graphs: int | None = 0,
         checkpoints="auto", overlap: str = "recompute", strip_budget: int | None = None,
         strip_memory: str = "device") -> StreamPlan:
    """Plan streaming ``module`` over inputs of ``input_shape`` with ``tile_size`` tiles.

    ``input_shape``: (N, C, L) or (N, C, H, W), channels-first. ``dtype``: element type
    of the activations (default: the module's parameters', else float32).
    ``input_dtype``: the image's element type (default ``dtype``; e.g. ``torch.uint8``
    for a slide, with a ``transform``). ``input_device``: where the image is - None for
    the module's device, another device (e.g. ``"cpu"`` for a host tensor while the
    module is on a GPU), or ``"array"`` for an array read tile by tile (a memmap, zarr,
    h5py). ``requires_input_grad``: count the input gradient (saliency) too.
    ``transform``, ``keep_graphs``, ``checkpoints``, ``overlap``, ``strip_budget``,
    ``strip_memory``: as for ``Streaming`` (the kept graphs' memory is in the peak, each
    tile's as ``tile_working_bytes``; the checkpoints' stored maps are ``checkpoint_bytes``,
    in host memory or files, not in the peak; reused overlaps' strips and their gradients,
    twice ``strip_bytes``, in the peak of their memory; ``strip_choices`` lists other
    budgets). Raises the same errors as ``Streaming`` would for
    this input. ``str()`` of the result summarises it; ``.step_table()`` lists the
    traced graph step by step.
    """
    input_shape = normalize_shape(input_shape)
    ndim = check_shape(module, input_shape, "input_shape")
    device = module_device(module) or torch.device("cpu")
    own_dtype = module_dtype(module) or torch.float32
    dtype = own_dtype if dtype is None else dtype
    input_dtype = dtype if input_dtype is None else input_dtype
    location = _location(input_device, device)
    if requires_input_grad and not input_dtype.is_floating_point:
        raise ValueError(f"an input of dtype {input_dtype} cannot require a gradient (only "
                         f"floating-point tensors can); a saliency map needs a float image")
    if requires_input_grad and location == "array":
        raise ValueError("an array read tile by tile cannot require a gradient; pass a "
                         "floating-point tensor that requires grad for a saliency map")
    if transform is None and (input_dtype.is_floating_point or input_dtype.is_complex):
        check_input_dtype(module, input_dtype, device.type)  # (a transform's: in the probe)
    n, channels, spatial = input_shape[0], input_shape[1], input_shape[2:]
    graph = analyse(module, ndim, channels, batch=n, dtype=input_dtype, device=device,
                    transform=transform)
    tilings, cuts = _checkpoints.tile(
        graph, spatial, tile_size, tuple(i for i, s in enumerate(graph.steps) if s.norm is not None),
        _checkpoints.check_storage(checkpoints))
    memory = probe(graph, channels, device, own_dtype, spatial, input_dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    in_size = torch.empty((), dtype=input_dtype).element_size()

    def activations(axis_lengths):
        """Bytes of every step's output for these per-axis input lengths."""
        per_axis = [lengths(graph.axis(a), L) for a, L in enumerate(axis_lengths)]
        return [int(round(n * m.elements_per_position * math.prod(ls[i] for ls in per_axis)))
                * esize for i, m in enumerate(memory)]

    full = activations(spatial)
    tile = activations([min(t.tile_length, t.length) for t in tilings])
    pixels = n * channels * math.prod(spatial)
    tile_pixels = n * channels * math.prod(min(t.tile_length, t.length) for t in tilings)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    param_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    x_bytes, out_bytes = pixels * in_size, sum(full[i] for i in graph.maps)
    input_grad_bytes = x_bytes if requires_input_grad else 0
    conventional = (full[0] + param_bytes + grad_bytes
                    + max(graph_peak(graph, memory, full, requires_input_grad)))
    # the pipeline gets a fresh tile (a copy, on the module's device) of the input
    copy = tile[0] + (tile_pixels * in_size if location != "device" else 0)
    fwd_image = param_bytes + out_bytes
    fwd_tile = copy + no_grad_peak(graph, memory, tile)
    bwd_image = param_bytes + 2 * out_bytes + 2 * grad_bytes
    bwd_tile = copy + max(graph_peak(graph, memory, tile, requires_input_grad))
    device_image, tile_part = max((fwd_image, fwd_tile), (bwd_image, bwd_tile), key=sum)
    held = 0 if location == "array" else x_bytes + input_grad_bytes  # where the input lives
    pixel_loss = param_bytes + 2 * grad_bytes + bwd_tile + held
    inference = fwd_image + fwd_tile + (0 if location == "array" else x_bytes)
    norm_passes = _norm_passes(graph)
    if cuts is not None:
        stored, factor = _checkpoints.estimate(graph, cuts, full)
        norm_passes.update(checkpoint_bytes=int(stored), checkpoint_time_factor=factor)
    check_strip_options(strip_budget, strip_memory)
    reused = _overlaps(graph, tilings, memory, n, esize, strip_budget)
    if overlap == "auto":
        overlap = "reuse" if reused["reuse_factor"] is not None else "recompute"
    if overlap == "reuse" and reused["reuse_factor"] is None:
        raise StreamingError(f"overlap='reuse' cannot run this module: {reused['reuse_refusal']}")
    reuse_on = overlap == "reuse"
    kept = 0 if norm_passes or reuse_on else tiles_kept(keep_graphs, int(tile_part), count(tilings))
    strips = 2 * reused["strip_bytes"] if reuse_on else 0  # (and their gradients)
    strips_on_host = strip_memory == "host" and device.type != "cpu"
    on_device = device_image + (1 + kept) * tile_part + (held if location == "device" else 0) \
        + (0 if strips_on_host else strips)
    axis_fields = [fields(graph.axis(a)) for a in range(ndim)]
    shapes, strides, outputs = _outputs(graph, spatial, n, axis_fields)
    return StreamPlan(
        input_shape=input_shape,
        tile_size=tuple(t.tile_size for t in tilings),
        tiles_per_axis=tuple(len(t.starts) for t in tilings),
        tile_starts=tuple(list(t.starts) for t in tilings),
        tile_stops=tuple(list(t.stops) for t in tilings),
        overlap=tuple(t.overlap for t in tilings),
        output_stride=strides,
        output_shape=shapes,
        min_tile_size=tuple(t.min_tile_size for t in tilings),
        receptive_field=tuple(max(f[i].size for i in graph.maps) for f in axis_fields),
        dtype=dtype,
        requires_input_grad=requires_input_grad,
        streaming_peak_bytes=int(on_device + (held if location != "device" else 0)
                                 + (strips if strips_on_host else 0)),
        conventional_peak_bytes=int(conventional),
        input_bytes=0 if location == "array" else int(x_bytes),
        tile_working_bytes=int(tile_part),
        steps=_steps(graph, spatial, n, axis_fields),
        input_dtype=input_dtype,
        input_location=location,
        device=str(device),
        device_peak_bytes=int(on_device),
        host_bytes=int((held if location == "host" else 0) + (strips if strips_on_host else 0)),
        kept_tiles=kept,
        tile_grid=tuple(t.stride for t in tilings),
        pixel_loss_peak_bytes=int(pixel_loss),
        inference_peak_bytes=int(inference),
        out_bytes=int(out_bytes),
        outputs=outputs,
        overlap_mode=overlap,
        strip_budget=strip_budget,
        strip_memory=strip_memory,
        **reused,
        **norm_passes,
    )


def _overlaps(graph, tilings, memory, n: int, esize: int, budget: int | None) -> dict:
    """Positions each pass computes recomputing and reusing overlaps, over the maps'
    positions (each weighted by its elements per position, a proxy for its cost), and the
    bytes of reuse's strips (:mod:`streamcnn.reuse`), under ``budget`` and under others."""
    weights = [m.elements_per_position for m in memory]
    per_axis = [lengths(graph.axis(a), t.length) for a, t in enumerate(tilings)]
    weights[0] = 0  # (the input is read, not computed)
    whole = sum(w * math.prod(ls[s] for ls in per_axis) for s, w in enumerate(weights))
    tile_spans = [[spans(graph.axis(a), Span(t.length, a0, b0, a0, b0))
                   for a0, b0 in zip(t.starts, t.stops)] for a, t in enumerate(tilings)]
    recomputed = sum(w * math.prod(sum(sp[s].stop - sp[s].start for sp in axis) for axis in tile_spans)
                     for s, w in enumerate(weights))
    found = dict(recompute_factor=recomputed / whole, reuse_factor=None, strip_bytes=0,
                 reuse_refusal=why_not(graph, _checkpoints.runs_as_module(graph)))
    if found["reuse_refusal"] is not None:
        return found
    exact, count_ = exact_steps(graph), len(graph.steps)

    def choice(b):
        stored, axes = reuse_axes(graph, tilings, exact, b, n, esize)
        stored = tuple(range(1, count_) if stored is None else sorted(stored))
        return stored, StripChoice(
            "None" if b is None else _bytes(b), b, len(stored),
            int(round(n * _reuse.strip_elements(axes, strip_weights(graph)))) * esize,
            sum(w * _reuse.computed_positions(axes, s) for s, w in enumerate(weights)) / whole)
    stored, chosen = choice(budget)
    every = chosen if budget is None else choice(None)[1]  # (the table's first row)
    choices = [every] + [choice(b)[1] for b in (every.strip_bytes // 2, every.strip_bytes // 4,
                                                every.strip_bytes // 8, 0)]
    found.update(reuse_factor=chosen.factor, strip_bytes=chosen.strip_bytes, strip_steps=stored,
                 strip_choices=tuple(choices))
    return found


def _outputs(graph, spatial, n, axis_fields) -> tuple:
    """(output_shape, output_stride, outputs) of a plan: one map's shape and per-axis stride,
    or a structure of them like the module's output with its leaves listed."""
    per_axis = [lengths(graph.axis(a), L) for a, L in enumerate(spatial)]
    shapes = [(n, graph.steps[i].channels) + tuple(ls[i] for ls in per_axis) for i in graph.outputs]
    strides = [tuple(f[i].stride for f in axis_fields) for i in graph.outputs]
    if graph.spec.is_leaf():
        return shapes[0], strides[0], ()
    return (tree_unflatten(shapes, graph.spec), tree_unflatten(strides, graph.spec),
            tuple(zip(graph.output_paths, shapes, strides)))


def _norm_passes(graph) -> dict:
    nodes = [n for n in norm_calls(graph) if n is not None]
    if not nodes:
        return {}
    depth = len(set(levels(graph, nodes).values()))
    pooled = sum(isinstance(n.norm, Global) for n in nodes)
    return dict(norms=len(nodes) - pooled, global_steps=pooled, norm_levels=depth,
                forward_passes=depth + 1, backward_passes=depth + 1)


def _location(input_device, device: torch.device) -> str:
    if input_device is None:
        return "device"
    if input_device == "array":
        return "array"
    return "device" if torch.device(input_device) == device else "host"


def _steps(graph, spatial, n, axis_fields) -> tuple[StepPlan, ...]:
    per_axis = [lengths(graph.axis(a), L) for a, L in enumerate(spatial)]
    return tuple(StepPlan(s.name, s.kind, s.inputs,
                          (n, s.channels) + tuple(ls[i] for ls in per_axis),
                          tuple(f[i].size for f in axis_fields),
                          tuple(f[i].stride for f in axis_fields))
                 for i, s in enumerate(graph.steps))
