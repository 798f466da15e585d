"""Argument normalisation shared by ``Streaming``, ``plan`` and ``receptive_field`` (no torch)."""

from __future__ import annotations

AXIS_NAMES = {1: ("length",), 2: ("height", "width")}
SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)"}


def normalize_tile_size(tile_size, ndim: int) -> tuple[int, ...]:
    """An int or one int per spatial axis -> a tuple of ``ndim`` positive ints."""
    if isinstance(tile_size, bool):
        raise TypeError(f"tile_size must be an int or a tuple of ints, got {tile_size!r}")
    if isinstance(tile_size, int):
        sizes = (tile_size,) * ndim
    elif isinstance(tile_size, (tuple, list)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in tile_size):
        sizes = tuple(tile_size)
        if len(sizes) != ndim:
            raise ValueError(f"tile_size {tile_size!r} has {len(sizes)} entries but the input "
                             f"has {ndim} spatial axes {AXIS_NAMES[ndim]}")
    else:
        raise TypeError(f"tile_size must be an int or a tuple of ints, got {tile_size!r}")
    for s in sizes:
        if s < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size!r}")
    return sizes
