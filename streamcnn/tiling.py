"""The tiles of one input: per-axis tilings, the index boxes of each tile, and each tile's
part of every output map."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ._args import AXIS_NAMES, normalize_tile_size
from .geometry import AxisTiling, Span, lengths, ownership, spans, tile_axis
from .rules import is_positions
from .trace import TracedGraph


@dataclass(frozen=True)
class Tile:
    """Index tuples for one tile: its input, its output crop, and where that goes."""

    inp: tuple
    crop: tuple
    out: tuple
    out_shape: tuple  # spatial shape of the tile's uncropped output
    index: tuple = ()  # its place in the product of the per-axis tilings

    @property
    def origin(self) -> tuple[int, ...]:
        """The tile's first input pixel (one index per spatial axis), for messages."""
        return tuple(s.start for s in self.inp[2:])


def tile_image(graph: TracedGraph, spatial: tuple[int, ...], tile_size,
               targets: tuple[int, ...] = ()) -> tuple[AxisTiling, ...]:
    """Per-axis tilings of an image with spatial shape ``spatial`` (covering every output map
    and the maps of the ``targets`` steps too: see ``geometry.tile_axis``)."""
    ndim = len(spatial)
    sizes = normalize_tile_size(tile_size, ndim)
    targets = tuple(sorted(set(targets) | set(graph.maps)))
    return tuple(tile_axis(graph.axis(a), spatial[a], sizes[a], AXIS_NAMES[ndim][a], targets)
                 for a in range(ndim))


def _owned(graph: TracedGraph, tilings, step: int, dims: tuple) -> dict[tuple, tuple]:
    """Tile index -> (crop, place) of step ``step``'s value: the index of the part the tile
    owns in its own value, and where that part lies in the whole image's, one slice per
    dimension of ``dims`` (see ``geometry.ownership``)."""
    owns = [ownership(graph.axis(a), t, step) for a, t in enumerate(tilings)]
    parts = {}
    for index in itertools.product(*(range(len(t.starts)) for t in tilings)):
        own = [(o.own_starts[i], o.own_stops[i], o.starts[i]) for o, i in zip(owns, index)]
        crop = tuple(slice(own[d][0] - own[d][2], own[d][1] - own[d][2]) if isinstance(d, int)
                     else _owned_positions(owns, index) if is_positions(d)
                     else slice(None) for d in dims)
        place = tuple(slice(own[d][0], own[d][1]) if isinstance(d, int) else slice(None)
                      for d in dims)
        parts[index] = (crop, place)
    return parts


def _owned_positions(owns, index) -> torch.Tensor:
    """The owned positions of a tile's sequence of positions (its spatial axes flattened in
    row-major order, ``rules.positions_role``): their indices in the sequence."""
    flat = torch.zeros((), dtype=torch.long)
    for o, i in zip(owns, index):
        length = o.stops[i] - o.starts[i]
        own = torch.arange(o.own_starts[i] - o.starts[i], o.own_stops[i] - o.starts[i])
        flat = (flat.unsqueeze(-1) * length + own).flatten()
    return flat


def owned_parts(graph: TracedGraph, tilings, step: int) -> dict[tuple, tuple]:
    """Tile index -> (crop, place) of step ``step``'s value: the index of the part the tile
    owns in its own value, and where that part lies in the whole map."""
    return _owned(graph, tilings, step, graph.steps[step].dims)


def owned_crops(graph: TracedGraph, tilings, step: int) -> dict[tuple, tuple]:
    """Tile index -> the index of the part of step ``step``'s value that tile owns, one slice
    per dimension of the value (see ``geometry.ownership``)."""
    return {index: crop for index, (crop, _) in
            _owned(graph, tilings, step, graph.steps[step].dims).items()}


@dataclass(frozen=True)
class Part:
    """One output map's part of one tile: ``crop`` indexes the tile's value of that map to the
    part the tile owns, ``out`` where that part goes in the stitched map, and ``shape`` is the
    spatial shape of the tile's whole value of the map."""

    crop: tuple
    out: tuple
    shape: tuple


@dataclass(frozen=True)
class Outputs:
    """The streamed module's output maps and each tile's part of each.

    ``steps``/``paths``: the traced step and the ``keystr`` path of each leaf of the output
    structure, in ``torch.utils._pytree`` order (``TracedGraph.outputs``/``output_paths``);
    ``maps``: the distinct steps among them (a map returned twice is stitched once), whose
    stitched spatial shapes are ``spatial``. ``parts``: tile index -> one :class:`Part` per
    map; empty for one map, whose parts are the tiles' own ``crop``/``out``/``out_shape``
    (the tiling's output is that map)."""

    steps: tuple[int, ...]
    paths: tuple[str, ...]
    maps: tuple[int, ...]
    spatial: tuple[tuple[int, ...], ...]
    parts: dict

    @classmethod
    def single(cls, tilings) -> "Outputs":
        """One map, the tiling's output (what ``geometry.tile_axis`` tiled for), whatever its
        step (0 stands for it)."""
        return cls((0,), ("",), (0,), (tuple(t.out_length for t in tilings),), {})

    def of(self, tile: Tile) -> tuple[Part, ...]:
        """``tile``'s part of each map."""
        if not self.parts:
            return (Part(tile.crop, tile.out, tile.out_shape),)
        return self.parts[tile.index]

    @property
    def first_leaves(self) -> tuple[int, ...]:
        """The first leaf of each map: where a tile's output structure holds it."""
        return tuple(self.steps.index(m) for m in self.maps)

    def leaves(self, maps: list) -> list:
        """The output structure's leaves from the maps' tensors (a map returned twice is the
        same tensor twice, as the module returns it)."""
        return [maps[self.maps.index(s)] for s in self.steps]

    def map_gradients(self, leaves) -> list:
        """One gradient per map from one per leaf (None: unused), a map's leaves' added."""
        found: list = [None] * len(self.maps)
        for s, g in zip(self.steps, leaves):
            if g is not None:
                k = self.maps.index(s)
                found[k] = g if found[k] is None else found[k] + g
        return found


def outputs(graph: TracedGraph, tilings) -> Outputs:
    """:class:`Outputs` of ``graph`` on the tiles of ``tilings`` (made by :func:`tile_image`,
    whose tiles cover every output map)."""
    maps = graph.maps
    per_axis = [lengths(graph.axis(a), t.length) for a, t in enumerate(tilings)]
    spatial = tuple(tuple(ls[m] for ls in per_axis) for m in maps)
    if len(maps) == 1:
        return Outputs(graph.outputs or maps, graph.output_paths or ("",), maps, spatial, {})
    owned = [_owned(graph, tilings, m, graph.steps[m].dims) for m in maps]
    tile_spans = [[spans(graph.axis(a), Span(t.length, start, stop, start, stop))
                   for start, stop in zip(t.starts, t.stops)] for a, t in enumerate(tilings)]
    parts = {}
    for index in itertools.product(*(range(len(t.starts)) for t in tilings)):
        parts[index] = tuple(
            Part(*owned[k][index], tuple(tile_spans[a][i][m].stop - tile_spans[a][i][m].start
                                         for a, i in enumerate(index)))
            for k, m in enumerate(maps))
    return Outputs(graph.outputs, graph.output_paths, maps, spatial, parts)


def owned_origins(graph: TracedGraph, tilings, step: int) -> tuple[dict[tuple, tuple], tuple]:
    """Tile index -> where the part of step ``step``'s value that tile owns begins in the
    whole value (one index per dimension, 0 for non-spatial ones); and the value's length
    per dimension (0 for non-spatial ones)."""
    dims = graph.steps[step].dims
    places = {index: place for index, (_, place) in _owned(graph, tilings, step, dims).items()}
    origins = {index: tuple(p.start or 0 for p in place) for index, place in places.items()}
    lengths = tuple(max(place[k].stop for place in places.values()) if isinstance(d, int) else 0
                    for k, d in enumerate(dims))
    return origins, lengths


def count(tilings: tuple[AxisTiling, ...]) -> int:
    return math.prod(len(t.starts) for t in tilings)


def iter_tiles(tilings: tuple[AxisTiling, ...]):
    """All tiles: the product of the per-axis tilings, row-major."""
    every = (slice(None), slice(None))
    for idx in itertools.product(*(range(len(t.starts)) for t in tilings)):
        yield Tile(
            inp=every + tuple(slice(t.starts[i], t.stops[i]) for t, i in zip(tilings, idx)),
            crop=every + tuple(slice(t.own_starts[i] - t.out_starts[i],
                                     t.own_stops[i] - t.out_starts[i])
                               for t, i in zip(tilings, idx)),
            out=every + tuple(slice(t.own_starts[i], t.own_stops[i])
                              for t, i in zip(tilings, idx)),
            out_shape=tuple(t.out_stops[i] - t.out_starts[i] for t, i in zip(tilings, idx)),
            index=idx,
        )
