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

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .errors import internal_assert
from .dedup import Summaries, gradient_parts
from .function import Fused, TileRunner, backward_owned, backward_parts, collect
from .moments import Moments, all_but_channels
from .prefetch import PassStats
from .norms import NormMode, NormState, Terms, check_values, correction_terms, frozen_modules, \
    fusable, group_sums, levels, statistic_groups
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

    def __init__(self, runner: TileRunner, graph, bar=None, state: NormState | None = None,
                 start=None, save=None):
        self.runner, self.graph, self.bar = runner, graph, bar
        self.state = state or NormState.of(graph)
        self.start, self.save = start, save  # checkpoint cuts (streamcnn.checkpoints) or None

    def run(self, probes: list[Probe]) -> dict:
        """key -> :class:`Moments` of every probe's map over the whole input (normalisations
        normalise with ``self.state``'s statistics). With checkpoints, tiles start at the
        cut ``start`` and store their owned part of the cut ``save`` as they pass it.

        With dedup, a tile identical to an earlier one (:mod:`streamcnn.dedup`) is not run:
        with the earlier levels' statistics constants, its owned part of every map equals its
        representative's, so it adds the representative's summaries again (under its own
        index: a max/min's first extreme is placed by the tile) and, with checkpoints, its
        owned part of the stored maps is copied from the representative's."""
        crops = {p.step: owned_crops(self.graph, self.runner.tilings, p.step) for p in probes}
        sums = {p.key: self._accumulator(p) for p in probes}
        by_node = {p.norm_node: p for p in probes if p.norm_node}
        seen: list = []
        added: list = []  # (key, summary) of the current tile's parts
        current = {}
        stats = self.runner.stats.statistics
        shared = None if self.runner.duplicates is None else Summaries(self.runner.duplicates)

        def record(probe: Probe, value: torch.Tensor):
            tile = current["tile"]
            summary = self._summary(probe, sums[probe.key],
                                    value[crops[probe.step][tile.index]])
            sums[probe.key].include(summary, tile.index)
            added.append((probe.key, summary))
            seen.append(probe.key)
            if len(seen) == len(probes):
                raise _Enough

        hooks = _ModuleHooks(probes, record)
        try:
            snapshot = Snapshot(self.runner.pipeline, self.runner.device)
            for tile in _ticking(self.runner, self.bar):
                stats.tiles += 1
                raw, earlier = self._match(tile)
                if earlier is not None and self._repeat(tile, earlier, shared, sums):
                    continue
                seen.clear()
                added.clear()
                current["tile"] = tile
                hooks.calls.clear()
                mode = NormMode(self.state, tile.index, probes=by_node,
                                record=lambda node, x: record(by_node[node.name], x),
                                order=None if self.start is None else
                                self.runner.checkpoints.program.order(self.start.position))
                self._run_tile(tile, mode, raw)
                internal_assert(len(seen) == len(probes), "a probed map was not computed by a tile")
                snapshot.check_tile()
                stats.computed += 1
                if shared is not None:
                    shared.hold(tile, added)
        finally:
            hooks.remove()
        return sums

    def _summary(self, probe: Probe, accumulator, part: torch.Tensor):
        """What ``part``, a tile's owned part of the probe's map, adds to its sums."""
        norm = self.graph.steps[probe.step].norm
        if probe.norm_node and isinstance(norm, Global):
            return accumulator.summary(part)
        if probe.norm_node and norm:
            return Moments.summary(*statistic_groups(part, norm))
        return Moments.summary(part, all_but_channels(self.graph.steps[probe.step].dims))

    def _match(self, tile) -> tuple:
        """(the tile's pixels where they were read to match it, else None; the earlier tile
        it duplicates, or None). The first pass reads every tile at the image and groups them
        (``TileRunner.match``); later passes know the groups."""
        dups = self.runner.duplicates
        if dups is None:
            return None, None
        if dups.known(tile):
            return None, dups.shared(tile)
        if self.start is not None and not self.start.image:  # (not read here: not shared)
            return None, None
        raw = self.runner.read(self.runner.source, tile)
        return raw, self.runner.match(tile, raw)

    def _repeat(self, tile, earlier, shared, sums: dict) -> bool:
        """Add again what ``earlier`` added, as ``tile`` 's, and copy its stored parts; False
        where its summaries are no longer held (the tile is then computed)."""
        again = shared.of(earlier)
        if again is None:
            return False
        for key, summary in again:
            sums[key].include(summary, tile.index)
        if self.save is not None and self.save.names:
            self.runner.checkpoints.copy(self.save, earlier, tile)
        return True

    def _accumulator(self, probe: Probe):
        """Moments of a map; a global step's reduction (:class:`reductions.Accumulator`)."""
        g = self.graph.steps[probe.step].norm
        if not (probe.norm_node and isinstance(g, Global)):
            return Moments()
        if g.kind in ("max", "min"):  # (which tile owns the first extreme)
            return Accumulator(g, *owned_origins(self.graph, self.runner.tilings, probe.step))
        return Accumulator(g)

    def _run_tile(self, tile, mode, raw=None) -> None:
        """``raw``: the tile's pixels, where they were read already."""
        if self.start is not None:
            return self._run_program(tile, mode, raw)
        with torch.no_grad():
            if raw is None:
                raw = self.runner.read(self.runner.source, tile)
            tile_input = self.runner.feed(raw)
            try:
                with tile_scope(self.runner.pipeline), frozen_modules(self.state.nodes), mode:
                    self.runner.pipeline(tile_input)
            except _Enough:
                pass

    def _run_program(self, tile, mode, raw=None) -> None:
        """The tile from the checkpoint ``start``, writing its part of ``save`` on the way."""
        ck, saved = self.runner.checkpoints, []

        def write(env):
            ck.write(self.save, tile, env)
            saved.append(True)

        at = {self.save.position: write} if self.save is not None and self.save.names else {}
        with torch.no_grad():
            env = _start(self.runner, self.runner.source, tile, self.start, False, raw)
            try:
                with tile_scope(self.runner.pipeline), frozen_modules(self.state.nodes), mode:
                    ck.program.run(env, self.start.position, at=at)
            except _Enough:
                pass
        internal_assert(saved or not at, "a pass ended before the checkpoint it stores")


def _start(runner: TileRunner, source, tile, cut, x_grad: bool, raw=None) -> dict:
    """The values a run from ``cut`` starts with: the tile input (``raw``, where it was read
    already), or the stored maps."""
    ck = runner.checkpoints
    if not cut.image:
        return ck.read(cut, tile, runner.device)
    raw = (runner.read(source, tile) if raw is None else raw).detach().requires_grad_(x_grad)
    return {ck.program.placeholder: runner.feed(raw)}


def forward_statistics(runner: TileRunner, graph, state: NormState, bar=None) -> None:
    """Fill ``state.stats`` with every normalisation's input statistics: one pass per level,
    each normalising with the levels before it (their whole-image statistics); with
    checkpoints (``runner.checkpoints``), each starting at its level's stored maps."""
    with _closing_on_failure(runner):
        _forward_statistics(runner, graph, state, bar)


@contextlib.contextmanager
def _closing_on_failure(runner: TileRunner):
    """Stored maps are removed at once when a pass fails (the step is lost)."""
    try:
        yield
    except BaseException:
        runner.close_checkpoints()
        raise


def _forward_statistics(runner: TileRunner, graph, state: NormState, bar=None) -> None:
    level_of = levels(graph, state.nodes)
    ck = runner.checkpoints
    order = sorted(set(level_of.values()))
    for k, level in enumerate(order):
        probes = [Probe(n.name, n.step, norm_node=n.name) for n in state.nodes
                  if level_of[n.name] == level]
        start = save = None
        if ck is not None:
            start = ck.cuts.forward[level]
            save = ck.missing(ck.cuts.following(level)) if k + 1 < len(order) or ck.keep else None
        for key, moments in StatisticsPass(runner, graph, bar, state, start, save).run(probes).items():
            state.stats[key] = moments.stats()
        if ck is not None:
            ck.passed(level)
        for n in state.nodes:
            if level_of[n.name] == level and not isinstance(n.norm, Global):
                check_values(n, state.stats[n.name], graph.steps[n.step].name)


def backward_terms(runner: TileRunner, graph, state: NormState, source, grads: list,
                   tensors: dict, bar=None, x_grad: bool = False, fused: Fused | None = None) -> None:
    """Fill ``state.terms`` with the whole-map terms of (N1) of every normalisation, given
    ``grads``: the gradient of each output map (``runner.outputs.maps``; None: unused), or a
    function ``(tile, ys)`` -> the gradient of each of ``ys``, the tile's owned parts (a
    per-pixel loss's, :mod:`streamcnn.dense`). One backward pass per level, deepest first,
    each with the deeper levels' terms applied. A
    pass makes its normalisations' outputs leaves, so its backward stops there. Tiles
    require grad as the input did (``x_grad``), so that code that asks (a reentrant
    ``checkpoint``) runs as it did conventionally. With checkpoints, each pass starts at its
    level's stored maps and ends at the gradient the deeper pass stored.

    ``fused`` (checkpoints only): each pass does the step's own backward above the cut where
    it stores a gradient (:class:`function.Fused`), with ``fused.tensors`` for the module's,
    adding their gradients into ``fused.sums``; ``fused.top`` is then the last such cut, whose
    stored gradient is left for the final backward below it."""
    with _closing_on_failure(runner):
        _backward_terms(runner, graph, state, source, grads, tensors, bar, x_grad, fused)
    if runner.checkpoints is not None and (fused is None or fused.top is None):
        runner.checkpoints.grads.close()


def _backward_terms(runner, graph, state, source, grads, tensors, bar, x_grad, fused) -> None:
    level_of = levels(graph, state.nodes)
    ck = runner.checkpoints
    order = sorted(set(level_of.values()))
    inject = None  # the gradient cut the deeper pass stored (None: the outputs)
    stats = runner.stats.terms = PassStats()  # (a second backward: anew)
    if fused is not None:
        tensors = fused.tensors
    saved = {} if ck is None else ck.cuts.saved(order)
    for level in reversed(order):
        nodes = [n for n in state.nodes if level_of[n.name] == level]
        sums = {n.name: Terms() for n in nodes}
        save = saved.get(level)
        for tile in _ticking(runner, bar):
            stats.tiles += 1
            group = _group(runner, tile)
            if group is None:
                continue  # (a duplicate: its representative's backward stands for it)
            if ck is None:
                found = _tile_terms(runner, state, group, nodes, source, grads, tensors, x_grad)
            else:
                found = _tile_terms_from(runner, state, group, nodes, source, grads, tensors,
                                         x_grad, (ck.cuts.following(level), inject, save), fused)
            stats.computed += 1
            for name, (h, hx) in found.items():
                sums[name].add(h, hx)
        if save is not None:
            if inject is not None:
                ck.drop_gradients(inject)
            inject = save
        for n in nodes:
            if isinstance(n.norm, Global):  # G, the whole-map gradient of its value
                state.terms[n.name] = sums[n.name].h
                continue
            shape = (source.shape[0], graph.steps[n.step].channels or state.stats[n.name].mean.numel())
            state.terms[n.name] = correction_terms(n, sums[n.name], state.stats[n.name], *shape)
    if fused is not None:
        fused.top = inject


def _group(runner: TileRunner, tile) -> list | None:
    """The tiles one backward-terms recomputation of ``tile`` stands for: it alone, or with
    dedup its group of identical tiles (None for a duplicate: its representative's run
    stands for it). A tile's terms are linear in its output gradient (and in the gradient
    injected at a cut) plus the deeper levels' corrections, added once per tile at the same
    owned positions: so one run with the group's summed gradient, adding each member's
    corrections (``NormMode.stand_for``), gives the sum of the members' terms."""
    dups = runner.duplicates
    if dups is None:
        return [tile]
    return None if dups.shared(tile) is not None else dups.group(tile)


def _tile_terms(runner, state, group, nodes, source, grads, tensors, x_grad) -> dict:
    """One tile's part (or with dedup its group's, ``group``: :func:`_group`) of
    ``sum_S(h)`` and ``sum_S(h · x̂)`` of each of ``nodes``. The mode
    holds through the backward, where a checkpoint inside the module runs parts again (and
    makes new leaves: each output a node made is a leaf, and their gradients add up)."""
    tile = group[0]
    leaves: dict = {}
    mode = NormMode(state, tile.index, probes={n.name for n in nodes}, leaves=leaves)
    raw = runner.read(source, tile).detach().requires_grad_(x_grad)
    with torch.enable_grad(), substituted(runner.pipeline, tensors), tile_scope(runner.pipeline), \
            frozen_modules(state.nodes), mode:
        tile_input = runner.feed(raw)
        ys = runner.owned(runner.pipeline(tile_input), tile, tile_input)
        mode.replaying()
        backward_parts(ys, _parts(runner, group, grads, ys), mode)
    return _found(nodes, leaves)


def _parts(runner, group, grads, ys, of=None, separate: bool = False) -> list:
    """``dedup.gradient_parts`` of ``group`` from the output gradients ``grads`` (or ``of``,
    a tile's injected gradients): summed, as the terms are linear in them, unless
    ``separate`` (each member's gradient at a cut is stored at its own place). A per-pixel
    loss's gradient function (:mod:`streamcnn.dense`) runs without dedup."""
    if callable(grads) and of is None:
        internal_assert(len(group) == 1, "dedup with a per-pixel loss")
        return [(group, grads(group[0], ys))]
    return gradient_parts(group, of or (lambda t: runner.owned_gradients(t, grads)),
                          separate=separate)


def _tile_terms_from(runner, state, group, nodes, source, grads, tensors, x_grad, cuts,
                     fused=None) -> dict:
    """:func:`_tile_terms` with checkpoints: the traced program from the level's forward cut
    ``start`` to the gradient cut ``inject`` (None: the outputs), whose stored gradient it
    backpropagates from the positions the tile owns; on the way its gradient at the cut
    ``save`` is added to the store (the values there are made leaves: the gradient from
    everything after the cut, then passed on to the level's steps before it). With a group
    of identical tiles and ``save``, each member's gradient is backpropagated to the cut
    apart (through the kept graph: each goes to its own place in the store), then their
    sum on from the cut, standing for every member.

    With ``fused``, the backward above ``save`` is the step's own (every whole-map step
    there is a deeper level's): the module's tensors' gradients from it are added into
    ``fused.sums``; every other backward accumulates only into the level's leaves."""
    tile = group[0]
    start, inject, save = cuts
    ck = runner.checkpoints
    leaves: dict = {}
    cut: dict = {}
    mode = NormMode(state, tile.index, probes={n.name for n in nodes}, leaves=leaves,
                    order=ck.program.order(start.position))

    def cut_here(env):
        for name in save.names:
            value = env[name]
            leaf = value.detach().requires_grad_()
            cut[name] = (value, leaf)
            env[name] = leaf.clone()  # (a non-leaf: a layer after the cut may work in place)

    totals: dict = {}  # name -> the members' gradients at the cut, added

    def store(place):
        ck.add_gradient(save, place, {name: leaf.grad for name, (_, leaf) in cut.items()})
        for name, (_, leaf) in cut.items():
            if leaf.grad is not None:
                totals[name] = leaf.grad if name not in totals else totals[name] + leaf.grad
            leaf.grad = None

    with torch.enable_grad(), substituted(runner.pipeline, tensors), tile_scope(runner.pipeline), \
            frozen_modules(state.nodes), mode:
        env = _start(runner, source, tile, start, x_grad)
        at = {save.position: cut_here} if save is not None else {}
        out = ck.program.run(env, start.position, None if inject is None else inject.position, at)
        if inject is None:  # (the traced structure: fx's dicts and lists, leaves in order)
            outs = tree_leaves(out)
            ys = runner.owned_leaves(outs, tile, env.get(ck.program.placeholder, outs[0]))
            parts = _parts(runner, group, grads, ys, separate=save is not None)
        else:
            ys, _ = ck.owned_gradients(inject, tile, env)
            parts = _parts(runner, group, grads, ys, separate=save is not None,
                           of=lambda t: ck.owned_gradients(inject, t, env)[1])
        mode.replaying()
        final = fused is not None and save is not None
        if final or _reaches(leaves, fused):
            backward_parts(ys, parts, mode, after=store if save is not None else None,
                           inputs=() if fused is None or final else _made(leaves))
        if final:
            collect(fused.sums, fused.wrt)
        if save is not None and _reaches(leaves, fused):
            mode.stand_for([t.index for t in group])  # (the steps before the cut: all at once)
            before = [(v, totals[name]) for name, (v, _) in cut.items()
                      if v.requires_grad and name in totals]
            backward_owned([v for v, _ in before], [g for _, g in before],
                           inputs=() if fused is None else _made(leaves))
    return _found(nodes, leaves)


def _made(leaves: dict) -> list:
    """Every leaf the level's steps made (``NormMode``): what a partial backward is for."""
    return [m[0] for made in leaves.values() for m in made]


def _reaches(leaves: dict, fused) -> bool:
    """Whether a backward restricted to the level's leaves has any (always, unrestricted)."""
    return fused is None or bool(_made(leaves))


def _found(nodes, leaves) -> dict:
    """Each node's part of its whole-map sums, from the gradients of the leaves it made."""
    found = {}
    for n in nodes:
        made = leaves[n.name]
        leaf, x, mean, rstd, weight = made[0]
        grads = [m[0].grad for m in made if m[0].grad is not None]
        g = grads[0] if len(grads) == 1 else sum(grads, torch.zeros_like(leaf))
        if isinstance(n.norm, Global):  # its part of G, in the keepdim shape
            shape = [1 if k in n.norm.dims else size for k, size in enumerate(x.shape)]
            found[n.name] = (g.detach().reshape(shape), g.new_zeros(()))
            continue
        with torch.no_grad():
            found[n.name] = _sums(g, x, mean, rstd, weight, n.norm)
    return found


def _sums(g, x, mean, rstd, weight, norm) -> tuple:
    """``sum_S(h)`` and ``sum_S(h · x̂)`` (``h = g · weight``), per statistic group. Per channel
    (BatchNorm) by torch's fused batch-norm backward, which gives ``sum(g · x̂)`` and
    ``sum(g)`` in one pass over the map without temporaries; else from ``x̂``."""
    if norm.kind == "batch" and fusable(g, x, mean, weight):
        _, gx, gs = torch.ops.aten.native_batch_norm_backward(
            g, x, None, None, None, mean.reshape(-1), rstd.reshape(-1), True, norm.eps,
            [False, True, True])
        w = 1 if weight is None else weight.detach()
        return gs * w, gx * w
    h = g if weight is None else g * weight.detach().view((1, -1) + (1,) * (g.dim() - 2))
    return group_sums(h, norm), group_sums(h * ((x - mean) * rstd), norm)


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
