"""Argument normalisation shared by ``Streaming``, ``plan`` and ``receptive_field`` (no torch)."""

from __future__ import annotations

import operator

AXIS_NAMES = {1: ("length",), 2: ("height", "width")}
SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)"}


def _is_int(value) -> bool:
    """An integer (Python's, numpy's, a one-element integer tensor), not a bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def normalize_tile_size(tile_size, ndim: int) -> tuple[int, ...]:
    """An int or one int per spatial axis -> a tuple of ``ndim`` positive ints."""
    if _is_int(tile_size):
        sizes = (operator.index(tile_size),) * ndim
    elif isinstance(tile_size, (tuple, list)) and all(_is_int(t) for t in tile_size):
        sizes = tuple(operator.index(t) for t in tile_size)
        if len(sizes) != ndim:
            raise ValueError(f"tile_size {tile_size!r} has {len(sizes)} entries but the input "
                             f"has {ndim} spatial axes {AXIS_NAMES[ndim]}")
    else:
        raise TypeError(f"tile_size must be an int or a tuple of ints, got {tile_size!r}")
    for s in sizes:
        if s < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size!r}")
    return sizes


def normalize_shape(shape, what: str = "input_shape") -> tuple[int, ...]:
    """A shape given as a tuple, list or ``torch.Size`` of ints -> a tuple of ints."""
    if getattr(shape, "ndim", 1) != 1:  # a tensor or an array: the image, not its shape
        raise TypeError(f"{what} must be a shape such as (1, 3, 4096, 4096), got a "
                        f"{type(shape).__name__} of shape {tuple(shape.shape)}; pass its .shape")
    try:
        entries = tuple(shape)
    except TypeError:
        entries = None
    if isinstance(shape, str) or entries is None or not all(_is_int(s) for s in entries):
        raise TypeError(f"{what} must be a tuple of ints such as (1, 3, 4096, 4096), got "
                        f"{shape!r}")
    return tuple(operator.index(s) for s in entries)
