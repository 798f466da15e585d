"""The tile loop and the autograd node of a streamed module (the paper's Algorithm 1).

Forward (no graph): every tile of the input goes through the user's own module;
each tile's output is cropped to the part it owns (inside its valid outputs) and
written into a preallocated output. Nothing but the input and the tensors the
module read is saved for backward. A module may return several maps (a structure of
them, ``torch.utils._pytree``'s leaves): each is stitched so, from the part of it each
tile owns (``tiling.Outputs``).

Backward (gradient checkpointing, one tile at a time): each tile is recomputed
with grad enabled and with exactly the tensors the forward read (the module holds
them through the tile's forward and backward, ``state.substituted``), its owned
output is backpropagated with the matching slice of the output gradient (the owned
parts of all its output maps at once, each with its own gradient; an output the loss
does not use has none and is left out), and the input gradient and the gradients
of those tensors are summed over the tiles. The owned regions partition the
output and every owned value is a function of its tile alone, so by linearity the
sums equal conventional backprop's gradients (paper Eqs. 5-7). Only the gradients
the engine asks for are computed.

Two optional hooks change how tiles reach the module, never what it computes: reads of
an array are done ahead on a thread of their own (:mod:`streamcnn.prefetch`), and a tile
identical to an earlier one is not run again (:mod:`streamcnn.dedup`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_leaves

from .allocator import release, reuse_freed_memory
from .dedup import Duplicates, fingerprint, gradient_parts
from .keeping import Kept
from .errors import StreamingError, internal_assert
from .prefetch import PassStats, Stats, prefetched, timed, waited
from .norms import NormMode, NormState, frozen_modules, update_replayed
from .progress import bar as progress_bar
from .skipping import FiniteWatch, all_finite, zero_gradient
from .sources import TensorSource, digest
from .state import Captured, Snapshot, TensorUse, backward_here, check_unchanged, \
    observing_gradient_hooks, substituted, tile_scope, versions
from .tiling import Outputs, Tile, count, iter_tiles


class TileRunner:
    """Runs the pipeline (transform, then module) over the tiles of one input.

    ``prefetch``: read the next tiles on a background thread while one computes.
    ``dedup``: compute a tile identical to an earlier one of the pass only once.
    ``skip``: do not recompute a tile whose output gradient is zero (:mod:`streamcnn.skipping`).
    ``outputs``: the output maps and each tile's part of them (``tiling.outputs``; None: one
    map, the tiling's output). ``dedup`` needs one output map; ``elsewhere``: each tile's owned
    crops of the other maps it sums or stores (``dedup.owned_elsewhere``), part of its key.
    ``stats`` records what each pass did (:class:`streamcnn.prefetch.Stats`)."""

    def __init__(self, pipeline: nn.Module, tilings, source, device: torch.device, *,
                 progress: bool | None, channels_last: bool, prefetch: bool = False,
                 dedup: bool = False, skip: bool = False, unused: tuple = (),
                 outputs: Outputs | None = None, elsewhere: dict | None = None):
        self.pipeline = pipeline
        self.unused = unused  # what the module computes for no output (TracedGraph.unused)
        self.tilings = tilings
        self.source = source
        self.device = device
        self.outputs = outputs or Outputs.single(tilings)
        self.spec = None  # the output structure a tile's module returns (set by the first)
        self.progress = progress
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.digests: dict = {}  # tile origin -> digest of what the forward read (array sources)
        self.norms: NormState | None = None  # normalisations streamed with whole-image statistics
        self.checkpoints = None  # their passes' stored maps (streamcnn.checkpoints), or None
        self.strips = None  # reused overlaps (streamcnn.strips), or None: recomputed
        self.prefetch = prefetch
        internal_assert(not dedup or len(self.outputs.maps) == 1, "dedup of several output maps")
        self.duplicates = Duplicates(tilings, self._reread, keep=4 if source.fresh else None,
                                     elsewhere=elsewhere) if dedup else None
        self.stats = Stats(prefetch=prefetch, dedup=dedup)
        self.skip = skip
        self.finite: dict = {}  # tile index -> whether all it computed was finite (with skip)
        self._reading: PassStats | None = None  # the pass whose reads are counted

    def fuses(self) -> bool:
        """Whether the backward-terms passes may do the step's own backward above their
        gradient cuts (:class:`Fused`)."""
        return self.checkpoints is not None and self.strips is None and \
            self.checkpoints.fuses(self.pipeline)

    def close_checkpoints(self) -> None:
        """Free the passes' stored maps (no backward pass will read them)."""
        if self.checkpoints is not None:
            self.checkpoints.close()

    def tiles(self, what: str, skip_first: bool = False):
        """The tiles of one statistics or terms pass (:mod:`streamcnn.passes`); under
        ``reuse_memory="small"`` the heap the passes before left behind is returned first."""
        release(between_passes=True)
        tiles = iter_tiles(self.tilings)
        if skip_first:
            next(tiles)
        return self._progress(tiles, what, count(self.tilings) - skip_first)

    def _progress(self, items, what: str, total: int):
        return progress_bar(items, progress=self.progress, total=total,
                            desc=f"streaming {what}", unit="tile", leave=False)

    @contextlib.contextmanager
    def inputs(self, what: str, tiles: list, read, stats: PassStats):
        """The loop over ``tiles`` of one pass: yields ``read(tile)`` for each, read ahead on a
        thread when prefetching, and counts the pass's tiles, reads and seconds in ``stats``."""
        self._reading = stats
        t0 = time.perf_counter()
        try:
            several = len(tiles) > 1  # (the first tile alone: no thread, no bar)
            with prefetched(timed(read, stats), tiles, self.prefetch and several,
                            describe=lambda t: f"the input tile at {t.origin}") as results:
                results = waited(results, stats)
                yield self._progress(results, what, len(tiles)) if several else results
        finally:
            stats.wall_s += time.perf_counter() - t0
            self._reading = None

    def feed(self, raw: torch.Tensor) -> torch.Tensor:
        """The tensor the pipeline gets for a tile read from the source: on the module's
        device, in the layout oneDNN/cuDNN convolve fastest, and never sharing memory with
        the caller's input (so nothing done in place reaches it). Differentiable."""
        tile = raw.to(self.device, non_blocking=raw.is_pinned()) if raw.device != self.device else raw
        if not self.source.fresh and tile.untyped_storage().data_ptr() == \
                self.source.tensor.untyped_storage().data_ptr():
            return tile.clone(memory_format=self.layout)
        return tile.contiguous(memory_format=self.layout)

    def read(self, source, tile: Tile) -> torch.Tensor:
        """A tile of the input. Reads of an array (a buffer a loader may refill, a file) are
        fingerprinted in the forward and checked in the backward, which reads them again."""
        before = source.reads
        raw = source.read(tile.inp, tile.origin)
        if self._reading is not None:  # (a slide's tiles without tissue are not read)
            self._reading.reads += source.reads - before
        if source.fresh:
            key, value = tile.origin, digest(raw)
            if self.digests.setdefault(key, value) != value:
                raise StreamingError(
                    f"the input array changed between the streamed forward and its backward (the "
                    f"tile at {tile.origin} reads other pixels now): the backward reads every tile "
                    f"again, so the array must hold the same image until backward (a loader that "
                    f"refills its buffer must wait, or pass a copy, e.g. a tensor)")
        return raw

    def _reread(self, tile: Tile) -> torch.Tensor:
        """A representative's pixels again, for an exact comparison (``Duplicates``)."""
        return self.read(self.source, tile)

    def match(self, tile: Tile, raw: torch.Tensor):
        """The earlier tile that ``tile`` (read as ``raw``) duplicates, or None: matched in the
        first pass that reads every tile (the first statistics pass of whole-map steps, else
        the forward), known in the later ones. An array's tile was fingerprinted when read;
        that digest finds the candidates."""
        if self.duplicates is None:
            return None
        if self.duplicates.known(tile):  # (an earlier pass grouped it)
            return self.duplicates.shared(tile)
        hashed = self.digests[tile.origin] if self.source.fresh else fingerprint(raw)
        return self.duplicates.match(tile, raw, hashed)

    def _forward_read(self, tile: Tile):
        raw = self.read(self.source, tile)
        return tile, raw, self.match(tile, raw)

    def run(self, tile_input: torch.Tensor, tile: Tile) -> list:
        """The module on one tile (inside :meth:`scope`): the part of each output map the tile
        owns (:meth:`owned`)."""
        if self.strips is not None:  # (the traced program, on each step's new positions)
            return self._run_reusing(tile_input, tile)
        try:
            y = self.pipeline(tile_input)
        except (RuntimeError, ValueError) as err:  # torch's shape errors are either
            if "register a hook on a tensor that doesn't require gradient" in str(err):
                raise StreamingError(
                    "a hook or layer inside the streamed module calls Tensor.register_hook on an "
                    "activation (as Grad-CAM does): streaming builds activations tile by tile "
                    "without a graph in the forward pass, so there is nothing to hook; register "
                    "the hook on the Streaming module's output (the stitched feature map) "
                    "instead") from err
            if self.unused:
                raise StreamingError(
                    f"a tile of shape {tuple(tile_input.shape)} failed: {err}. The streamed module "
                    f"computes values its output does not use, and they run on every tile: "
                    + " ".join(self.unused) + " Remove them from the streamed module (or, for "
                    "windows, use a larger tile_size)") from err
            raise
        return self.owned(y, tile, tile_input)

    def _run_reusing(self, tile_input: torch.Tensor, tile: Tile) -> list:
        """:meth:`run` reusing overlaps: the strips' program gives each output map's owned
        part itself (in the backward, its recomputation: grad mode is on only there)."""
        leaves, spec = tree_flatten(self.strips.run(tile, tile_input,
                                                    recompute=torch.is_grad_enabled()))
        if self.spec is None:
            self.spec = spec
        return [leaves[k] for k in self.outputs.first_leaves]

    def owned(self, y, tile: Tile, tile_input: torch.Tensor) -> list:
        """The part ``tile`` owns of each output map in ``y``, the module's output for it, one
        tensor per map (``self.outputs.maps``), each checked against the geometry and ``y``'s
        structure against the traced one."""
        leaves, spec = tree_flatten(y)
        if self.spec is None:  # the first tile: its leaves where the trace put them
            paths = tuple(keystr(p) for p, _ in tree_flatten_with_path(y)[0])
            if paths == self.outputs.paths:
                self.spec = spec
        if spec != self.spec:
            raise RuntimeError(
                f"the tile at {tile.origin} of shape {tuple(tile_input.shape)} gave an output "
                f"structured as {spec}, where the traced module returns feature maps at "
                f"{', '.join(self.outputs.paths) or 'its top'}: the module does not behave like "
                f"its traced graph (was it changed after the forward began?)")
        return self.owned_leaves(leaves, tile, tile_input)

    def owned_leaves(self, leaves: list, tile: Tile, tile_input: torch.Tensor) -> list:
        """:meth:`owned` of the output's leaves (in ``torch.utils._pytree`` order)."""
        owned = []
        for leaf, part in zip(self.outputs.first_leaves, self.outputs.of(tile)):
            y = leaves[leaf]
            if not isinstance(y, torch.Tensor) or tuple(y.shape[2:]) != part.shape:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                where = f" {self.outputs.paths[leaf]}" if self.outputs.paths[leaf] else ""
                raise RuntimeError(
                    f"the tile at {tile.origin} of shape {tuple(tile_input.shape)} gave an "
                    f"output{where} of shape {shape}, expected spatial shape {part.shape}: the "
                    f"module does not behave like its traced geometry (was it changed after the "
                    f"forward began?)")
            owned.append(y[part.crop])
        return owned

    @contextlib.contextmanager
    def scope(self, tile: Tile, order=None):
        """Holds wherever the module's code runs for ``tile``: its forward and, in the
        backward, the recomputations a ``torch.utils.checkpoint`` inside the module makes
        (``state.tile_scope``; normalisations normalise with the whole image's statistics,
        their layers frozen). Yields the tile's ``norms.NormMode`` (None without such
        normalisations), to be told when the tile's forward is done. ``order``: the
        normalisation calls a run from a checkpoint makes (``checkpoints.Program.order``)."""
        with tile_scope(self.pipeline), contextlib.ExitStack() as stack:
            if self.norms is None:
                yield None
                return
            stack.enter_context(frozen_modules(self.norms.nodes))
            mode = stack.enter_context(NormMode(self.norms, tile.index, order=order))
            yield mode

    def _finish(self, tile: Tile, raw: torch.Tensor) -> list:
        """``tile``'s owned outputs: from the checkpoint after the last level when the forward
        may start there (:meth:`checkpoints.Checkpoints.finishes`), else the whole module."""
        ck = self.checkpoints
        if ck is not None and ck.finishes(self.pipeline):
            cut = ck.final
            with self.scope(tile, order=ck.program.order(cut.position)):
                out = ck.program.run(ck.read(cut, tile, self.device), cut.position)
            return self.owned_leaves(tree_leaves(out), tile, raw)
        tile_input = self.feed(raw)
        with self.scope(tile), self.watching(tile, tile_input):
            return self.run(tile_input, tile)

    @contextlib.contextmanager
    def watching(self, tile: Tile, tile_input: torch.Tensor):
        """With ``skip``: notes whether every value ``tile`` computes is finite."""
        if not self.skip:
            yield
            return
        with FiniteWatch(tile_input) as watch:
            yield
        self.finite[tile.index] = watch.finite

    def _tiles(self) -> list:
        """The tiles of the forward and the backward, in order; reusing overlaps, each reading
        what its program needs of the input (``Strips.widened``)."""
        tiles = iter_tiles(self.tilings)
        return list(tiles) if self.strips is None else [self.strips.widened(t) for t in tiles]

    def first_tile(self):
        """The first tile's owned part of each output map, and every tensor the pipeline read
        for it."""
        tile = self._tiles()[0]
        stats = self.stats.forward
        with torch.no_grad(), self.inputs("forward", [tile], self._forward_read, stats) as inputs:
            ((_, raw, _),) = inputs
            tile_input = self.feed(raw)
            with TensorUse(tile_input) as use, self.scope(tile), self.watching(tile, tile_input):
                ys = self.run(tile_input, tile)
            stats.tiles, stats.computed = 1, 1
        return ys, use.read

    def forward(self, first: list, snapshot: Snapshot, kept: Kept | None = None,
                allocate=None) -> list:
        """Each stitched output map on the module's device (from ``first``, the first tile's
        parts), computed without building a graph (but for the last ``kept.count`` tiles,
        whose graphs ``kept`` keeps for the backward). ``allocate(k, shape)``: what map
        ``k`` 's owned parts are written into (default: a new tensor; ``dense.ArrayOutput``:
        an array), returned."""
        stats = self.stats.forward
        tiles = self._tiles()
        keep_from = len(tiles) - (kept.count if kept is not None else 0)
        with torch.no_grad(), self.inputs("forward", tiles[1:], self._forward_read, stats) as inputs:
            outs = [allocate(k, y.shape[:2] + spatial) if allocate is not None else
                    y.new_empty(y.shape[:2] + spatial)
                    for k, (y, spatial) in enumerate(zip(first, self.outputs.spatial))]
            self._place(outs, tiles[0], first)
            for position, (tile, raw, same) in enumerate(inputs, start=1):
                stats.tiles += 1
                if same is not None:  # the same pixels and geometry as an earlier tile
                    self._place(outs, tile, [out[part.out] for out, part in zip(
                        outs, self.outputs.of(same))])
                    continue
                if position >= keep_from:
                    self._place(outs, tile, [y.detach() for y in self._keep(tile, raw, kept)])
                else:
                    ys = self._finish(tile, raw)
                    self._place(outs, tile, ys)
                    del ys
                snapshot.check_tile()
                stats.computed += 1
        if self.duplicates is not None:
            self.duplicates.release()
        if self.strips is not None:
            self.stats.strip_bytes = self.strips.stored_bytes
        return outs

    def _place(self, outs: list, tile: Tile, ys: list) -> None:
        """Write ``tile``'s owned parts ``ys`` into the stitched maps ``outs``."""
        for out, part, y in zip(outs, self.outputs.of(tile), ys):
            out[part.out] = y

    def _keep(self, tile: Tile, raw: torch.Tensor, kept: Kept) -> list:
        """Run ``tile`` as the backward would recompute it - grad enabled, on ``kept``'s
        aliases, gradient hooks observed - and keep its owned outputs' graph."""
        leaf = raw.detach().requires_grad_(kept.x_grad)
        with torch.enable_grad(), substituted(self.pipeline, kept.tensors), \
                observing_gradient_hooks(self.pipeline):
            tile_input = self.feed(leaf)
            with self.scope(tile), self.watching(tile, tile_input):
                ys = self.run(tile_input, tile)
        kept.graphs[tile.index] = (leaf, ys)
        return ys

    def owned_gradients(self, tile: Tile, grads: list) -> list:
        """The output gradient of each part ``tile`` owns (None for a map without one)."""
        return [None if g is None else g[part.out] for g, part in zip(grads, self.outputs.of(tile))]

    def _with_gradient(self, tiles: list, grads: list) -> list:
        """``tiles`` without those whose (group's) output gradients are exactly zero or none
        and whose forward computed only finite values; never none (:mod:`streamcnn.skipping`)."""
        def zero(t: Tile) -> bool:
            group = [t] if self.duplicates is None else self.duplicates.group(t)
            return zero_gradient(g for u in group for g in self.owned_gradients(u, grads))
        wanted = [t for t in tiles if not (self.finite.get(t.index, False) and zero(t))]
        return wanted or tiles[:1]

    def backward(self, source, grads: list, need_x: bool, tensors: dict, wrt: list,
                 x_grad: bool = False, kept: Kept | None = None, need: list = (),
                 fused: "Fused | None" = None):
        """Input gradient (on the input's device; None where it is not wanted or, as in
        conventional autograd, where no tile's output depends on its input differentiably:
        through ``detach()`` or a comparison) and the summed gradient of each of ``wrt``,
        recomputing every tile with ``tensors`` (name -> tensor) in place of the pipeline's
        own, from ``grads``, the gradient of each output map (None: the loss does not use
        it). Each tile requires grad as the input did (``x_grad``) whether or not its
        gradient is wanted (``need_x``): code that asks (a reentrant ``checkpoint``) then
        runs as it did conventionally.

        Each tile's gradients are accumulated into the ``.grad`` of its leaves - the tile
        and ``wrt``, fresh tensors only this backward holds - by the autograd engine (not
        ``autograd.grad``, which a reentrant ``checkpoint`` inside the module rejects),
        and moved out after every tile. Tiles whose graphs the forward ``kept``
        (:mod:`streamcnn.keeping`) are backpropagated first, without recomputing, into the
        aliases they were built on (``need``: which of those are wanted); a second backward
        recomputes them.

        With ``dedup``, each group of identical tiles is recomputed once and backpropagated
        with the sum of the group's output gradients, or once per tile of the group through
        the kept graph when the input gradient is wanted (``dedup.gradient_parts``).

        ``fused``: the backward-terms passes did this backward above the gradient cut
        ``fused.top`` (:class:`Fused`); the tiles then run only below it, and ``wrt``'s
        gradients add to what those passes found."""
        try:
            return self._backward(source, grads, need_x, tensors, wrt, x_grad, kept, need, fused)
        finally:
            if fused is not None and fused.top is not None:
                self.checkpoints.grads.close()  # (the passes left the top's gradient for it)

    def _backward(self, source, grads, need_x, tensors, wrt, x_grad, kept, need, fused):
        grad_x = torch.zeros_like(source.tensor) if need_x else None
        replayed: dict = {}  # normalisation -> how often a checkpoint ran it again in a tile
        reached = False  # whether any tile's input got a gradient
        top = None if fused is None else fused.top
        sums: list = [None] * len(wrt) if top is None else list(fused.sums)
        tiles = self._tiles()
        stats = self.stats.backward = PassStats(tiles=len(tiles))  # (a second backward: anew)
        before = versions(self.pipeline)  # (a forward since this one's may have updated some)
        if self.duplicates is not None:
            tiles = list(self.duplicates.computed(tiles))
        if self.strips is not None:  # later tiles first: they leave gradients in the strips
            tiles.reverse()
            self.strips.discard_gradients()
        if self.skip and all_finite(tensors.values()):
            with_gradient = self._with_gradient(tiles, grads)
            stats.skipped, tiles = len(tiles) - len(with_gradient), with_gradient
        graphs = kept.graphs if kept is not None else {}
        reuse = [t for t in tiles if t.index in graphs]
        tiles = [t for t in tiles if t.index not in graphs]
        with substituted(self.pipeline, tensors), observing_gradient_hooks(self.pipeline):
            for tile in reuse:
                leaf, ys = graphs[tile.index]
                with self.scope(tile) as mode:
                    reached |= self._backprop(tile, ys, leaf, grads, need_x, grad_x, mode)
                stats.reused += 1
            graphs.clear()  # (their graphs are spent)
            if kept is not None:
                collect(sums, kept.needed(need))
            release()  # (the terms passes before this one left their heap behind: one
            # re-fault per step; not between the level passes, alike in size, where every
            # release would fault the next pass's memory in again)
            with self.inputs("backward", tiles, lambda t: (t, self.read(source, t), None),
                             stats) as inputs:
                cuts = [] if self.checkpoints is None else self.checkpoints.segments(self.pipeline)
                if top is not None:
                    cuts = [c for c in cuts if c.position < top.position]
                for tile, raw, _ in inputs:
                    leaf = raw.detach().requires_grad_(need_x or x_grad)
                    parts = self._segmented(tile, grads, need_x) if cuts and top is None else None
                    if top is not None:
                        found, seen = self._backprop_below(tile, leaf, top, cuts, need_x, grad_x)
                        reached |= found
                        if stats.computed == 0:
                            replayed = seen
                    elif parts is not None:
                        found, seen = self._backprop_segments(tile, leaf, parts, cuts, need_x,
                                                              grad_x)
                        reached |= found
                        if stats.computed == 0:
                            replayed = seen
                    else:
                        with torch.enable_grad(), self.scope(tile) as mode:
                            ys = self.run(self.feed(leaf), tile)
                            if mode is not None:
                                mode.replaying()
                            reached |= self._backprop(tile, ys, leaf, grads, need_x, grad_x, mode)
                        del ys
                        if self.strips is not None:
                            self.strips.deposit()
                        if mode is not None and stats.computed == 0:
                            replayed = mode.replayed
                    check_unchanged(self.pipeline, before)
                    stats.computed += 1
                    collect(sums, wrt)
        update_replayed(replayed, self.norms)
        return grad_x if reached else None, sums

    def _backprop(self, tile: Tile, ys: list, leaf, grads: list, need_x: bool, grad_x,
                  mode: NormMode | None) -> bool:
        """Backpropagate one tile's owned outputs ``ys`` (with its dedup group's output
        gradients, and its whole-map corrections through ``mode``) and add its input gradient
        into ``grad_x``; whether the tile's input got one."""
        group = [tile] if self.duplicates is None else self.duplicates.group(tile)
        parts = gradient_parts(group, lambda t: self.owned_gradients(t, grads), separate=need_x)
        return self._backprop_parts(ys, leaf, parts, need_x, grad_x, mode)

    def _backprop_parts(self, ys: list, leaf, parts: list, need_x: bool, grad_x,
                        mode: NormMode | None) -> bool:
        """Backpropagate ``ys`` once per (tiles, gradients) pair of ``parts``, each pair's
        input gradient added into ``grad_x`` at its first tile's place; whether one came."""
        reached = False

        def take(place: Tile) -> None:
            nonlocal reached
            if need_x and leaf.grad is not None:
                grad_x[place.inp] += leaf.grad
                leaf.grad = None
                reached = True

        backward_parts(ys, parts, mode, after=take)
        return reached

    def _segmented(self, tile: Tile, grads: list, need_x: bool) -> tuple | None:
        """The (tiles, gradients) part ``tile``'s backward takes (``dedup.gradient_parts``)
        where it may run in segments (:meth:`_backprop_segments`, with the cuts
        ``Checkpoints.segments`` allows): one part stands for the tile's group (else a
        member's gradient would have to go down every segment apart); else None."""
        group = [tile] if self.duplicates is None else self.duplicates.group(tile)
        parts = gradient_parts(group, lambda t: self.owned_gradients(t, grads), separate=need_x)
        return parts[0] if len(parts) == 1 else None

    def _backprop_below(self, tile: Tile, leaf, top, cuts: list, need_x: bool, grad_x) -> tuple:
        """The step's own backward of ``tile`` below the gradient cut ``top``, above which the
        backward-terms passes did it (:class:`Fused`): the program from the tile input to
        ``top``, backpropagated from the whole gradient stored there, at the positions the tile
        owns; in segments between the forward ``cuts`` below ``top`` where one backward
        stands for the tile's group (:meth:`_backprop_segments`), else in one run with a
        backward per member. (Whether the input got a gradient; ``NormMode.replayed``.)"""
        ck = self.checkpoints
        group = [tile] if self.duplicates is None else self.duplicates.group(tile)
        if cuts and (len(group) == 1 or not need_x):
            return self._backprop_segments(tile, leaf, (group, None), cuts, need_x, grad_x, top)
        with torch.enable_grad(), self.scope(tile, order=ck.program.order(0)) as mode:
            env = {ck.program.placeholder: self.feed(leaf)}
            ck.program.run(env, 0, top.position)
            ys, _ = ck.owned_gradients(top, tile, env)
            parts = gradient_parts(group, lambda t: ck.owned_gradients(top, t, env)[1],
                                   separate=need_x)
            del env
            mode.replaying()
            return self._backprop_parts(ys, leaf, parts, need_x, grad_x, mode), mode.replayed

    def _backprop_segments(self, tile: Tile, leaf, part, cuts: list, need_x: bool,
                           grad_x, top=None) -> tuple:
        """:meth:`_backprop` of ``tile`` one segment of the program at a time, the last first:
        each starts at the forward cut its level's pass stored (the first at the tile input),
        read over the tile's span as leaves, and is backpropagated from the gradient the
        segment after it left at those leaves. The tile's whole graph is never alive at once,
        only one segment's: its peak memory is the largest segment's, not the whole module's
        (the whole-image gradient of a global step is why every level needs its own pass
        anyway; these segments cost no more arithmetic than one run from the input). The
        values are the passes' own (exact, :mod:`streamcnn.checkpoints`), and the chain rule
        through the leaves gives the gradients of one run. (Whether the input got a gradient;
        the calls a checkpoint inside the module ran again: ``NormMode.replayed``.) With
        ``top``, a gradient cut after ``cuts``, the last segment ends there, backpropagated
        from the gradient stored there (:meth:`_backprop_below`; ``part``'s gradients: None)."""
        ck = self.checkpoints
        members, gs = part
        starts = [None] + cuts  # (None: the tile input)
        stops = cuts + [top]  # (None: the outputs)
        after: dict = {}  # name -> gradient at the cut the later segment started from
        replayed: dict = {}
        reached = False
        for k in reversed(range(len(starts))):
            cut, stop = starts[k], stops[k]
            position = 0 if cut is None else cut.position
            with torch.enable_grad(), self.scope(tile, order=ck.program.order(position)) as mode:
                if cut is None:
                    env = {ck.program.placeholder: self.feed(leaf)}
                    leaves = {}
                else:
                    leaves = ck.read(cut, tile, self.device, requires_grad=True)
                    env = {n: v.clone() for n, v in leaves.items()}  # (non-leaves: a layer may
                    # work in place)
                out = ck.program.run(env, position, None if stop is None else stop.position)
                if stop is None:
                    ys, parts = self.owned_leaves(tree_leaves(out), tile, leaf), [part]
                elif k == len(cuts):  # (top: the group's stored gradients, summed)
                    ys, _ = ck.owned_gradients(top, tile, env)
                    parts = gradient_parts(members, lambda t: ck.owned_gradients(top, t, env)[1],
                                           separate=False)
                else:
                    ys = [env[n] for n in stop.names if after.get(n) is not None]
                    parts = [(members, [after[n] for n in stop.names if after.get(n) is not None])]
                del env, out
                mode.replaying()
                backward_parts(ys, parts, mode)
                del ys, parts
                replayed.update(mode.replayed)
            after = {n: v.grad for n, v in leaves.items()}
            del leaves
        if need_x and leaf.grad is not None:
            grad_x[members[0].inp] += leaf.grad
            leaf.grad = None
            reached = True
        return reached, replayed


def backward_owned(ys: list, grads: list, retain_graph: bool = False, inputs=()) -> None:
    """Backpropagate a tile's owned outputs ``ys`` together, each that requires grad with its
    gradient in ``grads`` (None: the loss does not use that output); ``inputs``: the only
    leaves to accumulate into (none: every leaf)."""
    pairs = [(y, g) for y, g in zip(ys, grads) if g is not None and y.requires_grad]
    if pairs:
        backward_here([y for y, _ in pairs], [g for _, g in pairs], retain_graph=retain_graph,
                      inputs=inputs)


def backward_parts(ys: list, parts: list, mode: NormMode | None, after=None, inputs=()) -> None:
    """Backpropagate a recomputed tile's owned outputs ``ys`` once per (tiles, gradients)
    pair of ``parts`` (``dedup.gradient_parts``; the graph is kept for the next), each
    standing for its tiles (``mode``: their whole-map corrections are added, once each);
    ``after(tiles[0])`` takes what belongs to that pair's place before the next."""
    with torch.enable_grad():
        for k, (tiles, gs) in enumerate(parts):
            if mode is not None:
                mode.stand_for([t.index for t in tiles])
            backward_owned(ys, gs, retain_graph=k + 1 < len(parts), inputs=inputs)
            if after is not None:
                after(tiles[0])


def collect(sums: list, leaves) -> None:
    """Move each leaf's ``.grad`` into ``sums`` (one per leaf, in order), added."""
    for i, t in enumerate(leaves):
        g, t.grad = t.grad, None
        if g is not None:  # (own the first: a gradient may alias grad_out)
            sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)


@dataclass
class Fused:
    """The step's own backward, done inside the backward-terms passes wherever the gradient
    is complete there (``passes.backward_terms``): above the gradient cut a pass starts
    from, every whole-map step is a deeper level's, whose terms are known, so that part of
    each tile's backward is the final one, and its parameter gradients are taken there.
    The final backward then runs only below ``top``, the last cut the passes stored a
    gradient at. Only where the program runs as the module (``Checkpoints.fuses``)."""

    tensors: dict  # the module's tensors for the passes: the final backward's aliases
    wrt: list  # the aliases whose gradients are wanted
    sums: list  # their gradients from the parts done so far (as TileRunner.backward's)
    top: object = None  # the gradient cut below which the final backward runs (None: all)


@dataclass
class Job:
    """Everything one streamed forward hands to its backward, besides saved tensors."""

    runner: TileRunner
    captured: Captured
    snapshot: Snapshot
    first: list | None  # the first tile's owned part of each output map
    nodes: list  # autograd node of x and of each captured grad tensor (None: needs no grad)
    autocast: tuple
    kept: Kept | None = None  # the last tiles' graphs (streamcnn.keeping)
    before_backward: object = None  # (source, grads, tensors, x_grad) -> None: whole-map terms
    reuse_memory: object = False  # keep freed memory on the heap while the backward runs (allocator)


class StreamFunction(torch.autograd.Function):
    """Autograd node for the whole streamed module.

    Inputs: the image (None when it is not a tensor) and the module tensors that
    require grad (as the forward read them). Saved: those, and the module's other tensors the forward read, so that an
    in-place change of any of them before backward raises as in conventional autograd.
    Outputs: the stitched map, or with several output leaves one tensor per leaf (a map
    returned twice, twice: then the engine sends its gradient along one of them); the
    backward then gets ``None`` for a leaf the loss does not use, not zeros.
    """

    @staticmethod
    def forward(ctx, job: Job, x: torch.Tensor | None, *grad_tensors: torch.Tensor):
        leaves = job.runner.outputs.leaves(job.runner.forward(job.first, job.snapshot, job.kept))
        job.first = None
        ctx.job = job
        ctx.save_for_backward(x, *grad_tensors, *job.captured.const_tensors, *job.captured.others)
        if len(leaves) == 1:
            return leaves[0]
        ctx.set_materialize_grads(False)
        return tuple(leaves)

    @staticmethod
    def backward(ctx, *grad_leaves):
        refuse_higher_order("Streaming", "its backward recomputes tiles outside the graph")
        job = ctx.job
        saved = ctx.saved_tensors  # raises if any was changed in place since the forward
        k, c = len(job.captured.grad_tensors), len(job.captured.const_tensors)
        x, grads_in, consts = saved[0], saved[1:1 + k], saved[1 + k:1 + k + c]
        job.snapshot.check_backward()
        need_x = ctx.needs_input_grad[1] and _will_run(job.nodes[0])
        need = [ctx.needs_input_grad[2 + i] and original.requires_grad and _will_run(node)
                for i, (original, node) in enumerate(zip(job.captured.grad_tensors, job.nodes[1:]))]
        grads = job.runner.outputs.map_gradients(grad_leaves)
        if not need_x and not any(need) or all(g is None for g in grads):
            return (None,) * (2 + k)
        aliases = [t.detach().requires_grad_(n) for t, n in zip(grads_in, need)]
        tensors = job.captured.substitutes(aliases, consts)
        wrt = [a for a, n in zip(aliases, need) if n]
        fused = None
        device_type, enabled, dtype = job.autocast
        with reuse_freed_memory(job.reuse_memory), torch.autocast(device_type, dtype=dtype,
                                                                  enabled=enabled):
            source = job.runner.source if x is None else TensorSource(x)
            if job.before_backward is not None:
                if job.runner.fuses():
                    fused = Fused(tensors, wrt, [None] * len(wrt))
                # (hooks may only observe, as in the final backward: the passes do part of it)
                with observing_gradient_hooks(job.runner.pipeline):
                    job.before_backward(source, grads, job.captured.substitutes(
                        [t.detach() for t in grads_in], consts), ctx.needs_input_grad[1], fused)
            grad_x, sums = job.runner.backward(source, grads, need_x, tensors, wrt,
                                               x_grad=ctx.needs_input_grad[1], kept=job.kept,
                                               need=need, fused=fused)
        grads = iter(sums)
        return (None, grad_x, *(next(grads) if n else None for n in need))


def refuse_higher_order(what: str, why: str) -> None:
    """In a streamed node's backward: refuse ``create_graph=True`` (the engine enables grad
    mode exactly then), saying ``why`` ``what`` has no graph to differentiate again."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} does not support higher-order gradients (backward or autograd.grad with "
            f"create_graph=True, e.g. gradient penalties): {why}. Use create_graph=False, or "
            f"the unstreamed module")


def _will_run(node) -> bool:
    """Whether the autograd engine will use the gradient sent along to ``node``."""
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # not decidable here: compute it
        return True


def autocast_state(device_type: str):
    try:
        return (device_type, torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type))
    except (RuntimeError, AttributeError):  # device without autocast support
        return device_type, False, None
