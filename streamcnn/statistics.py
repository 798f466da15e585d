"""Exact whole-image statistics by streaming: ``channel_stats``, ``update_bn`` and ``lsuv_``.

Each is a sequence of streamed statistics passes (``streamcnn.passes``): forward only,
without a graph, in the memory of one tile plus the statistics. The tiles own disjoint
parts of every feature map whose statistics are wanted, so the per-tile sums, merged with
Chan's formula in float64 (``streamcnn.moments``), are the whole map's sums exactly - the
TPAMI paper's CAMELYON17 network was initialised this way (Sec. 7.1), and BatchNorm can be
recalibrated on the target domain at full resolution (AdaBN).

    >>> stats = streamcnn.channel_stats(front, slide, 2800, ["layer1", "layer2.0.conv1"])
    >>> stats["layer1"].mean, stats["layer1"].var, stats["layer1"].count
    >>> streamcnn.update_bn(loader, front, 2800)      # torch.optim.swa_utils.update_bn, streamed
    >>> streamcnn.lsuv_(front, images, 2800)          # unit variance per output channel
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from . import checkpoints as _checkpoints
from .channels_last import use_channels_last
from .function import TileRunner
from .inputs import check_source, module_device, module_dtype
from .moments import ChannelStats, Moments
from .norms import NormState, levels, update_running
from .progress import bar as progress_bar
from .passes import Probe, StatisticsPass, forward_statistics, total_tiles
from .sources import ImageArray, source_of, tensor_of
from .trace import Pipeline, analyse, describe_layer

_BATCHNORM = nn.modules.batchnorm._BatchNorm  # what torch.optim.swa_utils.update_bn recalibrates


def channel_stats(module: nn.Module, images, tile_size, names, *, transform=None,
                  progress: bool | None = None, channels_last: bool | None = None,
                  checkpoints="auto") -> dict[str, ChannelStats]:
    """Per-channel ``mean``, ``var`` (biased) and ``count`` of the named submodules' outputs
    over every batch element and position of ``images``, streamed tile by tile.

    ``module``: the streamed front end (as for ``Streaming``); ``names``: module paths as
    in ``module.named_modules()`` (``""``: the module's own output); a module called more
    than once contributes every call. ``images``: a tensor, an array or ``ImageArray``, or
    an iterable of them (statistics accumulate across them). One streamed pass per image,
    stopping each tile after the last named module. The modules run in their current
    train/eval modes (BatchNorm in eval mode, with frozen statistics). ``progress``: one
    bar over the tiles of every pass; None (the default) draws it when stderr is a terminal,
    True/False always/never (:mod:`streamcnn.progress`). ``checkpoints``: where the passes of
    normalisations over the image store the maps their levels begin at, as for ``Streaming``
    (:mod:`streamcnn.checkpoints`; each map is dropped once no later pass needs it).
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("channel_stats needs at least one module name")
    with _bar(progress, "channel_stats") as bar:
        return _channel_stats(module, _inputs(images, "images"), tile_size, names, transform,
                              channels_last, bar, checkpoints)


def _channel_stats(module, inputs, tile_size, names, transform, channels_last, bar,
                   checkpoints="auto") -> dict:
    targets = {name: _resolve(module, name) for name in names}
    total = {name: Moments() for name in names}
    for x in inputs:
        job = _Job(module, x, tile_size, transform, channels_last, bar, checkpoints)
        probes = [Probe((name, k), step, module=m, call=k)
                  for name, (path, m) in targets.items()
                  for k, step in enumerate(job.module_steps(name, path))]
        for (name, _), moments in job.run(probes, targets=[p.step for p in probes]).items():
            total[name].absorb(moments)
    return {name: total[name].stats() for name in names}


def update_bn(loader, module: nn.Module, tile_size, device=None, *, transform=None,
              progress: bool | None = None, channels_last: bool | None = None,
              checkpoints="auto") -> None:
    """``torch.optim.swa_utils.update_bn(loader, module)``, streamed: every BatchNorm's
    running statistics recomputed over ``loader`` exactly as torch's function leaves them.

    As there, each batch runs in training mode: BatchNorm *k* normalises with its batch's
    statistics, which depend on BatchNorm 1..k-1's, and the running statistics become the
    average over batches (``momentum=None``) of each batch's mean and unbiased variance;
    ``num_batches_tracked`` counts the batches. Streamed, each batch's statistics come from
    one pass per *level* of BatchNorms (a BatchNorm is one level below the deepest
    BatchNorm it depends on; BatchNorms on parallel branches, such as a downsample's, share
    a pass), in graph order: at most one pass per BatchNorm per batch, each stopping its
    tiles after that level. ``loader`` yields images (a tensor, array or ``ImageArray``) or
    tuples whose first element is one. ``device``: the device the module runs on (default:
    its own); images stay where they are and tiles are copied there. Afterwards every
    layer's train/eval flag (each its own, where torch's sets all to the module's) and
    every BatchNorm's momentum are as before. ``progress``, ``checkpoints``: as for
    ``channel_stats``; with checkpoints, each pass starts at the maps its level begins at,
    stored by the pass before, so a batch costs about one streamed forward, not one per level.
    """
    bns = [m for m in module.modules() if isinstance(m, _BATCHNORM)]
    if not bns:
        return
    _check_device(module, device)
    flags = [(m, m.training) for m in module.modules()]
    momenta = [(m, m.momentum) for m in bns]
    records: dict[int, list] = {id(m): [] for m in bns}
    try:
        for m in bns:
            m.reset_running_stats()
        module.train()
        with _bar(progress, "update_bn") as bar:
            for batch in _inputs(loader, "loader", first_of_tuple=True):
                for m, stats in _batch_norm_statistics(module, batch, tile_size, transform,
                                                       channels_last, bar, checkpoints):
                    records[id(m)].append(stats)
    finally:
        for m, training in flags:
            m.training = training
        for m, momentum in momenta:
            m.momentum = momentum
    for m in bns:
        _set_running(m, records[id(m)])


def lsuv_(module: nn.Module, images, tile_size, *, tol: float = 0.01, max_iter: int = 10,
          transform=None, progress: bool | None = None,
          channels_last: bool | None = None, checkpoints="auto") -> nn.Module:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas), per output channel as
    the TPAMI paper does: for each convolution in graph order, rescale its weights and bias
    channel by channel until the variance of each of its output channels over ``images``
    is within ``tol`` of 1, the statistics streamed (``channel_stats``). Scaling a channel's
    weights and bias by ``s`` scales its output, hence its variance by ``s**2``, so one
    rescale usually suffices; the pass that measures the next convolution confirms the
    previous one, so a network of ``n`` convolutions usually takes ``n + 1`` passes over
    ``images`` (at most ``n * max_iter + 1``). Modifies ``module`` in place and returns it.
    ``progress``, ``checkpoints``: as for ``channel_stats``.
    """
    inputs = _inputs(images, "images")
    convs = _convolutions(module, next(iter(inputs)), transform)
    todo = list(convs) + [None]
    previous = None
    with _bar(progress, "lsuv_") as bar:
        for path in todo:
            for _ in range(max_iter):
                wanted = [n for n in (previous, path) if n is not None]
                stats = _channel_stats(module, inputs, tile_size, wanted, transform,
                                       channels_last, bar, checkpoints)
                if previous is not None and not _within(stats[previous].var, tol):
                    _rescale(module, previous, stats[previous].var)  # confirm failed: again
                    continue
                if path is not None and not _within(stats[path].var, tol):
                    _rescale(module, path, stats[path].var)
                break
            else:
                warnings.warn(f"lsuv_: {path or previous} did not reach unit variance within "
                              f"tol={tol} in max_iter={max_iter} rescalings")
            previous = path
    return module


# ------------------------------------------------------------------ one input's passes

class _Job:
    """One input (image or batch) and the module's traced graph for it."""

    def __init__(self, module, x, tile_size, transform, channels_last, bar, checkpoints="auto"):
        self.x = tensor_of(x)
        self.source = source_of(self.x)
        ndim = check_source(module, self.source, transform)
        self.graph = analyse(module, ndim, self.source.shape[1], batch=self.source.shape[0],
                             dtype=self.source.dtype, device=self.source.device,
                             transform=transform)
        self.module, self.tile_size, self.transform = module, tile_size, transform
        self.device = module_device(module) or self.source.device
        self.channels_last = channels_last
        self.bar = bar
        self.checkpoints = _checkpoints.check_storage(checkpoints)

    def module_steps(self, name: str, path: str) -> list[int]:
        if not path and len(self.graph.maps) > 1:
            raise ValueError(f"the streamed module returns {len(self.graph.maps)} feature maps "
                             f"({', '.join(self.graph.output_paths)}), so '' names none of them: "
                             f"name the modules that compute the maps you want statistics of")
        steps = self.graph.module_steps(path) if path else list(self.graph.maps)
        if not steps:
            raise ValueError(f"module '{name}' is not called by the streamed module's forward, so "
                             f"it has no output to take statistics of")
        if None in steps:
            raise ValueError(f"the output of module '{name}' does not reach the streamed module's "
                             f"output (it is not traced as a step of it); name a module on the "
                             f"path to the output")
        return steps

    def runner(self, targets) -> TileRunner:
        tilings, cuts = _checkpoints.tile(self.graph, tuple(self.source.shape[2:]), self.tile_size,
                                          tuple(sorted(set(targets))), self.checkpoints)
        layout = self.channels_last
        if layout is None:
            layout = len(self.source.shape) == 4 and use_channels_last(
                self.device, module_dtype(self.module) or self.source.dtype, self.module, self.graph)
        runner = TileRunner(Pipeline(self.module, self.transform), tilings, self.source,
                            self.device, progress=False,
                            channels_last=layout and len(self.source.shape) == 4)
        _checkpoints.attach(runner, self.graph, cuts, self.checkpoints, keep=False)
        return runner

    def run(self, probes, targets) -> dict:
        """The probes' moments, after the statistics of any normalisation over space (which
        normalises with the whole input's, as in ``Streaming``; its running statistics are
        not updated: this is not a training step)."""
        state = NormState.of(self.graph)
        runner = self.runner(list(targets) + [n.step for n in state.nodes])
        passes = len(set(levels(self.graph, state.nodes).values())) if state.nodes else 0
        self.bar.grow(total_tiles(runner) * (passes + 1))
        forward_statistics(runner, self.graph, state, self.bar)
        runner.close_checkpoints()
        return StatisticsPass(runner, self.graph, self.bar, state).run(probes)


def _batch_norm_statistics(module, batch, tile_size, transform, channels_last, bar, checkpoints):
    """(BatchNorm module, its batch statistics) for every call, one pass per level."""
    job = _Job(module, batch, tile_size, transform, channels_last, bar, checkpoints)
    state = NormState.of(job.graph)
    runner = job.runner([n.step for n in state.nodes])
    bar.grow(total_tiles(runner) * len(set(levels(job.graph, state.nodes).values())))
    forward_statistics(runner, job.graph, state, bar)
    runner.close_checkpoints()
    # InstanceNorm keeping running statistics updates them in torch's training-mode pass too
    update_running([n for n in state.nodes if n.norm.kind == "instance"], state.stats)
    for n in state.nodes:
        if n.module is not None and n.norm.kind == "batch":
            yield n.module, state.stats[n.name]


def _set_running(m: nn.Module, records: list) -> None:
    """Running statistics as torch's cumulative average (momentum None) leaves them."""
    if m.running_mean is None or not records:
        return
    with torch.no_grad():
        mean = torch.stack([r.mean for r in records]).mean(0)
        var = torch.stack([r.unbiased_var for r in records]).mean(0)
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(var.to(m.running_var))
        m.num_batches_tracked.fill_(len(records))


# ------------------------------------------------------------------ LSUV

def _convolutions(module: nn.Module, x, transform) -> list[str]:
    """Paths of the convolutions in the order the traced graph calls them first."""
    job_graph = _Job(module, x, 1 << 30, transform, None, _NoBar()).graph
    paths = []
    for path, _ in job_graph.calls:
        m = module.get_submodule(path) if path else module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and path not in paths:
            if torch.nn.utils.parametrize.is_parametrized(m):
                raise ValueError(f"lsuv_ rescales weights in place, but "
                                 f"{describe_layer(path, type(m).__name__)} has a parametrised "
                                 f"weight; initialise before parametrising it")
            paths.append(path)
    if not paths:
        raise ValueError("lsuv_ found no convolution in the streamed module")
    return paths


def _within(var: torch.Tensor, tol: float) -> bool:
    live = var > 0
    return bool(((var[live] - 1).abs() <= tol).all())


def _rescale(module: nn.Module, path: str, var: torch.Tensor) -> None:
    conv = module.get_submodule(path)
    dead = (var <= 0).nonzero().flatten().tolist()
    if dead:
        warnings.warn(f"lsuv_: output channels {dead} of {describe_layer(path, type(conv).__name__)} "
                      f"are constant over the images (variance 0) and are left as they are")
    scale = torch.where(var > 0, var.clamp_min(1e-300).rsqrt(), torch.ones_like(var))
    with torch.no_grad():
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(scale.to(conv.weight).view(shape))
        if conv.bias is not None:
            conv.bias.mul_(scale.to(conv.bias))


# ------------------------------------------------------------------ arguments

def _resolve(module: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(the path fx records for it, the module) of a module path; clear errors otherwise."""
    if name == "":
        return "", module
    try:
        m = module.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in module.named_modules() if n][:12]
        raise ValueError(f"the streamed module has no submodule '{name}'; names are paths as in "
                         f"module.named_modules(), e.g. {known}") from None
    canonical = next(p for p, sub in module.named_modules() if sub is m)
    return canonical, m


def _inputs(images, what: str, first_of_tuple: bool = False) -> Iterable:
    """The inputs of an argument that is one image or an iterable of them (re-iterable)."""
    if _is_image(images):
        return [images]
    if not isinstance(images, Iterable):
        raise TypeError(f"{what} must be an image (a tensor, an array or ImageArray) or an "
                        f"iterable of them, got {type(images).__name__}")
    items = images if iter(images) is not images else list(images)
    firsts = [i[0] if first_of_tuple and isinstance(i, (tuple, list)) else i for i in items] \
        if isinstance(items, list) else _Firsts(items, first_of_tuple)
    if isinstance(firsts, list) and not firsts:
        raise ValueError(f"{what} is empty: statistics need at least one image")
    return firsts


class _Firsts:
    """A re-iterable view of a re-iterable (a DataLoader): each item, or its first element."""

    def __init__(self, items, first_of_tuple):
        self.items, self.first = items, first_of_tuple

    def __iter__(self):
        empty = True
        for item in self.items:
            empty = False
            yield item[0] if self.first and isinstance(item, (tuple, list)) else item
        if empty:
            raise ValueError("the loader is empty: statistics need at least one image")


def _is_image(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray, ImageArray)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"))


def _check_device(module: nn.Module, device) -> None:
    own = module_device(module)
    if device is not None and own is not None and torch.device(device) != own:
        raise ValueError(f"update_bn was asked to run on {device} but the module is on {own}: "
                         f"move it first (module.to({str(device)!r})); the images stay where "
                         f"they are and each tile is copied to the module's device")


# ------------------------------------------------------------------ progress

class _NoBar:
    def update(self, n):
        pass

    def grow(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Bar(_NoBar):
    """A tqdm bar over the tiles of every pass, its total growing as passes are planned;
    shown by the ``progress`` rule (:mod:`streamcnn.progress`)."""

    def __init__(self, desc, progress):
        self.bar = progress_bar(total=0, progress=progress, desc=desc, unit="tile")
        self.passes = 0

    def update(self, n):
        self.bar.update(n)

    def grow(self, n):
        self.passes += 1
        self.bar.total += n
        self.bar.set_postfix_str(f"pass {self.passes}")
        self.bar.refresh()

    def __exit__(self, *exc):
        self.bar.close()
        return False


def _bar(progress: bool | None, desc: str):
    return _NoBar() if progress is False else _Bar(desc, progress)
