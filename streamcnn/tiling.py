"""The tiles of one input: per-axis tilings and the index boxes of each tile."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ._args import AXIS_NAMES, normalize_tile_size
from .geometry import AxisTiling, ownership, tile_axis
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
    """Per-axis tilings of an image with spatial shape ``spatial`` (covering the maps of
    the ``targets`` steps too: see ``geometry.tile_axis``)."""
    ndim = len(spatial)
    sizes = normalize_tile_size(tile_size, ndim)
    return tuple(tile_axis(graph.axis(a), spatial[a], sizes[a], AXIS_NAMES[ndim][a], targets)
                 for a in range(ndim))


def owned_crops(graph: TracedGraph, tilings, step: int) -> dict[tuple, tuple]:
    """Tile index -> the index of the part of step ``step``'s value that tile owns, one slice
    per dimension of the value (see ``geometry.ownership``)."""
    owns = [ownership(graph.axis(a), t, step) for a, t in enumerate(tilings)]
    dims = graph.steps[step].dims
    crops = {}
    for index in itertools.product(*(range(len(t.starts)) for t in tilings)):
        crops[index] = tuple(
            slice(owns[d].own_starts[index[d]] - owns[d].starts[index[d]],
                  owns[d].own_stops[index[d]] - owns[d].starts[index[d]])
            if isinstance(d, int) else slice(None) for d in dims)
    return crops


def owned_origins(graph: TracedGraph, tilings, step: int) -> tuple[dict[tuple, tuple], tuple]:
    """Tile index -> where the part of step ``step``'s value that tile owns begins in the
    whole value (one index per dimension, 0 for non-spatial ones); and the value's length
    per dimension (0 for non-spatial ones)."""
    owns = [ownership(graph.axis(a), t, step) for a, t in enumerate(tilings)]
    dims = graph.steps[step].dims
    lengths = tuple(max(owns[d].own_stops) if isinstance(d, int) else 0 for d in dims)
    origins = {index: tuple(owns[d].own_starts[index[d]] if isinstance(d, int) else 0 for d in dims)
               for index in itertools.product(*(range(len(t.starts)) for t in tilings))}
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
