"""Streamed statistics passes: forwards over every tile, without a graph, that sum what chosen
feature maps hold at the positions each tile owns; and backward passes that sum what the
whole-map terms of normalisations need.

A :class:`Probe` names a feature map two ways a tile run can see it: the output of a
module call (a forward hook; the ``k``-th call of a module in a tile is its ``k``-th call
in the traced graph) or the input of a normalisation (``norms.NormMode``, which numbers a
tile's normalisation calls in graph order). The tiles are cut with those maps among their
targets, so each map is partitioned among them (``geometry.ownership``); each tile adds
the moments of its owned part (``moments.Moments``), and the merged moments are the whole
map's, exactly. Normalisations whose statistics are already known normalise with them; a
tile stops as soon as every probed map has been seen, so a pass costs only the layers up
to its maps.

:func:`forward_statistics` finds every normalisation's statistics, one pass per level (a
normalisation is one level below the deepest one it depends on); :func:`backward_terms`
finds the whole-map terms of their input gradients (``norms``, (N1)), one backward pass
per level, deepest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import internal_assert
from .function import TileRunner, backward_owned
from .moments import Moments, all_but_channels
from .norms import NormMode, NormState, Terms, check_values, correction_terms, frozen_modules, \
    group_sums, levels, statistic_groups
from .reductions import Accumulator
from .rules import Global
from .state import Snapshot, substituted, tile_scope
from .tiling import count, owned_crops, owned_origins


@dataclass(frozen=True)
class Probe:
    """One feature map a pass sums: the output of the ``call``-th call of ``module``, or
    (``norm_node`` given) the input of that normalisation node. ``step``: its traced step."""

    key: object
    step: int
    module: nn.Module | None = None
    call: int = 0
    norm_node: str | None = None


class _Enough(Exception):
    """Raised inside a tile once every probed map has been seen: the rest is not needed."""


class StatisticsPass:
    """Runs passes over one input's tiles (``runner``: the input, its tiling, the pipeline)."""

    def __init__(self, runner: TileRunner, graph, bar=None, state: NormState | None = None):
        self.runner, self.graph, self.bar = runner, graph, bar
        self.state = state or NormState.of(graph)

    def run(self, probes: list[Probe]) -> dict:
        """key -> :class:`Moments` of every probe's map over the whole input (normalisations
        normalise with ``self.state``'s statistics)."""
        crops = {p.step: owned_crops(self.graph, self.runner.tilings, p.step) for p in probes}
        sums = {p.key: self._accumulator(p) for p in probes}
        by_node = {p.norm_node: p for p in probes if p.norm_node}
        seen: list = []
        current = {}

        def record(probe: Probe, value: torch.Tensor):
            part = value[crops[probe.step][current["tile"].index]]
            norm = self.graph.steps[probe.step].norm
            if probe.norm_node and isinstance(norm, Global):
                sums[probe.key].add(part, current["tile"].index)
            elif probe.norm_node and norm:
                sums[probe.key].add(*statistic_groups(part, norm))
            else:
                sums[probe.key].add(part, all_but_channels(self.graph.steps[probe.step].dims))
            seen.append(probe.key)
            if len(seen) == len(probes):
                raise _Enough

        hooks = _ModuleHooks(probes, record)
        try:
            snapshot = Snapshot(self.runner.pipeline, self.runner.device)
            for tile in _ticking(self.runner, self.bar):
                seen.clear()
                current["tile"] = tile
                hooks.calls.clear()
                mode = NormMode(self.state, tile.index, probes=by_node,
                                record=lambda node, x: record(by_node[node.name], x))
                self._run_tile(tile, mode)
                internal_assert(len(seen) == len(probes), "a probed map was not computed by a tile")
                snapshot.check_tile()
        finally:
            hooks.remove()
        return sums

    def _accumulator(self, probe: Probe):
        """Moments of a map; a global step's reduction (:class:`reductions.Accumulator`)."""
        g = self.graph.steps[probe.step].norm
        if not (probe.norm_node and isinstance(g, Global)):
            return Moments()
        if g.kind in ("max", "min"):  # (which tile owns the first extreme)
            return Accumulator(g, *owned_origins(self.graph, self.runner.tilings, probe.step))
        return Accumulator(g)

    def _run_tile(self, tile, mode) -> None:
        with torch.no_grad():
            tile_input = self.runner.feed(self.runner.read(self.runner.source, tile))
            try:
                with tile_scope(self.runner.pipeline), frozen_modules(self.state.nodes), mode:
                    self.runner.pipeline(tile_input)
            except _Enough:
                pass


def forward_statistics(runner: TileRunner, graph, state: NormState, bar=None) -> None:
    """Fill ``state.stats`` with every normalisation's input statistics: one pass per level,
    each normalising with the levels before it (their whole-image statistics)."""
    level_of = levels(graph, state.nodes)
    for level in sorted(set(level_of.values())):
        probes = [Probe(n.name, n.step, norm_node=n.name) for n in state.nodes
                  if level_of[n.name] == level]
        for key, moments in StatisticsPass(runner, graph, bar, state).run(probes).items():
            state.stats[key] = moments.stats()
        for n in state.nodes:
            if level_of[n.name] == level and not isinstance(n.norm, Global):
                check_values(n, state.stats[n.name], graph.steps[n.step].name)


def backward_terms(runner: TileRunner, graph, state: NormState, source, grads: list,
                   tensors: dict, bar=None, x_grad: bool = False) -> None:
    """Fill ``state.terms`` with the whole-map terms of (N1) of every normalisation, given
    ``grads``: the gradient of each output map (``runner.outputs.maps``; None: unused), or a
    function ``(tile, ys)`` -> the gradient of each of ``ys``, the tile's owned parts (a
    per-pixel loss's, :mod:`streamcnn.dense`). One backward pass per level, deepest first,
    each with the deeper levels' terms applied. A
    pass makes its normalisations' outputs leaves, so its backward stops there. Tiles
    require grad as the input did (``x_grad``), so that code that asks (a reentrant
    ``checkpoint``) runs as it did conventionally."""
    level_of = levels(graph, state.nodes)
    for level in sorted(set(level_of.values()), reverse=True):
        nodes = [n for n in state.nodes if level_of[n.name] == level]
        sums = {n.name: Terms() for n in nodes}
        for tile in _ticking(runner, bar):
            for name, (h, hx) in _tile_terms(runner, state, tile, nodes, source, grads,
                                             tensors, x_grad).items():
                sums[name].add(h, hx)
        for n in nodes:
            if isinstance(n.norm, Global):  # G, the whole-map gradient of its value
                state.terms[n.name] = sums[n.name].h
                continue
            shape = (source.shape[0], graph.steps[n.step].channels or state.stats[n.name].mean.numel())
            state.terms[n.name] = correction_terms(n, sums[n.name], state.stats[n.name], *shape)


def _tile_terms(runner, state, tile, nodes, source, grads, tensors, x_grad) -> dict:
    """One tile's part of ``sum_S(h)`` and ``sum_S(h · x̂)`` of each of ``nodes``. The mode
    holds through the backward, where a checkpoint inside the module runs parts again (and
    makes new leaves: each output a node made is a leaf, and their gradients add up)."""
    leaves: dict = {}
    mode = NormMode(state, tile.index, probes={n.name for n in nodes}, leaves=leaves)
    raw = runner.read(source, tile).detach().requires_grad_(x_grad)
    with torch.enable_grad(), substituted(runner.pipeline, tensors), tile_scope(runner.pipeline), \
            frozen_modules(state.nodes), mode:
        tile_input = runner.feed(raw)
        ys = runner.owned(runner.pipeline(tile_input), tile, tile_input)
        mode.replaying()
        backward_owned(ys, grads(tile, ys) if callable(grads) else runner.owned_gradients(tile, grads))
    found = {}
    for n in nodes:
        made = leaves[n.name]
        leaf, x, mean, rstd, weight = made[0]
        g = sum((m[0].grad for m in made if m[0].grad is not None), torch.zeros_like(leaf))
        if isinstance(n.norm, Global):  # its part of G, in the keepdim shape
            shape = [1 if k in n.norm.dims else size for k, size in enumerate(x.shape)]
            found[n.name] = (g.detach().reshape(shape), g.new_zeros(()))
            continue
        h = g if weight is None else g * weight.detach().view((1, -1) + (1,) * (g.dim() - 2))
        with torch.no_grad():
            found[n.name] = (group_sums(h, n.norm), group_sums(h * ((x - mean) * rstd), n.norm))
    return found


def _ticking(runner: TileRunner, bar):
    for tile in runner.tiles("statistics"):
        yield tile
        if bar is not None:
            bar.update(1)


class _ModuleHooks:
    """Forward hooks on the probed modules; each call of a module in a tile is numbered."""

    def __init__(self, probes: list[Probe], record):
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
            self.record(probe, output)

    def remove(self):
        for h in self.handles:
            h.remove()


def total_tiles(runner: TileRunner) -> int:
    return count(runner.tilings)
