"""``Streaming``: the nn.Module users train with. It runs a local CNN front end tile by
tile, forward and backward, with exactly conventional backprop's results."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_unflatten

from . import checkpoints as _checkpoints, dedup as _dedup, dense, skipping, state
from .allocator import check_mode, reuse_freed_memory
from ._args import normalize_tile_size
from .channels_last import ONEDNN_CHANNEL_BLOCK, onednn_unsafe_convs, use_channels_last
from .errors import StreamingError
from .function import Job, StreamFunction, TileRunner, autocast_state
from .keeping import Kept, check_budget, tiles_kept
from .inputs import check_source, expected_ndim, module_device, module_dtype
from .plan import plan
from .norms import NormState, counters, update_running
from .passes import backward_terms, forward_statistics
from .sources import source_of, tensor_of
from .strips import Strips, check_reusable, check_strip_options, reusable
from .tiling import count, outputs, owned_crops
from .trace import Pipeline, analyse, analyse_structure

OVERLAP = ("recompute", "reuse", "auto")


class Streaming(nn.Module):
    """Wrap a local CNN front end so it runs tile by tile, forward and backward.

    ``Streaming(features, tile_size)(x)`` equals ``features(x)`` and backpropagates
    the same gradients to ``features``' parameters and to ``x`` - or raises an error
    where conventional autograd would, or where streaming cannot be exact - but never
    holds an activation of the whole image: memory is set by the tile, plus the
    input, the stitched output, its gradient and (if ``x.requires_grad``) the input
    gradient.

    ``features`` may return one feature map or any nesting of tuples, lists and dicts of
    feature maps at different strides (a feature pyramid, a ResNet body's
    ``{"layer2": ..., "layer3": ...}``, deep supervision): ``Streaming`` returns the same
    structure, each map stitched, and the backward takes the gradients of any of them (an
    output the loss does not use costs nothing). The tiles then start on the common grid
    of every map's stride and cover every map; ``dedup`` is off for such modules.

    Args:
        module: the front end: any module torch.fx can trace whose operations are
            local - convolutions and pooling (1d/2d, any kernel, stride, padding,
            dilation, groups), activations, BatchNorm and Dropout in eval mode,
            LayerNorm/Linear over channels, residual adds, ``torch.cat`` along
            channels, per-channel scales (ResNet, DenseNet, MobileNetV2, VGG, ConvNeXt
            front ends). Anything else is refused with an error naming the operation.
        tile_size: edge of the input tile in pixels, overlap included; an int or one
            int per spatial axis. Use :meth:`plan` to see the tiles and memory.
        progress: a tqdm bar over the tiles of each forward and backward pass. None (the
            default): when stderr is a terminal, as tqdm decides; True/False: always/never
            (:mod:`streamcnn.progress`).
        channels_last: give each 2D tile to the module in channels-last memory layout.
            The default (None) does so on CPU for float32/bfloat16, where oneDNN then
            convolves about twice as fast (values agree up to summation order), unless the
            module has a 1x1 strided convolution (a layer or an ``F.conv2d`` call) whose
            input channels oneDNN mishandles in that layout on AVX2 CPUs
            (:mod:`streamcnn.channels_last`).
        prefetch: read the next tile of an array input (a memmap, zarr, h5py, a slide) on a
            background thread while the current one computes, in the forward pass and in
            the backward recomputation (:mod:`streamcnn.prefetch`); the same reads, so the
            same numbers bit for bit. Tensor inputs are never prefetched (their tiles are
            views).
        dedup: compute a tile whose pixels and geometry equal an earlier tile's of the same
            pass only once, forward and backward (:mod:`streamcnn.dedup`: exact; the
            backward's sums of duplicate gradients agree to float rounding), in the passes of
            whole-map steps too. Off for modules returning several feature maps.
        skip_zero_gradients: in the backward, do not recompute a tile whose owned output
            gradient is exactly zero (a max-pool or masked head leaves most tiles so): its
            gradients are zero (:mod:`streamcnn.skipping`: exact; tiles that computed a
            non-finite value, graphs with an operation of unbounded derivative such as
            ``sqrt``, and graphs whose normalisation statistics span the image are always
            recomputed). ``last_stats.backward.skipped`` counts them.
        keep_graphs: a budget in bytes of the module's device for the graphs of the
            forward's last tiles, which the backward then uses without recomputing those
            tiles (:mod:`streamcnn.keeping`): as many tiles as ``plan().tile_working_bytes``
            each allows (with memory to spare, say half of what conventional training would
            take: ``plan().conventional_peak_bytes // 2``). 0 (the default) keeps none, so
            the peak never exceeds plain streaming's; None keeps the last tile only, whose
            graph lives from the end of the forward to the start of the backward (which
            would build it next). Not for graphs whose normalisation statistics span the
            image. ``last_stats.backward.reused`` counts the tiles.
        reuse_memory: on a CPU with glibc, keep the memory a tile frees for the next tile while
            a pass runs, instead of glibc unmapping each tile's large buffers and mapping them
            afresh for the next (:mod:`streamcnn.allocator`: glibc's settings are put back
            after each pass and the freed memory returned; the same numbers bit for bit).
            ``"small"`` keeps only buffers under 32 MiB and returns larger ones when freed: a
            lower peak (the heap does not grow past what a pass holds where freed large
            blocks fit no later request) for faulting the large buffers in again in each
            tile. False leaves glibc alone. No effect on other devices or C libraries.
        checkpoints: where the statistics passes of normalisations over the image and of
            global steps keep the feature maps at which their levels begin, so that each pass
            starts there instead of at the image (:mod:`streamcnn.checkpoints`; the same
            numbers up to float rounding): ``"auto"`` (the default) in host memory up to half
            of what is available, then in files of the system's temporary folder;
            ``"memory"``; ``"disk"``; a folder for the files; False: every pass starts at
            the image (no storage; a pass of level k then recomputes all layers before it).
            Files are removed when the step's graph is freed, or at once if a pass fails.
            ``plan()`` reports the passes and the bytes stored.
        overlap: what a tile does with the border its window shares with its neighbours':
            ``"recompute"`` (the default) computes it again in every tile; ``"reuse"`` runs
            the tiles in order and lets each compute every map only where no earlier tile
            did, reading the rest from *strips* earlier tiles stored (:mod:`streamcnn.strips`:
            each position computed once per pass; the same numbers up to float rounding);
            ``"auto"`` reuses where the module allows it. ``plan()`` gives both factors and
            the strips' bytes (their gradients take up to as much again in the backward).
        strip_budget: with reused overlaps, at most this many bytes of strips: None (the
            default) keeps strips at every step; under a budget the steps nearest the input
            recompute their overlap instead, as few as fit (``reuse.strips_within``; 0: all,
            as with ``"recompute"``). ``plan()`` lists the choices with their bytes and time.
        strip_memory: where the strips live: ``"device"`` (the module's, the default) or
            ``"host"`` (CPU memory, each band copied to the device when a tile reads it: for
            a GPU module whose strips would not fit beside a tile).

    After each call ``last_stats`` (:class:`streamcnn.prefetch.Stats`) says how many tiles
    each pass computed and where its time went (its ``backward`` is filled in by the
    backward).

    Inputs are ``(N, C, L)`` or ``(N, C, H, W)``. The tiles run through the user's own
    module: forward hooks fire once per computed tile in the forward pass and again per
    computed tile in the backward recomputation, with tile-sized tensors; full backward
    hooks fire per backward call of a tile with tile-sized gradients (skipped tiles have
    none). With ``dedup``, tiles
    identical to earlier ones are not computed (hooks fire fewer times), and a shared
    tile's backward hooks see its group's summed gradient (or fire once per duplicate when
    the input gradient is wanted). The module gets a copy of each tile, so in-place
    layers never write into ``x``. The state dict has the wrapped module's own keys.
    Higher-order gradients (``create_graph=True``) raise an error.
    """

    def __init__(self, module: nn.Module, tile_size, *, transform=None, progress: bool | None = None,
                 channels_last: bool | None = None, prefetch: bool = True, dedup: bool = True,
                 skip_zero_gradients: bool = True, keep_graphs: int = 0,
                 reuse_memory=True, checkpoints="auto", overlap: str = "recompute",
                 strip_budget: int | None = None, strip_memory: str = "device"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"Streaming needs an nn.Module, got {type(module).__name__}")
        if isinstance(module, nn.Sequential) and len(module) == 0:
            raise ValueError("the streamed module has no layers")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (a function or an nn.Module), got "
                            f"{type(transform).__name__}")
        ndim = expected_ndim(module)
        if ndim is not None:  # else the input's rank decides, checked in forward
            normalize_tile_size(tile_size, ndim)
        _check_structure(module, ndim, transform)
        self.module = module
        self.transform = transform
        self.tile_size = tile_size
        self.progress = progress
        self.channels_last = channels_last
        self.prefetch, self.dedup = prefetch, dedup
        self.skip_zero_gradients = skip_zero_gradients
        check_budget(keep_graphs)
        self.keep_graphs = keep_graphs
        check_mode(reuse_memory)
        self.reuse_memory = reuse_memory
        self.checkpoints = _checkpoints.check_storage(checkpoints)
        if overlap not in OVERLAP:
            raise ValueError(f"overlap must be one of {OVERLAP}, got {overlap!r}")
        self.overlap = overlap
        check_strip_options(strip_budget, strip_memory)
        if overlap == "recompute" and (strip_budget is not None or strip_memory != "device"):
            raise ValueError("strip_budget and strip_memory set where reused overlaps keep strips: "
                             "pass overlap='reuse' (or 'auto') with them; with overlap='recompute' "
                             "(the default) no tile stores any")
        self.strip_budget, self.strip_memory = strip_budget, strip_memory
        self.last_stats = None
        self.register_state_dict_post_hook(_unwrapped_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)

    def __getattr__(self, name: str):
        """The wrapped module's submodules, parameters and buffers under their own names too,
        as the state dict has them, so that ``torch.func.functional_call(model,
        model.state_dict(), ...)`` and other name lookups reach them through ``Streaming``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")  # (none while unpickling)
            if inner is not None and name not in ("module", "transform") and (
                    name in inner._modules or name in inner._parameters or name in inner._buffers):
                return getattr(inner, name)
            raise

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}" + (", transform" if self.transform is not None else "")

    def prepare(self, source):
        """Validate an input (a source) against the module; return (traced graph, tilings).
        The tiles cover every output map and the input map of every normalisation over space
        too."""
        graph, tilings, _ = self._prepare(source)
        return graph, tilings

    def _prepare(self, source):
        """(traced graph, tilings, level checkpoints' cuts or None: ``checkpoints.tile``)."""
        ndim = check_source(self.module, source, self.transform)
        graph = analyse(self.module, ndim, source.shape[1], batch=source.shape[0],
                        dtype=source.dtype, device=source.device, transform=self.transform,
                        spatial_norms=True)
        targets = tuple(i for i, s in enumerate(graph.steps) if s.norm is not None)
        tilings, cuts = _checkpoints.tile(graph, tuple(source.shape[2:]), self.tile_size, targets,
                                          self.checkpoints)
        return graph, tilings, cuts

    @torch.compiler.disable(reason="streamcnn runs its tile loop eagerly: torch.compile compiles "
                            "the model around the Streaming module (so fullgraph=True cannot "
                            "include it)")
    def forward(self, x, out=None):
        """``module(transform(x))``, tile by tile: a feature map, or the structure of feature
        maps the module returns. ``x``: a tensor on any device, or an array read tile by tile
        (:class:`streamcnn.ImageArray`, a numpy array or memmap).

        ``out``: an array of the output's shape ``(N, C, *spatial)`` (numpy, ``numpy.memmap``,
        zarr), or the output's structure of such arrays, that receives each tile's owned
        output as it is computed, and is returned: the whole output never exists as a tensor
        (:class:`streamcnn.dense.ArrayOutput`). Only without a graph: under
        ``torch.no_grad()``, or where nothing requires grad."""
        x, source, graph, tilings, device, cuts = self._setup(x)
        with reuse_freed_memory(self._reuse_memory(device)):
            result = self._forward(x, source, graph, tilings, device, out, cuts)
        return result if out is None else out

    def _setup(self, x):
        """``x`` as streamed (for an ``ImageArray`` of a tensor, that tensor), its source, the
        traced graph, the tilings, the module's device and the checkpoints' cuts."""
        _refuse_functorch()
        x = tensor_of(x)
        source = source_of(x)
        graph, tilings, cuts = self._prepare(source)
        return x, source, graph, tilings, module_device(self.module) or source.device, cuts

    def _runner(self, source, graph, tilings, device, *, dedup: bool, skip: bool,
                cuts=None, reuse: bool = True) -> TileRunner:
        runner = TileRunner(Pipeline(self.module, self.transform), tilings, source, device,
                            progress=self.progress,
                            channels_last=self._channels_last(source, device, graph),
                            prefetch=self.prefetch and source.fresh, dedup=dedup, skip=skip,
                            unused=graph.unused, outputs=outputs(graph, tilings),
                            elsewhere=_dedup.owned_elsewhere(graph, tilings, _summed_or_stored(
                                graph, cuts)) if dedup else None)
        _checkpoints.attach(runner, graph, cuts, self.checkpoints, keep=torch.is_grad_enabled())
        if reuse and self._reusing(graph):
            check_reusable(graph, _checkpoints.runs_as_module(graph))
            dtype = module_dtype(self.module) or torch.float32
            runner.strips = Strips(graph, tilings, graph.root, device, budget=self.strip_budget,
                                   memory=self.strip_memory, batch=source.shape[0],
                                   element_size=torch.empty((), dtype=dtype).element_size())
            runner.stats.blocks = runner.strips.blocks
        self.last_stats = runner.stats
        return runner

    def _forward(self, x, source, graph, tilings, device, out=None, cuts=None):
        recompute = not self._reusing(graph)  # (reused overlaps: every tile runs, in order)
        runner = self._runner(source, graph, tilings, device,
                              dedup=self.dedup and recompute and _dedup.allowed(graph),
                              skip=self.skip_zero_gradients and recompute
                              and torch.is_grad_enabled() and skipping.allowed(graph), cuts=cuts)
        pipeline = runner.pipeline
        keep = self._tiles_kept(x, source, graph, tilings)
        norms = _stream_norms(runner, graph)
        own = counters(norms.nodes) if norms is not None else frozenset()
        snapshot = state.Snapshot(pipeline, device)  # (after the running statistics' update)
        first, read = runner.first_tile()
        snapshot.check_tile()
        x_grad = isinstance(x, torch.Tensor) and x.requires_grad
        if not torch.is_grad_enabled() or not (x_grad or any(t.requires_grad for t in read.values())):
            runner.close_checkpoints()
            allocate = None if out is None else dense.ArrayOutput.into(out, runner.outputs, graph.spec)
            return tree_unflatten(runner.outputs.leaves(runner.forward(first, snapshot, allocate=allocate)),
                                  runner.spec)
        if out is not None:
            raise StreamingError(
                "out= writes outputs without a graph: wrap the call in torch.no_grad() (the "
                "input or the module's parameters require grad here)")
        captured = state.capture(pipeline, read, own)
        inputs = [_node_input(t) for t in (x if isinstance(x, torch.Tensor) else None,)
                  + captured.grad_tensors]
        job = Job(runner, captured, snapshot, first,
                  [get_gradient_edge(t).node if t is not None and t.requires_grad else None
                   for t in inputs], autocast_state(device.type),
                  before_backward=None if norms is None else functools.partial(
                      _norm_terms, runner, graph, norms),
                  kept=Kept.of(keep, captured, x_grad),
                  reuse_memory=self._reuse_memory(device))
        result = StreamFunction.apply(job, *inputs)
        return tree_unflatten([result] if isinstance(result, torch.Tensor) else list(result), runner.spec)

    @torch.compiler.disable(reason="streamcnn runs its tile loop eagerly")
    def pixel_loss(self, x, target, loss_fn, reduction: str = "mean",
                   target_transform=None) -> torch.Tensor:
        """``loss_fn(module(transform(x)), target).mean()`` (or ``.sum()``: ``reduction``), the
        plain mean or sum of every element ``loss_fn`` returns, with each tile run once and
        backpropagated at once: no recomputation, no stitched output (:mod:`streamcnn.dense`).

        ``loss_fn(output, target)`` returns a per-pixel loss (torch's ``reduction="none"``:
        ``functools.partial(F.cross_entropy, reduction="none", weight=w, ignore_index=255)``,
        ``F.binary_cross_entropy_with_logits``, ``F.mse_loss``, ``F.huber_loss`` so
        partially applied). Its mean counts every element, an ignored or weighted pixel too:
        for torch's weighted mean of cross-entropy, use ``reduction="sum"`` and divide by the
        target's summed class weights. ``target``, at the output's resolution: the output's
        shape ``(N, C, *spatial)``, or ``(N, *spatial)`` (class indices); a tensor, or an
        array (numpy, ``numpy.memmap``, zarr) of which each tile reads only its owned part,
        integer labels as int64 and other values in the output's dtype, or as
        ``target_transform(tensor)`` makes them (applied to each tile's part: elementwise).

        Returns a 0-dim loss whose backward gives the module's tensors and ``x`` (where it
        requires grad) conventional backprop's gradients, times the loss's gradient:
        ``loss.backward()``, ``(loss * scale).backward()``, accumulation over calls and
        ``torch.autograd.grad`` work as usual. Under ``torch.no_grad()`` just the value.
        Normalisations over the image in training mode first run their statistics and
        backward-terms passes, as in :meth:`forward` and its backward.
        ``last_stats.forward`` counts the loss pass's tiles."""
        loss = dense.PixelLoss(loss_fn, target, reduction, target_transform)
        x, source, graph, tilings, device, cuts = self._setup(x)
        with reuse_freed_memory(self._reuse_memory(device)):
            if self.overlap == "reuse":  # (its tiles' backward follows each forward at once:
                raise StreamingError(  # no tile is recomputed, in any order)
                    "pixel_loss runs each tile's forward and backward once, one tile after the "
                    "other: there is no recomputation whose overlap overlap='reuse' could save, "
                    "and strips need every later tile's backward first; use overlap='recompute' "
                    "or 'auto' (which pixel_loss takes as 'recompute')")
            runner = self._runner(source, graph, tilings, device, dedup=False, skip=False,
                                  cuts=cuts, reuse=False)
            return dense.pixel_loss(runner, graph, x, loss, lambda: _stream_norms(runner, graph))

    def _tiles_kept(self, x, source, graph, tilings) -> int:
        """How many of the forward's last tiles keep their graph (``keep_graphs``): as
        ``plan()`` counts them, which it reports too. None with normalisations over the
        image (their tiles' backward needs terms known only in the backward)."""
        if any(s.norm is not None for s in graph.steps) or self._reusing(graph):
            return 0
        if not self.keep_graphs or not torch.is_grad_enabled():  # None: the last tile; 0: none
            return tiles_kept(self.keep_graphs, 1, count(tilings))
        grad = isinstance(x, torch.Tensor) and x.requires_grad
        gpu = [torch.cuda.current_device()] if source.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpu):  # (plan's memory probe draws a tile)
            return self.plan(source.shape, input_dtype=source.dtype, requires_input_grad=grad,
                             input_device=x.device if isinstance(x, torch.Tensor) else "array",
                             keep_graphs=self.keep_graphs).kept_tiles

    def _reusing(self, graph) -> bool:
        """Whether the tiles reuse their overlaps (``overlap``; ``"auto"``: where the graph
        allows it)."""
        if self.overlap == "auto":
            return reusable(graph, _checkpoints.runs_as_module(graph))
        return self.overlap == "reuse"

    def _reuse_memory(self, device):
        return self.reuse_memory if device.type == "cpu" else False

    def _channels_last(self, source, device, graph) -> bool:
        if len(source.shape) != 4:
            return False
        if self.channels_last is not None:
            unsafe = (self.channels_last and device.type == "cpu"
                      and onednn_unsafe_convs(self.module, graph))
            if unsafe:
                warnings.warn(f"channels_last=True with 1x1 strided convolutions {unsafe} whose "
                              f"input channels are not a multiple of {ONEDNN_CHANNEL_BLOCK}: on "
                              f"AVX2 CPUs oneDNN computes their weight gradient wrongly or hangs "
                              f"(oneDNN#6035); the default (channels_last=None) avoids that "
                              f"layout here", stacklevel=3)
            return self.channels_last
        dtype = module_dtype(self.module) or source.dtype
        return use_channels_last(device, dtype, self.module, graph)

    def plan(self, input_shape, **kwargs):
        """``streamcnn.plan(self.module, input_shape, self.tile_size, transform=...,
        keep_graphs=..., checkpoints=..., overlap=..., strip_budget=..., strip_memory=...)``."""
        kwargs.setdefault("transform", self.transform)
        kwargs.setdefault("keep_graphs", self.keep_graphs)
        kwargs.setdefault("checkpoints", self.checkpoints)
        kwargs.setdefault("overlap", self.overlap)
        kwargs.setdefault("strip_budget", self.strip_budget)
        kwargs.setdefault("strip_memory", self.strip_memory)
        return plan(self.module, input_shape, self.tile_size, **kwargs)


def _summed_or_stored(graph, cuts) -> list:
    """The steps besides the output whose owned parts a tile adds to whole-map sums (the
    inputs of normalisations over space and of global steps) or stores (checkpoints)."""
    return [i for i, s in enumerate(graph.steps) if s.norm is not None] + \
        list(cuts.steps if cuts is not None else ())


def _stream_norms(runner: TileRunner, graph) -> NormState | None:
    """For a graph with normalisations over space: their whole-image statistics (one streamed
    pass per level), the running statistics updated once, and the tiles set to use them."""
    norms = NormState.of(graph)
    if not norms.nodes:
        return None
    norms.crops = {n.name: owned_crops(graph, runner.tilings, n.step) for n in norms.nodes}
    forward_statistics(runner, graph, norms)
    update_running(norms.nodes, norms.stats)
    runner.norms = norms
    return norms


def _norm_terms(runner, graph, norms, source, grads, tensors, x_grad, fused=None) -> None:
    """Before the final backward: the whole-map terms of every normalisation's gradient
    (``grads``: one per output map, None where the loss does not use it), and with
    ``fused`` the final backward's part above the passes' gradient cuts."""
    norms.terms.clear()
    backward_terms(runner, graph, norms, source, grads, tensors, x_grad=x_grad, fused=fused)


def _refuse_functorch() -> None:
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise StreamingError(
            "Streaming does not run under torch.func transforms (grad, vjp, jacrev, vmap): its tile "
            "loop and its backward, which recomputes every tile, are autograd code outside the "
            "transform's view; use torch.autograd (backward or torch.autograd.grad) for gradients, "
            "and a loop over the batch instead of vmap")


def _node_input(t):
    """A leaf requiring grad enters the autograd node through a view, so the backward can
    ask the engine whether its gradient is wanted (the engine cannot say for leaves)."""
    return t.view_as(t) if t is not None and t.requires_grad and t.grad_fn is None else t


def _check_structure(module: nn.Module, ndim: int | None, transform) -> None:
    """Refuse unstreamable operations at construction, as far as they are known then.

    The modules are analysed in eval mode (modes are checked at every call, since
    users switch them after wrapping) with unknown channel counts; errors that need
    the input (channels, sizes) wait for the first call.
    """
    if ndim is None:
        return
    try:
        analyse_structure(module, ndim, transform=transform)
    except StreamingError:
        raise
    except Exception:  # needs the input to decide; the first call repeats the analysis
        pass


def _unwrapped_keys(module, state_dict, prefix, local_metadata):
    """State dict post-hook: ``prefix.module.k`` -> ``prefix.k``, so checkpoints of the bare
    front end and of the wrapped one are interchangeable."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _wrapped_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs):
    """Load pre-hook: accept the bare module's keys (and the wrapped ones)."""
    own = set(module.module.state_dict(keep_vars=True))
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest in own:
            state_dict[prefix + "module." + rest] = state_dict.pop(key)
