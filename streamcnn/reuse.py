"""Which positions each tile computes when the overlap between tiles is reused (integer
geometry along one axis, no torch; :mod:`streamcnn.strips` runs it).

Recomputing overlaps, every tile computes each step's map over its whole window, and the
windows of neighbouring tiles overlap. Reusing them, the tiles run in a fixed order and, at
every step, a tile computes only the positions no earlier tile computed; the rest of its
window it reads from *strips* that earlier tiles stored (the fused-layer idea). Along one
axis, with tiles ``0 .. n-1`` in order:

* ``need[s][i]``: the interval of step ``s``'s map that tile ``i`` must hold - what its
  computations at the consumers of ``s`` read (at the output: the part it owns). A window
  consumer computing ``[a, b)`` reads ``[c0, c1)``, ``c0`` rounded down to the window's
  stride (so a crop starting there keeps torch's output grid) and both clipped to the map.
* ``new[s][i]``: what tile ``i`` computes: ``[max(H(i-1), need.lo), H(i))`` with ``H(i)`` the
  furthest ``need.hi`` of tiles ``0..i``. The ``new`` intervals are disjoint, and every
  position of ``need[s][i]`` left of ``new[s][i]`` lies in an earlier tile's ``new`` (the
  needs grow with ``i``; checked), so each position is computed once per pass.
* ``band[s][i]``: where the part of tile ``i``'s new positions that later tiles read
  begins (``need[s][i+1].lo``, at least ``new.lo``); None where no later tile reads any.

Strips may be kept at chosen steps only (``stored``): at any other step a tile computes its
whole need (``new = need``, the overlap recomputed there, as without reuse) and stores no
band, and the needs of that step's inputs grow to what the larger computation reads.
:func:`strips_within` chooses the steps for a budget: it recomputes the overlap of the
steps nearest the input, as few as it can (their windows then read only the tile's input,
which needs no strip; stored steps further on are unchanged, so the strips' bytes only
fall as more steps recompute).

A 2D tiling is the product of two such axes: tile ``(i, j)`` computes ``new_rows[i] x
new_cols[j]``, and a position it reads from an earlier tile ``(i', j')`` lies in that
tile's band along the first axis where the two differ (a later tile in row-major order
differs first by a larger index), so each tile stores one band per axis.

Only windows, pointwise steps and merges are mapped; :func:`refusal` says why a graph
cannot reuse its overlaps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import internal_assert
from .geometry import Merge, Pointwise, SizedWindow, Window, lengths


@dataclass(frozen=True)
class AxisReuse:
    """One axis: per step and tile, the interval needed, the interval computed, and where
    the band later tiles read begins (None: none). Intervals are ``(lo, hi)`` pairs."""

    need: tuple
    new: tuple
    band: tuple
    lengths: tuple

    def reads(self, step: int, tile: int) -> tuple[int, int]:
        """The part of ``need`` that earlier tiles computed (empty: ``lo == hi``)."""
        lo, _ = self.need[step][tile]
        return lo, max(lo, self.new[step][tile][0])


def crop(rule, out: tuple[int, int], n_in: int, exact: bool = False) -> tuple[int, int, int]:
    """``(c0, c1, first)``: the input interval a step with ``rule`` reads to compute its
    outputs ``out = (a, b)`` on an ``n_in``-long input, and the index of output ``a`` in what
    torch computes from that crop. ``exact``: a window that runs without padding where the
    outputs' reach lies inside the image, so the crop is exactly what ``[a, b)`` reads (see
    :func:`padded`); else it runs as the module does, padding the crop's both sides, and
    ``c0`` is rounded down to the stride (so a crop starting there keeps torch's output
    grid) and outputs outside ``[a, b)`` are computed too."""
    a, b = out
    if isinstance(rule, Window):
        s = rule.stride
        lo, hi = a * s - rule.pad_left, (b - 1) * s - rule.pad_left + rule.span
        if exact and not padded(rule, out, n_in):
            return lo, hi, 0
        c0 = max(0, lo) // s * s
        return c0, min(n_in, hi), a - c0 // s
    return a, b, 0


def padded(rule: Window, out: tuple[int, int], n_in: int) -> bool:
    """Whether computing outputs ``out`` reads the padding at an image border: an exact
    window (:func:`crop`) then runs with its own padding along this axis, as the module does."""
    a, b = out
    lo, hi = a * rule.stride - rule.pad_left, (b - 1) * rule.stride - rule.pad_left + rule.span
    return lo < 0 or hi > n_in


def axis_reuse(graph, length: int, own_starts, own_stops, exact=frozenset(),
               stored=None) -> AxisReuse:
    """The reuse geometry of one axis of ``graph`` (``geometry`` steps, the last the output)
    on a ``length``-long image whose tiles own ``[own_starts[i], own_stops[i])`` of the
    output, in the order they run; the windows of the steps in ``exact`` run without their
    own padding (:func:`crop`). ``stored``: the steps whose positions are computed once and
    read from strips (None: all); the others compute their whole need."""
    n, last = len(own_starts), len(graph) - 1
    ls = lengths(graph, length)
    need: list = [None] * len(graph)
    new: list = [None] * len(graph)
    reads: list = [[] for _ in graph]  # per step: (consumer, input index) pairs
    for c, step in enumerate(graph[1:], start=1):
        for k in step.inputs:
            reads[k].append(c)
    new[last] = need[last] = [(a, b) for a, b in zip(own_starts, own_stops)]
    for s in range(last - 1, -1, -1):
        need[s] = [_hull([crop(graph[c].rule, new[c][i], ls[s], c in exact)[:2] for c in reads[s]
                          if new[c][i][1] > new[c][i][0]]) for i in range(n)]
        new[s] = _new(need[s], graph[s].name) if stored is None or s in stored else list(need[s])
    band = [[_band(need[s], new[s], i) if stored is None or s in stored else None for i in range(n)]
            for s in range(len(graph))]
    return AxisReuse(tuple(map(tuple, need)), tuple(map(tuple, new)), tuple(map(tuple, band)),
                     tuple(ls))


def _hull(intervals: list) -> tuple[int, int]:
    if not intervals:
        return 0, 0
    return min(a for a, _ in intervals), max(b for _, b in intervals)


def _new(need: list, name: str) -> list:
    """Each tile's computed interval: the part of its need past everything earlier tiles
    computed (module docstring)."""
    found, furthest, low = [], None, -1
    for lo, hi in need:
        if hi <= lo:
            found.append((furthest or 0, furthest or 0))
            continue
        internal_assert(lo >= low and (furthest is None or hi >= furthest),
                        f"the tiles' windows on {name}'s map do not advance with the tiles")
        low = lo
        start = lo if furthest is None else max(furthest, lo)
        furthest = hi
        found.append((start, hi))
    return found


def _band(need: list, new: list, i: int):
    """Where the part of tile ``i``'s new positions that later tiles need begins."""
    lo, hi = new[i]
    later = [a for a, b in need[i + 1:] if b > a]
    if hi <= lo or not later or min(later) >= hi:
        return None
    return max(lo, min(later))


def refusal(graph) -> str | None:
    """Why the overlap of ``graph``'s tiles cannot be reused (None: it can): a step other
    than a window, a pointwise step or a merge, a normalisation over space, or several
    output maps."""
    if len(graph.maps) > 1:
        return "the module returns several feature maps"
    for step in graph.steps[1:]:
        if step.norm is not None:
            return (f"{step.name} reduces over space (a normalisation in training mode or a "
                    f"global step): its whole-map passes recompute the overlap")
        bad = next((r for r in step.rules if isinstance(r, SizedWindow)
                    or not isinstance(r, (Window, Pointwise, Merge))), None)
        if bad is not None:
            return (f"{step.name} is a {type(bad).__name__.lower()} step: only windows "
                    f"(convolution, pooling, padding), pointwise steps and merges reuse overlaps")
    return None


def strip_elements(axes: list, weights) -> float:
    """Elements of every band the tiles store in a pass, a step's positions weighted by
    ``weights[step]`` (its elements per position). A tile's band along one axis spans its new
    positions along the others, so the sum over the tiles (the product of the axes' indices)
    is, per axis, the bands' lengths summed times the new positions' lengths summed along
    each other axis."""
    total = 0.0
    for s, w in enumerate(weights):
        if not w:
            continue
        new = [sum(hi - lo for lo, hi in ax.new[s] if hi > lo) for ax in axes]
        for a, ax in enumerate(axes):
            bands = sum(hi - start for start, (lo, hi) in zip(ax.band[s], ax.new[s]) if start is not None)
            if bands:
                total += w * bands * math.prod(n for b, n in enumerate(new) if b != a)
    return total


def strips_within(budget: float, count: int, axes_for, weights) -> tuple:
    """``(stored, axes)``: the steps that keep strips and the geometry of every axis (from
    ``axes_for(stored)``) so that the strips hold at most ``budget`` elements
    (:func:`strip_elements`): all ``count`` steps where they fit, else all but the fewest
    steps nearest the input (the graph's steps are in topological order, so the steps
    recomputing their overlap read only each other and the input: no strips; ``stored``
    None means all). The bytes fall as more steps recompute, so the fewest is found by
    bisection; none at all (every overlap recomputed) always fits."""
    axes = axes_for(None)
    if strip_elements(axes, weights) <= budget:
        return None, axes
    lo, hi = 1, count  # steps 1 .. m-1 recompute; m = count: all of them
    while lo < hi:
        m = (lo + hi) // 2
        if strip_elements(axes_for(frozenset(range(m, count))), weights) <= budget:
            hi = m
        else:
            lo = m + 1
    stored = frozenset(range(lo, count))
    return stored, axes_for(stored)


def computed_positions(axes: list, step: int) -> int:
    """Positions of step ``step``'s map the tiles compute in one pass (each once where the
    step keeps strips; where its overlap is recomputed, as often as tiles need it)."""
    return math.prod(sum(hi - lo for lo, hi in ax.new[step]) for ax in axes)
