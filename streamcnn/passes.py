"""Streamed statistics passes: one forward over every tile, without a graph, that sums what
chosen feature maps hold at the positions each tile owns.

A :class:`Probe` names a feature map two ways a tile run can see it: the output of a
module call (a forward hook; the ``k``-th call of a module in a tile is its ``k``-th call
in the traced graph) or the input of a batch normalisation (a torch-function mode over
``F.batch_norm``, whose ``k``-th call in a tile is the graph's ``k``-th batch-norm node).
The tiles are cut with those maps among their targets, so each map is partitioned among
them (``geometry.ownership``); each tile adds the moments of its owned part
(``moments.Moments``), and the merged moments are the whole map's, exactly.

Batch normalisations whose statistics are already known (from an earlier pass) normalise
with them, as training-mode BatchNorm normalises with its batch's; a tile stops as soon as
every probed map has been seen, so a pass costs only the layers up to its maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .binding import bind_call
from .errors import internal_assert
from .function import TileRunner
from .moments import ChannelStats, Moments, channels_first
from .state import Snapshot, uncached_parametrizations
from .tiling import count, owned_crops


@dataclass(frozen=True)
class Probe:
    """One feature map a pass sums: the output of the ``call``-th call of ``module``, or
    (``norm_node`` given) the input of that batch-norm node. ``step``: its traced step."""

    key: object
    step: int
    module: nn.Module | None = None
    call: int = 0
    norm_node: str | None = None


class _Enough(Exception):
    """Raised inside a tile once every probed map has been seen: the rest is not needed."""


class StatisticsPass:
    """Runs passes over one input's tiles (``runner``: the input, its tiling, the pipeline)."""

    def __init__(self, runner: TileRunner, graph, bar=None):
        self.runner, self.graph, self.bar = runner, graph, bar
        self.norm_nodes = graph.norm_nodes()

    def run(self, probes: list[Probe], known: dict[str, ChannelStats] | None = None) -> dict:
        """key -> :class:`Moments` of every probe's map over the whole input. ``known``:
        batch-norm node name -> the statistics it normalises with."""
        known = known or {}
        crops = {p.step: owned_crops(self.graph, self.runner.tilings, p.step) for p in probes}
        sums = {p.key: Moments() for p in probes}
        seen: list = []

        def record(probe: Probe, value: torch.Tensor, tile):
            part = value[crops[probe.step][tile.index]]
            sums[probe.key].add(channels_first(part, self.graph.steps[probe.step].dims))
            seen.append(probe.key)
            if len(seen) == len(probes):
                raise _Enough

        hooks = _ModuleHooks(probes, record)
        mode = _NormMode(self.norm_nodes, known, [p for p in probes if p.norm_node], record)
        try:
            snapshot = Snapshot(self.runner.pipeline, self.runner.device, self._counters())
            for tile in _ticking(self.runner, self.bar):
                seen.clear()
                hooks.tile = mode.tile = tile
                hooks.calls.clear()
                mode.k = 0
                self._run_tile(tile, mode)
                internal_assert(len(seen) == len(probes), "a probed map was not computed by a tile")
                snapshot.check_tile()
        finally:
            hooks.remove()
        return sums

    def _counters(self) -> frozenset:
        """BatchNorm modules streamed in training mode count their calls, once per tile here:
        the caller sets their counters (``update_bn``), so they are not checked."""
        root = self.runner.pipeline
        found = set()
        for node, step in self.norm_nodes:
            if step is not None and node.op == "call_module":
                counter = getattr(root.get_submodule(node.target), "num_batches_tracked", None)
                if counter is not None:
                    found.add(id(counter))
        return frozenset(found)

    def _run_tile(self, tile, mode) -> None:
        with torch.no_grad():
            tile_input = self.runner.feed(self.runner.read(self.runner.source, tile))
            try:
                with uncached_parametrizations(), mode:
                    self.runner.pipeline(tile_input)
            except _Enough:
                pass


def _ticking(runner: TileRunner, bar):
    for tile in runner.tiles("statistics"):
        yield tile
        if bar is not None:
            bar.update(1)


class _ModuleHooks:
    """Forward hooks on the probed modules; each call of a module in a tile is numbered."""

    def __init__(self, probes: list[Probe], record):
        self.tile = None
        self.calls: dict[int, int] = {}
        self.by_call = {(id(p.module), p.call): p for p in probes if p.module is not None}
        self.handles = [m.register_forward_hook(self._hook)
                        for m in {id(p.module): p.module for p in probes if p.module is not None}.values()]
        self.record = record

    def _hook(self, module, args, output):
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        probe = self.by_call.get((id(module), k))
        if probe is not None:
            self.record(probe, output, self.tile)

    def remove(self):
        for h in self.handles:
            h.remove()


class _NormMode(TorchFunctionMode):
    """Numbers the ``F.batch_norm`` calls of a tile (the graph's batch-norm nodes, in order):
    a probed one records its input; one with known statistics normalises with them (the
    eval formula with the batch's mean and biased variance is training-mode BatchNorm's);
    the others are not needed before the tile stops and pass their input on."""

    def __init__(self, nodes: list, known: dict, probes: list[Probe], record):
        super().__init__()
        self.nodes, self.known, self.record = nodes, known, record
        self.probes = {p.norm_node: p for p in probes}
        self.k, self.tile = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        internal_assert(self.k < len(self.nodes), "more batch-norm calls than traced nodes")
        node, step = self.nodes[self.k]
        self.k += 1
        if step is None:  # in eval mode with running statistics: as it is
            return func(*args, **kwargs)
        _, bound = bind_call(F.batch_norm, args, kwargs, lambda v: isinstance(v, torch.Tensor))
        x = bound["input"]
        if node.name in self.probes:
            self.record(self.probes[node.name], x, self.tile)
        stats = self.known.get(node.name)
        if stats is None:
            return x
        return F.batch_norm(x, stats.mean.to(x.dtype), stats.var.to(x.dtype), bound["weight"],
                            bound["bias"], False, 0.0, bound["eps"])


def total_tiles(runner: TileRunner) -> int:
    return count(runner.tilings)
