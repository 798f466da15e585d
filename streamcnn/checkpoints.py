"""Level checkpoints: the feature maps where the statistics passes of whole-map steps begin,
stored as the passes first compute them, so that each later pass starts from them instead of
from the image (and, in the backward passes, the gradient at such a cut likewise).

A network with K levels of whole-map steps (normalisations over space, global steps) needs
K streamed forward passes and K backward passes before its step (:mod:`streamcnn.passes`).
Run from the image, pass k recomputes every layer before level k: the cost grows as K².
With checkpoints, the traced graph runs as a program of fx nodes, and a *cut* at position
``p`` of that program is the set of values computed before ``p`` and read at or after it.
A cut whose values are all feature maps can be stored, whole-image, from each tile's owned
part (``tiling.owned_parts``); a tile then starts at ``p`` from the stored maps read over
its own span (``geometry.spans``). That is exact for every valid value: positions outside
a tile's valid interval never reach one, so reading the true values there changes nothing
kept.

Forward pass of level L starts at ``forward_cut(L)``: the latest storable cut before the
first whole-map step of level L - 1 (everything before it has level < L - 1 values, which
pass L - 1 computed correctly, and the pass runs level L - 1's steps with their statistics).

Backward pass of level L (deepest first) runs from ``forward_cut(L)`` to the gradient cut
the deeper pass stored, injects that gradient at the positions each tile owns, and
backpropagates to the level's steps; on the way it stores the gradient at
``gradient_cut(L)``: the earliest storable cut after every step of level <= L, whose
gradient is complete once the deeper levels' terms are known. Each position's gradient is
the sum of the tiles' contributions over their spans, each exact for the same reason.

Storage is in host memory, or in files in a folder removed when the step's objects are
freed (or at once when a pass fails); ``"auto"`` keeps maps in memory up to half of the
memory available when the step starts, then spills to files. A file is mapped only for the
length of one access, so the maps in files stay out of the process's resident memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from . import rules
from .errors import TileTooSmallError, internal_assert
from .geometry import Span, lengths, spans
from .norms import NormState, levels
from .tiling import Tile, owned_parts, tile_image

STORAGE = ("auto", "memory", "disk")


def check_storage(checkpoints) -> str | os.PathLike | bool:
    """``checkpoints`` as ``Streaming`` takes it: ``"auto"``, ``"memory"``, ``"disk"``, a
    folder (str or ``os.PathLike``: files there), or False (passes start at the image)."""
    if checkpoints is False or checkpoints is None:
        return False
    if isinstance(checkpoints, os.PathLike) or (isinstance(checkpoints, str) and
                                                (checkpoints not in STORAGE and os.sep in checkpoints)):
        if not os.path.isdir(checkpoints):
            raise ValueError(f"checkpoints={str(checkpoints)!r}: no such folder; give an existing "
                             f"folder for the stored maps, or one of {STORAGE}, or False")
        return checkpoints
    if checkpoints not in STORAGE:
        raise ValueError(f"checkpoints must be one of {STORAGE}, a folder, or False (recompute "
                         f"every pass from the image), got {checkpoints!r}")
    return checkpoints


# ------------------------------------------------------------------ the program

@dataclass(frozen=True)
class Cut:
    """A place in the program: nodes before ``position`` have run; ``names``: the values
    computed before it and read at or after it (all feature maps), with their steps."""

    position: int
    names: tuple[str, ...]
    steps: tuple[int, ...]

    @property
    def image(self) -> bool:
        """Starts at the tile input (nothing stored)."""
        return self.position == 0


class Program:
    """The traced graph's fx nodes as a program that runs from any cut (a minimal
    ``fx.Interpreter`` over the traced :class:`trace.Pipeline`, whose modules are the user's)."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes = list(graph.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.placeholder = next(n.name for n in self.nodes if n.op == "placeholder")
        self.steps = {name: i for name, i in graph.node_steps().items()  # feature maps
                      if graph.steps[i].kind != "global"  # (not a pooled value,
                      and name not in graph.structures  # nor the tuple of a split,
                      and not any(rules.is_positions(r) for r in graph.steps[i].dims)}  # nor a
        # sequence of positions: a tile's is its own positions, not a span of the image's
        self.steps[self.placeholder] = 0
        dynamic: set = set()
        for n in self.nodes:  # nodes that depend on the input (the rest are constants)
            if n.name == self.placeholder or any(a.name in dynamic for a in n.all_input_nodes):
                dynamic.add(n.name)
        self.dynamic = frozenset(dynamic)
        self.last_use = {n.name: max((self.index[u.name] for u in n.users), default=-1)
                         for n in self.nodes}
        self.freed_after: dict = {}  # node index -> the values it reads last (free after it)
        for name, i in self.last_use.items():
            self.freed_after.setdefault(i, []).append(name)
        self.calls = {node.name: k for k, (node, _, _) in enumerate(graph.norm_nodes())}

    def crossing(self, p: int) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes[:p]
                     if n.name in self.dynamic and self.last_use[n.name] >= p)

    def cut(self, p: int) -> Cut | None:
        """The cut at ``p``, or None where a value crossing it is not a feature map (a pooled
        vector, a size, a tuple)."""
        names = self.crossing(p)
        if any(n not in self.steps for n in names):
            return None
        if set(names) <= {self.placeholder}:
            return Cut(0, (), ())
        return Cut(p, names, tuple(self.steps[n] for n in names))

    def order(self, start: int) -> list[int]:
        """The whole-map calls (``norms.NormState.calls``) a run from ``start`` makes, in order."""
        return [self.calls[n.name] for i, n in enumerate(self.nodes)
                if n.name in self.calls and (i >= start or n.name not in self.dynamic)]

    def run(self, env: dict, start: int, stop: int | None = None, at: dict | None = None):
        """Run the nodes from ``start`` (the constants before it too) with ``env`` holding the
        values crossing ``start``; before node ``i`` runs, ``at[i](env)``. Returns the output
        structure, or None where ``stop`` (a position) comes first. A value leaves ``env``
        once its last reader has run, as the module's own locals would: ``env`` holding every
        value of the run would keep tensors alive that autograd does not need (without grad,
        all of them); what crosses ``stop`` stays."""
        root, at = self.graph.root, at or {}
        for i, node in enumerate(self.nodes):
            if i in at:
                at[i](env)
            if stop is not None and i >= stop:
                return None
            if (i < start and node.name in self.dynamic) or node.name in env:
                continue
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a.name])
            env[node.name] = _call(root, node, env)
            for name in self.freed_after.get(i, ()):
                env.pop(name, None)
        return None


def _call(root: nn.Module, node: fx.Node, env: dict):
    return run_node(root, node, fx.node.map_arg(node.args, lambda a: env[a.name]),
                    fx.node.map_arg(node.kwargs, lambda a: env[a.name]))


def run_node(root: nn.Module, node: fx.Node, args, kwargs):
    """What fx node ``node`` computes from ``args``/``kwargs`` (its inputs' values)."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        obj = root
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    internal_assert(node.op == "placeholder" and node.args, f"cannot run fx node {node.op}")
    return node.args[0]  # a parameter of forward with a default value


# ------------------------------------------------------------------ the cuts of a graph

@dataclass(frozen=True)
class Cuts:
    """Where each level's statistics pass starts (``forward``; one more, after the deepest
    level, stored by its pass) and the gradient cut each backward pass leaves (``gradient``,
    None: none storable after the level), per level."""

    forward: dict
    gradient: dict

    def following(self, level) -> Cut:
        """Where the backward pass of ``level`` starts: the statistics pass of the next
        level's cut, the latest before ``level``'s steps (all statistics are known then)."""
        return self.forward[min(lv for lv in self.forward if lv > level)]

    def saved(self, order) -> dict:
        """Level -> the gradient cut its backward pass stores, for the levels ``order`` (lowest
        first), deepest first as the passes run: none for the lowest level (no pass reads it)
        nor where the deeper pass stored the same cut (its gradient is already complete). The
        last one stored, the lowest level's that has one, is where the final backward ends
        (``function.Fused.top``)."""
        saved, deeper = {}, None
        for lv in reversed(order[1:]):
            save = self.gradient[lv]
            if save is not None and deeper is not None and save.position == deeper.position:
                save = None
            saved[lv] = save
            deeper = save if save is not None else deeper
        return saved

    @property
    def steps(self) -> tuple[int, ...]:
        """Every stored map's step: the tiles must own a part of each (tiling targets)."""
        cuts = list(self.forward.values()) + [c for c in self.gradient.values() if c is not None]
        return tuple(sorted({s for c in cuts for s in c.steps}))


def plan_cuts(program: Program, level_of: dict) -> Cuts:
    """The cuts of a graph whose whole-map steps (fx node name -> level) are ``level_of``."""
    levels = sorted(set(level_of.values()))
    first = {lv: min(program.index[n] for n, v in level_of.items() if v == lv) for lv in levels}
    forward = {levels[0]: Cut(0, (), ())}
    for before, lv in zip(levels, levels[1:] + [levels[-1] + 1]):
        start = forward[before].position
        found = next((c for p in range(first[before], start, -1) if (c := program.cut(p))), None)
        forward[lv] = found or forward[before]
    gradient = {}
    for lv in levels:
        after = 1 + max(program.index[n] for n, v in level_of.items() if v <= lv)
        gradient[lv] = next((c for p in range(after, len(program.nodes))
                             if (c := program.cut(p)) and not c.image), None)
    return Cuts(forward, gradient)


def runs_as_module(graph) -> bool:
    """Whether the traced program runs as the module does: it calls the leaf modules (and
    their hooks), but not the hooks of the modules fx traced through, nor global hooks, and
    it runs through a reentrant ``torch.utils.checkpoint`` as if it were not there."""
    leaves = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    return not graph.reentrant and \
        not hooked(m for name, m in graph.root.named_modules() if name not in leaves)


def hooked(modules) -> bool:
    """Whether a forward hook (or pre-hook) would see a call of any of ``modules``."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


# ------------------------------------------------------------------ storage

def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class _File:
    """A map stored in a file: mapped only while one access of it runs."""

    path: str
    numel: int
    nbytes: int
    shape: tuple
    dtype: torch.dtype
    memory_format: torch.memory_format


class MapStore:
    """Whole-image tensors by name, in host memory or in files of a temporary folder.
    ``close()`` removes the folder; so does freeing the store.

    A file is mapped (``torch.from_file``, shared) only for the length of one access: a read
    of a span, a write or an add of a part. Pages of a mapped file count in the process's
    resident set while they are mapped, so a mapping kept for the whole step would hold every
    page the tiles touched; unmapped, they stay in the page cache (the kernel's, reclaimable),
    and the process holds none of the stored maps between accesses. Each access indexes the
    same whole-map tensor as in memory, so both storages give the same values bit for bit."""

    def __init__(self, storage, peer: "MapStore | None" = None):
        self.storage = storage
        self.peer = peer  # a store whose memory counts against the same budget
        self.maps: dict[str, "torch.Tensor | _File"] = {}
        self.formats: dict[str, torch.memory_format] = {}
        self.folder = None
        self.budget = (peer.budget if peer is not None else _available_bytes() // 2) \
            if storage == "auto" else None
        self.memory_bytes = self.disk_bytes = 0
        self.files = 0
        self._finalizer = None

    def __contains__(self, name: str) -> bool:
        return name in self.maps

    def _on_disk(self, nbytes: int) -> bool:
        if self.storage == "memory":
            return False
        if self.storage == "auto":
            peer = self.peer.memory_bytes if self.peer is not None else 0
            return self.memory_bytes + peer + nbytes > self.budget
        return True

    def allocate(self, name: str, shape, dtype, zero: bool = False,
                 memory_format=torch.contiguous_format) -> None:
        """A whole map of ``shape`` in the layout the tiles' values have (so that writing and
        adding a tile's part copies without transposing); zeros with ``zero`` (a file's are)."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self._on_disk(nbytes):
            if self.folder is None:
                parent = self.storage if self.storage not in STORAGE else None
                self.folder = tempfile.mkdtemp(prefix="streamcnn-checkpoints-", dir=parent)
                self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
            self.files += 1
            path = os.path.join(self.folder, f"{self.files}-{name}.bin")
            with open(path, "xb") as f:
                f.truncate(nbytes)  # (zeros, no page written)
            self.maps[name] = _File(path, numel, nbytes, tuple(shape), dtype, memory_format)
            self.disk_bytes += nbytes
        else:
            t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
            if zero:
                t.zero_()
            self.maps[name] = t
            self.memory_bytes += nbytes
        self.formats[name] = memory_format

    def _whole(self, name: str) -> torch.Tensor:
        """The whole map: the tensor in memory, or a new mapping of its file, unmapped once
        the caller drops it (each access below holds it for its own length only)."""
        m = self.maps[name]
        if not isinstance(m, _File):
            return m
        return _laid_out(torch.from_file(m.path, shared=True, size=m.numel, dtype=m.dtype),
                         m.shape, m.memory_format)

    def read(self, name: str, index: tuple, device) -> torch.Tensor:
        """A copy of ``index`` of the map on ``device``, in the map's layout."""
        return self._whole(name)[index].to(device, memory_format=self.formats[name], copy=True)

    def part(self, name: str, index: tuple, device, dtype) -> torch.Tensor:
        """A copy of ``index`` of the map on ``device`` as ``dtype``, in the map's layout (the
        same strides from memory and from a file: kernels that sum over it, a normalisation's
        backward, then sum in the same order)."""
        return self._whole(name)[index].to(device, dtype, memory_format=self.formats[name],
                                           copy=True)

    def write(self, name: str, index: tuple, value: torch.Tensor) -> None:
        self._whole(name)[index] = value

    def add(self, name: str, index: tuple, value: torch.Tensor) -> None:
        self._whole(name)[index] += value

    def copy(self, name: str, source: tuple, target: tuple) -> None:
        """Index ``source`` of the map written at index ``target`` (of the same shape)."""
        whole = self._whole(name)
        whole[target] = whole[source]

    def drop(self, names) -> None:
        """Forget these maps (a file's space returns with it)."""
        for name in names:
            m = self.maps.pop(name, None)
            self.formats.pop(name, None)
            if isinstance(m, _File):
                self.disk_bytes -= m.nbytes
                os.unlink(m.path)
            elif m is not None:
                self.memory_bytes -= m.numel() * m.element_size()

    def close(self) -> None:
        self.maps.clear()
        self.formats.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()
        self.folder = self._finalizer = None


# ------------------------------------------------------------------ a step's checkpoints

class Checkpoints:
    """The stored maps and gradients of one input's passes: reads a cut over a tile's span,
    writes a tile's owned part of a cut, adds a tile's gradient at a cut."""

    def __init__(self, program: Program, cuts: Cuts, graph, tilings, storage, keep: bool = True):
        self.program, self.cuts, self.graph = program, cuts, graph
        self.keep = keep
        self.store = MapStore(storage)
        self.grads = MapStore(storage, peer=self.store)
        self._spans = [[spans(graph.axis(a), Span(t.length, a0, b0, a0, b0))
                        for a0, b0 in zip(t.starts, t.stops)] for a, t in enumerate(tilings)]
        self._lengths = [lengths(graph.axis(a), t.length) for a, t in enumerate(tilings)]
        self._owned = {s: owned_parts(graph, tilings, s) for s in cuts.steps}

    @property
    def stored_bytes(self) -> tuple[int, int]:
        """(bytes in memory, bytes in files) of the maps and gradients stored now."""
        return (self.store.memory_bytes + self.grads.memory_bytes,
                self.store.disk_bytes + self.grads.disk_bytes)

    def span(self, step: int, tile: Tile) -> tuple:
        """The index of ``tile``'s span of step ``step``'s map in the whole map."""
        dims = self.graph.steps[step].dims
        found = [self._spans[a][i][step] for a, i in enumerate(tile.index)]
        return tuple(slice(found[d].start, found[d].stop) if isinstance(d, int) else slice(None)
                     for d in dims)

    def read(self, cut: Cut, tile: Tile, device, requires_grad: bool = False) -> dict:
        """The values crossing ``cut`` over ``tile``'s span, from the stored maps."""
        env = {}
        for name, step in zip(cut.names, cut.steps):
            internal_assert(name in self.store, f"checkpoint {name} was not stored")
            value = self.store.read(name, self.span(step, tile), device)  # (a copy: the
            # program may work in place)
            env[name] = value.requires_grad_() if requires_grad else value
        return env

    def missing(self, cut: Cut) -> Cut:
        """The part of ``cut`` not stored yet (what the pass that reaches it writes)."""
        kept = [(n, s) for n, s in zip(cut.names, cut.steps) if n not in self.store]
        return Cut(cut.position, tuple(n for n, _ in kept), tuple(s for _, s in kept))

    def write(self, cut: Cut, tile: Tile, env: dict) -> None:
        """``tile``'s owned part of each value crossing ``cut`` into its map."""
        for name, step in zip(cut.names, cut.steps):
            value = env[name].detach()
            crop, place = self._owned[step][tile.index]
            if name not in self.store:
                self.store.allocate(name, self._whole(step, value), value.dtype,
                                    memory_format=_format(value))
            self.store.write(name, place, value[crop].to("cpu"))

    def copy(self, cut: Cut, source: Tile, tile: Tile) -> None:
        """``tile``'s owned part of each value crossing ``cut``, written as ``source``'s: a
        tile identical to it, which owns the same part of each (:mod:`streamcnn.dedup`)."""
        for name, step in zip(cut.names, cut.steps):
            self.store.copy(name, self._owned[step][source.index][1], self._owned[step][tile.index][1])

    def add_gradient(self, cut: Cut, tile: Tile, grads: dict) -> None:
        """Add ``tile``'s gradient at each value crossing ``cut`` (over its span)."""
        for name, step in zip(cut.names, cut.steps):
            g = grads.get(name)
            if g is None:
                continue
            key = _key(cut, name)
            if key not in self.grads:
                self.grads.allocate(key, self._whole(step, g), g.dtype, zero=True,
                                    memory_format=_format(g))
            self.grads.add(key, self.span(step, tile), g.detach().to("cpu"))

    def passed(self, level) -> None:
        """Level ``level``'s forward pass is done: without ``keep``, drop the maps no later
        forward pass starts from."""
        if self.keep:
            return
        later = {n for lv, c in self.cuts.forward.items() if lv > level for n in c.names}
        self.store.drop([n for n in list(self.store.maps) if n not in later])

    @property
    def final(self) -> Cut:
        """The cut after the deepest level, which its statistics pass stores (with ``keep``)."""
        return self.cuts.forward[max(self.cuts.forward)]

    def finishes(self, pipeline: nn.Module) -> bool:
        """Whether the forward's tiles may start at :attr:`final`: it is stored, and no module
        has a forward hook (the program would not call those of the layers before the cut,
        where a tile from the image would: a hook must see what it saw without checkpoints)."""
        cut = self.final
        if cut.image or not all(n in self.store for n in cut.names):
            return False
        return not hooked(pipeline.modules())

    def fuses(self, pipeline: nn.Module) -> bool:
        """Whether the backward-terms passes may do the step's own backward above the
        gradient cuts they start from (``function.Fused``): the forward may start at the
        stored cuts (:meth:`finishes`: no hooks, which would miss the layers run in the passes
        only) and no ``torch.utils.checkpoint`` is inside (the program runs through it, where
        the module's backward would run its layers again)."""
        return not self.graph.checkpointed and self.finishes(pipeline)

    def segments(self, pipeline: nn.Module) -> list:
        """The stored forward cuts other than the input, in program order, between which a
        training step's final backward runs (:meth:`function.TileRunner._backprop_segments`);
        empty unless every one is stored, the forward may start at them (:meth:`finishes`:
        no hooks) and no ``torch.utils.checkpoint`` is inside (the program runs through it,
        where the module's backward would run its layers again)."""
        if not self.fuses(pipeline):
            return []
        cuts = sorted({c for c in self.cuts.forward.values() if not c.image},
                      key=lambda c: c.position)
        if not all(n in self.store for c in cuts for n in c.names):
            return []
        return cuts

    def drop_gradients(self, cut: Cut) -> None:
        self.grads.drop([_key(cut, n) for n in cut.names])

    def owned_gradients(self, cut: Cut, tile: Tile, env: dict) -> tuple[list, list]:
        """``tile``'s owned part of each value crossing ``cut`` and of its stored gradient."""
        ys, gs = [], []
        for name, step in zip(cut.names, cut.steps):
            key = _key(cut, name)
            if key not in self.grads:
                continue
            crop, place = self._owned[step][tile.index]
            value = env[name]
            ys.append(value[crop])
            gs.append(self.grads.part(key, place, value.device, value.dtype))  # (autograd
            # leaves it as it is)
        return ys, gs

    def _whole(self, step: int, value: torch.Tensor) -> tuple:
        dims = self.graph.steps[step].dims
        return tuple(self._lengths[d][step] if isinstance(d, int) else value.shape[k]
                     for k, d in enumerate(dims))

    def close(self) -> None:
        self.store.close()
        self.grads.close()


def _key(cut: Cut, name: str) -> str:
    """A gradient's name in the store: a value crosses several cuts, with other gradients."""
    return f"{cut.position}-{name}"


def _laid_out(flat: torch.Tensor, shape, memory_format) -> torch.Tensor:
    """``flat`` as a tensor of ``shape`` with ``memory_format``'s strides."""
    if memory_format == torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    if memory_format == torch.channels_last_3d:
        n, c, d, h, w = shape
        return flat.view(n, d, h, w, c).permute(0, 4, 1, 2, 3)
    return flat.view(shape)


def _format(value: torch.Tensor) -> torch.memory_format:
    """The layout a tile's value had (oneDNN/cuDNN pick kernels by it)."""
    if value.dim() == 4 and not value.is_contiguous() and \
            value.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if value.dim() == 5 and not value.is_contiguous() and \
            value.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ------------------------------------------------------------------ entry points

def cuts_for(graph, storage) -> Cuts | None:
    """The cuts of ``graph``'s whole-map steps when they are worth storing (``storage`` not
    False, two levels or more, a program that runs as the module does), else None."""
    if storage is False:
        return None
    nodes = NormState.of(graph).nodes
    level_of = levels(graph, nodes)
    if len(set(level_of.values())) < 2 or not runs_as_module(graph):
        return None
    cuts = plan_cuts(Program(graph), level_of)
    if all(c.image for c in cuts.forward.values()) and not any(cuts.gradient.values()):
        return None
    return cuts


def tile(graph, spatial, tile_size, targets: tuple, storage) -> tuple:
    """(tilings, cuts): the tiles also cover the stored maps (``tiling.tile_image``
    ``targets``) unless the tile is too small for them; then the passes start at the image,
    unless ``storage`` asked for storage explicitly (an error that says so)."""
    cuts = cuts_for(graph, storage)
    if cuts is not None:
        try:
            return tile_image(graph, spatial, tile_size, tuple(targets) + cuts.steps), cuts
        except TileTooSmallError as err:
            if storage != "auto":
                raise TileTooSmallError(f"{err} (checkpoints={storage!r} stores maps the tiles "
                                        f"must cover; with checkpoints=False only the outputs "
                                        f"and normalised maps must be)") from err
    return tile_image(graph, spatial, tile_size, tuple(targets)), None


def attach(runner, graph, cuts: Cuts | None, storage, keep: bool) -> None:
    """Give ``runner`` the checkpoints of one input (``keep``: every stored map until the
    store is freed, for the backward passes; else each is dropped once no pass needs it)."""
    runner.checkpoints = None if cuts is None else \
        Checkpoints(Program(graph), cuts, graph, runner.tilings, storage, keep)


def estimate(graph, cuts: Cuts, step_bytes: list) -> tuple[int, float]:
    """(bytes stored, time factor) of a training step with checkpoints, from each step's
    whole-image bytes (``plan``'s activations): the stored maps of every forward cut plus
    the two gradient cuts alive at once; and the step's time over one with frozen
    statistics (four units: a forward, and a backward pass at three), each pass's work
    counted as the bytes of the steps it runs (a proxy for their arithmetic). Where the
    terms passes do the final backward above their gradient cuts (``function.Fused``: no
    hooks, no ``torch.utils.checkpoint`` inside), the final backward counts only below the
    last of them."""
    program = Program(graph)
    level_of = levels(graph, NormState.of(graph).nodes)
    order = sorted(set(level_of.values()))
    work = [step_bytes[program.steps[n.name]] if n.name in program.steps else 0
            for n in program.nodes]
    total = sum(work) or 1
    stored = {n: s for c in cuts.forward.values() for n, s in zip(c.names, c.steps)}
    grads = [sum(step_bytes[s] for s in c.steps) if c else 0 for c in cuts.gradient.values()]
    pairs = max((a + b for a, b in zip(grads, grads[1:])), default=max(grads, default=0))
    extra = 0.0
    top = next((c for c in reversed(cuts.saved(order).values()) if c is not None), None)
    fused = top is not None and not graph.checkpointed and not hooked(graph.root.modules())
    final = 3 * (sum(work[:top.position]) if fused else total)
    for k, lv in enumerate(order):
        start = cuts.forward[lv].position
        last = max(program.index[n] for n, v in level_of.items() if v == lv)
        extra += sum(work[start:last + 1])  # its statistics pass
        deeper = cuts.gradient.get(order[k + 1]) if k + 1 < len(order) else None
        begin = cuts.following(lv).position
        extra += 3 * sum(work[begin:deeper.position if deeper else len(work)])  # its terms pass
    return sum(step_bytes[s] for s in stored.values()) + pairs, (total + extra + final) / (4 * total)
