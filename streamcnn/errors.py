"""The errors streamcnn raises, and its one internal-invariant check.

User errors say what is wrong, name the layer (its module path) or quantity, and
say what would work. Broken internal invariants go through :func:`internal_assert`,
whose message says that the bug is ours, not the user's.
"""

from __future__ import annotations


class StreamingError(TypeError):
    """A module, layer or operation that cannot be streamed exactly (or used as it was)."""


class TileTooSmallError(ValueError):
    """The tile cannot produce any valid output away from the image border."""


def internal_assert(condition: bool, message: str) -> None:
    """Check an invariant of streamcnn's own arithmetic (never of user input)."""
    if not condition:
        raise AssertionError(f"streamcnn bug: {message}; please report it with the network "
                             f"and input shape that triggered it")
