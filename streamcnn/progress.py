"""Progress bars over tiles, on by default where someone watches.

Every ``progress`` argument of the backend takes the same three values, tqdm's own rule for
``disable=None``:

- ``None`` (the default): a bar on stderr when stderr is a terminal (in a Jupyter notebook,
  tqdm's notebook bar); nothing in a log file, a pipe or a test's captured output;
- ``True``: always a bar;
- ``False``: never.
"""

from __future__ import annotations


def disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` argument for a ``progress`` argument (None: tqdm decides by
    whether its output is a terminal)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    return None if progress is None else not progress


def bar(iterable=None, *, progress: bool | None, **kwargs):
    """``tqdm(iterable, **kwargs)`` under the ``progress`` rule (module docstring); with
    ``progress=False``, ``iterable`` itself when there is one (nothing imported)."""
    if progress is False and iterable is not None:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=disable(progress), **kwargs)
