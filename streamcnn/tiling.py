"""The tiles of one input: per-axis tilings and the index boxes of each tile."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ._args import AXIS_NAMES, normalize_tile_size
from .geometry import AxisTiling, tile_axis
from .trace import TracedGraph


@dataclass(frozen=True)
class Tile:
    """Index tuples for one tile: its input, its output crop, and where that goes."""

    inp: tuple
    crop: tuple
    out: tuple
    out_shape: tuple  # spatial shape of the tile's uncropped output

    @property
    def origin(self) -> tuple[int, ...]:
        """The tile's first input pixel (one index per spatial axis), for messages."""
        return tuple(s.start for s in self.inp[2:])


def tile_image(graph: TracedGraph, spatial: tuple[int, ...], tile_size) -> tuple[AxisTiling, ...]:
    """Per-axis tilings of an image with spatial shape ``spatial``."""
    ndim = len(spatial)
    sizes = normalize_tile_size(tile_size, ndim)
    return tuple(tile_axis(graph.axis(a), spatial[a], sizes[a], AXIS_NAMES[ndim][a])
                 for a in range(ndim))


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
        )
