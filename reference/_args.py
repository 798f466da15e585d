"""Argument checks shared by the reference modules.

Each raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names
the quantity and says what would be accepted.
"""

from __future__ import annotations

import numbers


def per_axis(value, ndim: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    """Expand an int or a per-axis sequence to a tuple of ``ndim`` ints >= ``minimum``."""
    if isinstance(value, numbers.Integral):
        values = (int(value),) * ndim
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
        if len(values) != ndim or not all(isinstance(v, numbers.Integral) for v in values):
            raise ValueError(f"{name} must be an int or a tuple of {ndim} ints (one per spatial axis), got {value!r}")
        values = tuple(int(v) for v in values)
    if any(v < minimum for v in values):
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {kind} on every axis, got {value!r}")
    return values


def spatial_rank(shape, name: str) -> int:
    """Number of spatial axes of an (N, C, *spatial) shape; only 1 or 2 are supported."""
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{name} must have rank 3 (N, C, L) or 4 (N, C, H, W), got rank {len(shape)} with shape {tuple(shape)}"
        )
    return len(shape) - 2
