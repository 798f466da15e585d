"""Reused overlaps: each tile computes, at every step, only the positions no earlier tile
computed, and reads the rest of its window from strips earlier tiles stored
(:mod:`streamcnn.reuse` says which positions; this runs the traced graph on them).

Forward (tiles in row-major order): the traced program runs node by node; each step's
node runs on crops of its inputs' windows that give exactly the tile's new positions
(``reuse.crop``), the tile's window of the step is assembled from the strips of earlier
tiles and those positions, and the part of the new positions later tiles read is stored
(one band per axis, :class:`Strips`).

Backward (tiles in reverse order): a tile recomputes its new positions from the stored
strips, which enter its graph as leaves. Every position it computed that later tiles read
has, by now, their gradient in the gradient strips (later tiles ran first): a hook on the
new positions adds it to what the tile's own outputs send back, so one backward of the
tile's owned output gives every position it computed its complete gradient, and every
parameter each position's contribution exactly once. What reaches the strip leaves is the
gradient of positions earlier tiles computed: it is added into their gradient strips.

Under a strip budget (``Streaming(strip_budget=...)``, ``reuse.strips_within``) the steps
nearest the input keep no strips: a tile computes their whole need, from its input alone
(read a little wider where a crop aligned to a later stride reaches back: ``widened``).
The bands live with the module or, with ``strip_memory="host"``, in CPU memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import StreamingError, internal_assert
from .checkpoints import Program, run_node
from .geometry import Window
from .reuse import axis_reuse, crop, padded, refusal, strips_within
from .tiling import Tile

__all__ = ["Strips", "check_reusable", "reusable", "reuse_axes", "STRIP_MEMORY"]

#: where the strips live: with the module ("device") or in host memory ("host": a GPU
#: module's strips in CPU memory, each band copied in when a tile reads it)
STRIP_MEMORY = ("device", "host")


def reuse_axes(graph, tilings, exact, budget: int | None, batch: int, element_size: int) -> tuple:
    """``(stored, axes)``: the steps keeping strips (None: all) and each axis's reuse
    geometry, strips at every step or, under ``budget`` bytes, at the steps
    ``reuse.strips_within`` chooses (one rule for ``plan()`` and the run)."""
    def axes_for(stored):
        return [axis_reuse(graph.axis(a), t.length, t.own_starts, t.own_stops, exact, stored)
                for a, t in enumerate(tilings)]
    if budget is None:
        return None, axes_for(None)
    return strips_within(budget / (batch * element_size), len(graph.steps), axes_for,
                         strip_weights(graph))


def strip_weights(graph) -> list:
    """Elements per position and sample of each step's map (its channels; the input is read
    from the image, never stored)."""
    return [0] + [s.channels or 1 for s in graph.steps[1:]]


def check_strip_options(budget, memory) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"strip_budget must be None (strips at every step) or a number of bytes "
                         f">= 0, got {budget!r}")
    if memory not in STRIP_MEMORY:
        raise ValueError(f"strip_memory must be one of {STRIP_MEMORY}, got {memory!r}")


def check_reusable(graph, runs_as_module: bool) -> None:
    """Refuse, naming the step, a graph whose overlaps cannot be reused."""
    why = why_not(graph, runs_as_module)
    if why is not None:
        raise StreamingError(f"overlap='reuse' cannot run this module: {why}. Use "
                             f"overlap='recompute' (the default)")


def reusable(graph, runs_as_module: bool) -> bool:
    return why_not(graph, runs_as_module) is None


def why_not(graph, runs_as_module: bool) -> str | None:
    why = refusal(graph)
    if why is None:
        steps, dynamic = graph.node_steps(), Program(graph).dynamic
        other = next((n for n in graph.graph.nodes if n.name in dynamic and n.op not in
                      ("placeholder", "output") and n.name not in steps), None)
        if other is not None:
            why = (f"the module computes {other.name!r} ({other.op} {other.target}) from a "
                   f"feature map without it being a map itself (a size, a tuple of maps): each "
                   f"tile computes only a part of each map when overlaps are reused")
        elif graph.reentrant:
            why = ("it calls torch.utils.checkpoint with use_reentrant=True, which the traced "
                   "program runs through: where no input of it requires grad, its layers would "
                   "get gradients they get none of conventionally")
        elif not runs_as_module:
            why = ("forward hooks are registered on modules the tracer runs through: reusing "
                   "overlaps runs the traced program, which does not call them")
    return why


def exact_steps(graph) -> frozenset:
    """The steps that run without their own padding on exact crops (``reuse.crop``):
    calls of convolution layers that pad with zeros, with no hook to miss. They compute no
    position outside a tile's new ones (a module call computes the positions its padding
    adds at interior sides too, and they are dropped)."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return frozenset()
    found, steps = set(), graph.node_steps()
    for node in graph.graph.nodes:
        s = steps.get(node.name)
        if s is None or node.op != "call_module":
            continue
        m = graph.root.get_submodule(node.target)
        if type(m) in _CONVOLUTIONS and m.padding_mode == "zeros" and not node.kwargs \
                and len(node.args) == 1 and not (m._forward_hooks or m._forward_pre_hooks) \
                and all(r.pad_left == r.pad_right for r in graph.steps[s].rules):
            found.add(s)
    return frozenset(found)


_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def exact_conv(m: nn.Module, x: torch.Tensor, padding: tuple) -> torch.Tensor:
    """Convolution layer ``m`` on ``x`` with ``padding`` per axis: its own where the outputs
    read the image's border (``reuse.padded``), none where ``x`` holds all they read."""
    return _CONVOLUTIONS[type(m)](x, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)


def _crop(x: torch.Tensor, index: tuple, copy: bool = True) -> torch.Tensor:
    """``x[index]``: a view without grad; with grad one whose backward fills a zero tensor
    in ``x``'s layout (a slice's own backward fills a contiguous one, and copying a
    channels-last gradient into it transposes the whole map), a copy unless ``copy`` is
    False (for a convolution, which changes nothing in place: the copy would be saved
    for its backward beside the window)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x[index]
    return _Crop.apply(x, index, copy)


class _Crop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, copy):
        ctx.shape, ctx.index = x.shape, index
        ctx.layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        part = x[index]
        return part.clone(memory_format=torch.preserve_format) if copy else part  # (a view:
        # autograd refuses an in-place operation on it)

    @staticmethod
    def backward(ctx, grad):
        found = grad.new_zeros(ctx.shape).contiguous(memory_format=ctx.layout)
        found[ctx.index] = grad
        return found, None, None


@dataclass(frozen=True)
class _Act:
    """What one tile does at one traced step (geometry only)."""

    step: int
    new: tuple | None  # per axis (lo, hi) of the positions it computes; None: none
    exact: bool  # a convolution run unpadded (exact_steps)
    crops: dict  # input node -> index of its window the step reads (None: all of it)
    padding: tuple | None  # exact: the convolution's padding per axis (reuse.padded)
    out: tuple | None  # index of the new positions in what the node returns (None: all)
    bands: tuple  # (axis, index in the new positions) of each band stored
    window: object  # how the step's window is assembled (Strips._recipe; None: not at all)


class Strips:
    """The strips of one streamed input, and the tile program that reads and writes them.

    ``bands[(step, tile index, axis)]``: the values of a tile's new positions of a step that
    later tiles differing first along ``axis`` read; ``grads``: their gradients, left by
    those tiles in the backward. ``blocks``: per pass, each step's computed blocks (for
    counting: each position is computed once per pass)."""

    def __init__(self, graph, tilings, root, device: torch.device, *, budget: int | None = None,
                 memory: str = "device", batch: int = 1, element_size: int = 4):
        self.graph, self.root, self.device = graph, root, device
        self.home = torch.device("cpu") if memory == "host" else device  # (where bands live)
        self.exact = exact_steps(graph)
        self.stored, self.axes = reuse_axes(graph, tilings, self.exact, budget, batch, element_size)
        program = Program(graph)
        self.nodes, self.dynamic, self.placeholder = program.nodes, program.dynamic, program.placeholder
        self.freed_after = program.freed_after  # (values dropped after their last reader)
        self.steps = graph.node_steps()
        self.output_step = graph.maps[0]
        self.bands: dict = {}
        self.grads: dict = {}
        self.blocks: dict = {"forward": {}, "backward": {}}
        self.nodes_by_step = {self.steps[n.name]: n for n in self.nodes if n.name in self.steps}
        self._plans: dict = {}  # tile index -> what it does at each node (_program)
        self._leaves: list = []

    # -------------------------------------------------------------- sizes

    @property
    def stored_bytes(self) -> int:
        """Bytes held in activation strips now (their gradients come and go in the backward)."""
        return sum(b.numel() * b.element_size() for b in self.bands.values())

    # -------------------------------------------------------------- the tile program

    def run(self, tile: Tile, tile_input: torch.Tensor, recompute: bool = False):
        """The module's output structure for ``tile``, whose output maps hold just the part the
        tile owns. ``recompute``: the backward's run (strips are leaves, hooks add the
        gradients later tiles left); else the forward's (new positions' bands are stored)."""
        internal_assert(not self._leaves, "strip leaves of a tile not deposited")
        what = "backward" if recompute else "forward"
        env: dict = {}
        for i, (node, act) in enumerate(self._program(tile)):
            if act is None:  # (a constant)
                env[node.name] = run_node(self.root, node, *_values(node, env))
            elif act == "input":
                env[node.name] = tile_input
            elif act == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a.name])
            else:
                block = self._compute(act, env)
                if block is not None:
                    self.blocks[what].setdefault(act.step, []).append(act.new)
                    if recompute:
                        self._add_later_gradients(act, tile, block)
                    else:
                        self._store(act, tile, block)
                env[node.name] = block if act.window is None else \
                    self._window(act.window, block, recompute)
                del block
            for name in self.freed_after.get(i, ()):  # (as the module's own forward frees
                env.pop(name, None)  # what it no longer reads)
        internal_assert(False, "the traced program has no output")

    def _program(self, tile: Tile) -> list:
        """``(node, what the tile does there)`` for each node: None (a constant), "input",
        "output" or an :class:`_Act` - all geometry, worked out once per tile."""
        if tile.index not in self._plans:
            origin = {self.placeholder: tuple(s.start for s in tile.inp[2:])}
            length = {self.placeholder: tuple(s.stop - s.start for s in tile.inp[2:])}
            self._check_input(tile)
            acts = []
            for node in self.nodes:
                if node.name == self.placeholder:
                    acts.append((node, "input"))
                elif node.op == "output":
                    acts.append((node, "output"))
                elif node.name not in self.dynamic:
                    acts.append((node, None))
                else:
                    s = self.steps[node.name]
                    acts.append((node, self._act(node, s, tile, origin, length)))
                    need = [ax.need[s][i] for ax, i in zip(self.axes, tile.index)]
                    origin[node.name] = tuple(lo for lo, _ in need)
                    length[node.name] = tuple(hi - lo for lo, hi in need)
            self._plans[tile.index] = acts
        return self._plans[tile.index]

    def widened(self, tile: Tile) -> Tile:
        """``tile`` reading all its program needs of the input: its own window, and more where a
        step recomputing its overlap (under a strip budget) computes positions that a crop
        aligned to a later window's stride reaches back to (``reuse.crop``: with strips
        there, earlier tiles computed them)."""
        inp = list(tile.inp)
        for a, (ax, i) in enumerate(zip(self.axes, tile.index)):
            lo, hi = ax.need[0][i]
            window = inp[2 + a]
            if hi > lo and (lo < window.start or hi > window.stop):
                inp[2 + a] = slice(min(lo, window.start), max(hi, window.stop))
        return tile if tuple(inp) == tile.inp else dataclasses.replace(tile, inp=tuple(inp))

    def _check_input(self, tile: Tile) -> None:
        for ax, i, s in zip(self.axes, tile.index, tile.inp[2:]):
            lo, hi = ax.need[0][i]
            internal_assert(hi <= lo or (s.start <= lo and hi <= s.stop),
                            f"tile {tile.index} reads [{s.start}, {s.stop}) but needs [{lo}, {hi})")

    def _act(self, node, s: int, tile: Tile, origin: dict, length: dict) -> "_Act":
        """What ``tile`` does at step ``s``: the crops of its inputs' windows that give its
        new positions (``reuse.crop``), the bands it stores, how its window is assembled."""
        new = tuple(ax.new[s][i] for ax, i in zip(self.axes, tile.index))
        needed = all(ax.need[s][i][1] > ax.need[s][i][0] for ax, i in zip(self.axes, tile.index))
        window = None if s == self.output_step or not needed else \
            "block" if not self._keeps(s) else self._recipe(s, tile)  # (not needed: no consumer
        # computes anything here, so the window is not assembled; no strips: all computed here)
        if any(hi <= lo for lo, hi in new):  # (all of it computed by earlier tiles)
            return _Act(s, None, False, {}, None, None, (), window)
        rules, exact = self.graph.steps[s].rules, s in self.exact
        crops, first, spans = {}, [0] * len(new), [0] * len(new)
        for arg in node.all_input_nodes:
            if arg.name not in self.dynamic:
                continue
            k = self.steps[arg.name] if arg.name != self.placeholder else 0
            index = []
            for a, (rule, out) in enumerate(zip(rules, new)):
                c0, c1, first[a] = crop(rule, out, self.axes[a].lengths[k], exact)
                spans[a] = c1 - c0
                o = origin[arg.name][a]
                internal_assert(o <= c0 and c1 <= o + length[arg.name][a],
                                f"{node.name} reads outside its input's window")
                index.append(slice(c0 - o, c1 - o))
            whole = all(sl.start == 0 and sl.stop == n for sl, n in zip(index, length[arg.name]))
            crops[arg.name] = None if whole else _index(self._dims(k), index)  # (a slice's
            # backward fills a zero tensor: slice only where needed)
        k = self.steps.get(node.all_input_nodes[0].name, 0)
        native = [isinstance(r, Window) and (not exact or padded(r, out, self.axes[a].lengths[k]))
                  for a, (r, out) in enumerate(zip(rules, new))]  # (windows padding as the module)
        padding = tuple(r.pad_left if n else 0 for r, n in zip(rules, native)) if exact else None
        out = None  # (what the node returns is exactly the new positions)
        if any(first) or any(n and r.out_length(length) != hi - lo
                             for r, n, (lo, hi), length in zip(rules, native, new, spans)):
            out = _index(self._dims(s), [slice(f, f + hi - lo) for f, (lo, hi) in zip(first, new)])
        bands = tuple((axis, index) for axis in range(len(self.axes))
                      if (index := self._band_index(s, tile, axis)) is not None)
        return _Act(s, new, exact, crops, padding, out, bands, window)

    def _compute(self, act: "_Act", env: dict):
        """The tile's new positions of a step (None where it has none): its node run on the
        crops of its inputs' windows that give exactly those."""
        if act.new is None:
            return None
        node = self.nodes_by_step[act.step]

        def cropped(arg):
            value = env[arg.name]
            if arg.name not in self.dynamic:
                return value
            index = act.crops[arg.name]
            return value if index is None else _crop(value, index, copy=not act.exact)

        args = fx.node.map_arg(node.args, cropped)
        kwargs = fx.node.map_arg(node.kwargs, cropped)
        if act.exact:
            out = exact_conv(self.root.get_submodule(node.target), args[0], act.padding)
        else:
            out = run_node(self.root, node, args, kwargs)
        return out if act.out is None else _crop(out, act.out)

    def _dims(self, s: int) -> tuple:
        return self.graph.steps[s].dims

    def _keeps(self, s: int) -> bool:
        """Whether step ``s`` keeps strips (else its overlap is recomputed: ``reuse.axis_reuse``)."""
        return self.stored is None or s in self.stored

    # -------------------------------------------------------------- strips

    def _band_index(self, s: int, tile: Tile, axis: int) -> tuple | None:
        """The slices of the tile's block of step ``s`` that its band along ``axis`` holds."""
        start = self.axes[axis].band[s][tile.index[axis]]
        if start is None:
            return None
        lo = self.axes[axis].new[s][tile.index[axis]][0]
        return _index(self._dims(s), [slice(start - lo, None) if a == axis else slice(None)
                                      for a in range(len(self.axes))])

    def _store(self, act: "_Act", tile: Tile, block: torch.Tensor) -> None:
        for axis, index in act.bands:
            self.bands[(act.step, tile.index, axis)] = \
                block[index].detach().to(self.home, copy=True)

    def _add_later_gradients(self, act: "_Act", tile: Tile, block: torch.Tensor) -> None:
        """Hook the gradient later tiles left for the tile's new positions of a step."""
        parts = [(index, self.grads.pop((act.step, tile.index, axis))) for axis, index in act.bands
                 if (act.step, tile.index, axis) in self.grads]
        if not parts or not block.requires_grad:
            return

        def add(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone(memory_format=torch.preserve_format)  # (the engine's may be
            for index, g in parts:  # shared: never changed in place)
                grad[index] += g.to(grad.device, grad.dtype)
            return grad
        block.register_hook(add)

    def deposit(self) -> None:
        """After a tile's backward: the gradient that reached each strip it read, added into
        that strip's gradient (the earlier tile that computed it backpropagates it)."""
        for key, index, leaf in self._leaves:
            if leaf.grad is not None:
                g = leaf.grad
                if key not in self.grads:
                    band = self.bands[key]
                    self.grads[key] = torch.zeros(band.shape, dtype=g.dtype, device=band.device)
                self.grads[key][index] += g.to(self.grads[key].device)
        self._leaves.clear()

    def discard_gradients(self) -> None:
        self.grads.clear()
        self._leaves.clear()

    def _recipe(self, s: int, tile: Tile):
        """How the tile's window of step ``s``'s map (``reuse``'s ``need``) is assembled: its
        new positions (``"block"``) and, left of them along each axis, the parts of earlier
        tiles' bands (``("piece", key, index)``), joined by ``("cat", dim, parts)``."""
        def along(axis: int, owner: tuple, band_axis):
            if axis == len(self.axes):
                return "block" if band_axis is None else self._piece(s, tile, owner, band_axis)
            ax, i = self.axes[axis], tile.index[axis]
            lo, hi = ax.need[s][i]
            parts = [along(axis + 1, owner + (o,),
                           band_axis if band_axis is not None or o == i else axis)
                     for o in range(i + 1) if max(ax.new[s][o][0], lo) < min(ax.new[s][o][1], hi)]
            return parts[0] if len(parts) == 1 else ("cat", self._dims(s).index(axis), parts)
        return along(0, (), None)

    def _piece(self, s: int, tile: Tile, owner: tuple, axis: int) -> tuple:
        """The part of ``owner``'s band along ``axis`` of step ``s`` in ``tile``'s window."""
        slices = []
        for a, (ax, o, i) in enumerate(zip(self.axes, owner, tile.index)):
            lo, hi = ax.need[s][i]
            a0, b0 = ax.new[s][o]
            start = ax.band[s][o] if a == axis else a0
            slices.append(slice(max(lo, a0) - start, min(hi, b0) - start))
        return "piece", (s, owner, axis), _index(self._dims(s), slices)

    def _window(self, recipe, block, leaves: bool) -> torch.Tensor:
        """The window ``recipe`` describes, never sharing memory with a band: an in-place
        operation on it (a ReLU) must not change what later tiles read, nor a leaf."""
        window = self._build(recipe, block, leaves)
        return window.clone() if recipe != "block" and recipe[0] == "piece" else window

    def _build(self, recipe, block, leaves: bool) -> torch.Tensor:
        """The window ``recipe`` describes (:meth:`_recipe`); ``leaves``: the band parts are
        leaves whose gradients :meth:`deposit` adds into the bands' gradients."""
        if recipe == "block":
            return block
        if recipe[0] == "cat":
            return torch.cat([self._build(r, block, leaves) for r in recipe[2]], recipe[1])
        _, key, index = recipe
        internal_assert(key in self.bands, f"strip {key} was not stored")
        piece = self.bands[key][index].to(self.device)
        if leaves:  # (a view of the band where it lives here: the band is never changed,
            piece = piece.detach().requires_grad_()  # and the window copies it)
            self._leaves.append((key, index, piece))
        return piece



def _index(dims: tuple, spatial: list) -> tuple:
    """An index of a value with dimensions ``dims`` from one slice per spatial axis."""
    return tuple(spatial[d] if isinstance(d, int) else slice(None) for d in dims)


def _values(node: fx.Node, env: dict) -> tuple:
    return (fx.node.map_arg(node.args, lambda a: env[a.name]),
            fx.node.map_arg(node.kwargs, lambda a: env[a.name]))
