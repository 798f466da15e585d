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
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import StreamingError, internal_assert
from .checkpoints import Program, run_node
from .reuse import axis_reuse, crop, pads, refusal
from .tiling import Tile

__all__ = ["Strips", "check_reusable", "reusable"]


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
    found = set()
    for node in graph.graph.nodes:
        s = graph.node_steps().get(node.name)
        if s is None or node.op != "call_module":
            continue
        m = graph.root.get_submodule(node.target)
        if type(m) in _CONVOLUTIONS and m.padding_mode == "zeros" and not node.kwargs \
                and len(node.args) == 1 and not (m._forward_hooks or m._forward_pre_hooks):
            found.add(s)
    return frozenset(found)


_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def unpadded_conv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Convolution layer ``m`` on ``x`` without its padding (``x`` holds what it needs)."""
    return _CONVOLUTIONS[type(m)](x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)


def _padded(x: torch.Tensor, amounts: list) -> torch.Tensor:
    """``x`` (spatial axes last, in order) with ``amounts[a] = (before, after)`` zeros."""
    if not any(any(p) for p in amounts):
        return x
    return F.pad(x, [p for pair in reversed(amounts) for p in pair])


class Strips:
    """The strips of one streamed input, and the tile program that reads and writes them.

    ``bands[(step, tile index, axis)]``: the values of a tile's new positions of a step that
    later tiles differing first along ``axis`` read; ``grads``: their gradients, left by
    those tiles in the backward. ``blocks``: per pass, each step's computed blocks (for
    counting: each position is computed once per pass)."""

    def __init__(self, graph, tilings, root, device: torch.device,
                 storage: torch.device | None = None):
        self.graph, self.root, self.device = graph, root, device
        self.exact = exact_steps(graph)
        self.axes = [axis_reuse(graph.axis(a), t.length, t.own_starts, t.own_stops, self.exact)
                     for a, t in enumerate(tilings)]
        program = Program(graph)
        self.nodes, self.dynamic, self.placeholder = program.nodes, program.dynamic, program.placeholder
        self.steps = graph.node_steps()
        self.output_step = graph.maps[0]
        self.storage = storage  # where bands live (None: beside the values)
        self.bands: dict = {}
        self.grads: dict = {}
        self.blocks: dict = {"forward": {}, "backward": {}}
        self._leaves: list = []

    # -------------------------------------------------------------- sizes

    @property
    def stored_bytes(self) -> int:
        """Bytes held in activation strips now (their gradients come and go in the backward)."""
        return sum(b.numel() * b.element_size() for b in self.bands.values())

    def counts(self, what: str) -> Counter:
        """Positions computed per step in the pass ``what`` ("forward" or "backward")."""
        return Counter({s: sum(math.prod(hi - lo for lo, hi in block) for block in blocks)
                        for s, blocks in self.blocks[what].items()})

    # -------------------------------------------------------------- the tile program

    def run(self, tile: Tile, tile_input: torch.Tensor, recompute: bool = False):
        """The module's output structure for ``tile``, whose output maps hold just the part the
        tile owns. ``recompute``: the backward's run (strips are leaves, hooks add the
        gradients later tiles left); else the forward's (new positions' bands are stored)."""
        internal_assert(not self._leaves, "strip leaves of a tile not deposited")
        what = "backward" if recompute else "forward"
        env: dict = {}
        origin: dict = {self.placeholder: tuple(s.start for s in tile.inp[2:])}
        for node in self.nodes:
            name = node.name
            if name == self.placeholder:
                self._check_input(tile, tile_input)
                env[name] = tile_input
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a.name])
            elif name not in self.dynamic:
                env[name] = run_node(self.root, node, *_values(node, env))
            else:
                s = self.steps[name]
                block = self._compute(node, s, tile, env, origin)
                if block is not None:
                    self._note(what, s, tile)
                    if recompute:
                        self._add_later_gradients(s, tile, block)
                    else:
                        self._store(s, tile, block)
                needed = all(ax.need[s][i][1] > ax.need[s][i][0]
                             for ax, i in zip(self.axes, tile.index))
                env[name] = block if s == self.output_step or not needed else \
                    self._assemble(s, tile, block, recompute)  # (not needed: no consumer
                # computes anything on this tile)
                origin[name] = tuple(ax.need[s][i][0] for ax, i in zip(self.axes, tile.index))
        internal_assert(False, "the traced program has no output")

    def _check_input(self, tile: Tile, tile_input) -> None:
        for ax, i, s in zip(self.axes, tile.index, tile.inp[2:]):
            lo, hi = ax.need[0][i]
            internal_assert(hi <= lo or (s.start <= lo and hi <= s.stop),
                            f"tile {tile.index} reads [{s.start}, {s.stop}) but needs [{lo}, {hi})")

    def _new(self, s: int, tile: Tile) -> tuple:
        return tuple(ax.new[s][i] for ax, i in zip(self.axes, tile.index))

    def _note(self, what: str, s: int, tile: Tile) -> None:
        self.blocks[what].setdefault(s, []).append(self._new(s, tile))

    def _compute(self, node, s: int, tile: Tile, env: dict, origin: dict):
        """The tile's new positions of step ``s`` (None where it has none): ``node`` run on
        the crops of its inputs' windows that give exactly those (``reuse.crop``)."""
        new = self._new(s, tile)
        if any(hi <= lo for lo, hi in new):
            return None
        rules = self.graph.steps[s].rules
        exact = s in self.exact
        first = [0] * len(new)

        def cropped(arg):
            if arg.name not in self.dynamic:
                return env[arg.name]
            k = self.steps[arg.name] if arg.name != self.placeholder else 0
            index = []
            for a, (rule, out) in enumerate(zip(rules, new)):
                c0, c1, first[a] = crop(rule, out, self.axes[a].lengths[k], exact)
                o = origin[arg.name][a]
                internal_assert(c0 >= o, f"{node.name} reads before its input's window")
                index.append(slice(c0 - o, c1 - o))
            value = env[arg.name]
            if not _whole(value, self._spatial_dims(k), index):  # (a slice's backward fills
                value = value[_index(self._dims(k), index)]  # a zero tensor: only if needed)
            if exact:  # (the image's own padding, where the crop meets its border)
                value = _padded(value, [pads(r, out, self.axes[a].lengths[k])
                                        for a, (r, out) in enumerate(zip(rules, new))])
            return value

        args = fx.node.map_arg(node.args, cropped)
        kwargs = fx.node.map_arg(node.kwargs, cropped)
        if exact:
            return unpadded_conv(self.root.get_submodule(node.target), args[0])
        out = run_node(self.root, node, args, kwargs)
        index = [slice(f, f + hi - lo) for f, (lo, hi) in zip(first, new)]
        if _whole(out, self._spatial_dims(s), index):  # (else an in-place op on the view
            return out  # would copy the slices back)
        return out[_index(self._dims(s), index)]

    def _dims(self, s: int) -> tuple:
        return self.graph.steps[s].dims

    def _spatial_dims(self, s: int) -> list[int]:
        """The tensor dimension of each spatial axis of step ``s``'s value, axis by axis."""
        dims = self._dims(s)
        return [dims.index(a) for a in range(len(self.axes))]

    # -------------------------------------------------------------- strips

    def _band_index(self, s: int, tile: Tile, axis: int) -> tuple | None:
        """The slices of the tile's block of step ``s`` that its band along ``axis`` holds."""
        start = self.axes[axis].band[s][tile.index[axis]]
        if start is None:
            return None
        lo = self.axes[axis].new[s][tile.index[axis]][0]
        return _index(self._dims(s), [slice(start - lo, None) if a == axis else slice(None)
                                      for a in range(len(self.axes))])

    def _store(self, s: int, tile: Tile, block: torch.Tensor) -> None:
        for axis in range(len(self.axes)):
            index = self._band_index(s, tile, axis)
            if index is not None:
                band = block[index].detach()
                self.bands[(s, tile.index, axis)] = band.to(self.storage, copy=True) \
                    if self.storage is not None else band.clone()

    def _add_later_gradients(self, s: int, tile: Tile, block: torch.Tensor) -> None:
        """Hook the gradient later tiles left for the tile's new positions of step ``s``."""
        parts = [(self._band_index(s, tile, axis), self.grads.pop((s, tile.index, axis)))
                 for axis in range(len(self.axes)) if (s, tile.index, axis) in self.grads]
        if not parts or not block.requires_grad:
            return
        extra = torch.zeros_like(block)
        for index, g in parts:
            extra[index] += g.to(extra.device, extra.dtype)
        block.register_hook(lambda grad: grad + extra)

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

    def _assemble(self, s: int, tile: Tile, block, leaves: bool) -> torch.Tensor:
        """The tile's window of step ``s``'s map (``reuse``'s ``need``): its new positions
        ``block`` and, left of them along each axis, what earlier tiles stored."""
        def along(axis: int, owner: tuple, band_axis) -> torch.Tensor:
            if axis == len(self.axes):
                return block if band_axis is None else self._piece(s, tile, owner, band_axis, leaves)
            ax, i = self.axes[axis], tile.index[axis]
            lo, hi = ax.need[s][i]
            pieces = []
            for o in range(i + 1):
                a, b = ax.new[s][o]
                if max(a, lo) < min(b, hi):
                    pieces.append(along(axis + 1, owner + (o,),
                                        band_axis if band_axis is not None or o == i else axis))
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self._dims(s).index(axis))
        return along(0, (), None)

    def _piece(self, s: int, tile: Tile, owner: tuple, axis: int, leaf: bool) -> torch.Tensor:
        """The part of ``owner``'s band along ``axis`` of step ``s`` in ``tile``'s window."""
        key = (s, owner, axis)
        internal_assert(key in self.bands, f"strip {key} was not stored")
        slices = []
        for a, (ax, o, i) in enumerate(zip(self.axes, owner, tile.index)):
            lo, hi = ax.need[s][i]
            a0, b0 = ax.new[s][o]
            start = ax.band[s][o] if a == axis else a0
            slices.append(slice(max(lo, a0) - start, min(hi, b0) - start))
        index = _index(self._dims(s), slices)
        piece = self.bands[key][index]
        if not leaf:
            return piece.to(self.device)
        piece = piece.to(self.device, copy=True).requires_grad_()
        self._leaves.append((key, index, piece))
        return piece

    def close(self) -> None:
        self.bands.clear()
        self.discard_gradients()


def _whole(value: torch.Tensor, dims: list[int], index: list) -> bool:
    """Whether ``index`` (one slice per spatial axis, at tensor dimensions ``dims``) takes
    all of ``value``."""
    return all(sl.start == 0 and sl.stop == value.shape[d] for d, sl in zip(dims, index))


def _index(dims: tuple, spatial: list) -> tuple:
    """An index of a value with dimensions ``dims`` from one slice per spatial axis."""
    return tuple(spatial[d] if isinstance(d, int) else slice(None) for d in dims)


def _values(node: fx.Node, env: dict) -> tuple:
    return (fx.node.map_arg(node.args, lambda a: env[a.name]),
            fx.node.map_arg(node.kwargs, lambda a: env[a.name]))
