"""Opt-in, process-wide settings that make streaming faster on some machines. Nothing here
is applied unless you call it.

On a CPU, every tile allocates its activations afresh. glibc serves allocations above its
mmap threshold (at most 32 MiB) with fresh pages from the kernel and returns them on free,
so with tiles of a few hundred pixels and more every tile faults its activations in again
(reports/BENCH.md, "Per-tile overhead"). ``Streaming`` already keeps freed memory for the
next tile while each of its passes runs (:mod:`streamcnn.allocator`, ``reuse_memory=True``);
:func:`keep_freed_memory` does so for the whole process, the code around ``Streaming`` too.
"""

from __future__ import annotations

import ctypes

from .allocator import M_MMAP_MAX, M_TRIM_THRESHOLD  # glibc's mallopt parameter numbers


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory for reuse (glibc only).

    Process-wide and not undoable: the same as starting Python with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. The next tile then reuses
    the previous tile's pages instead of faulting in new ones; the price is that the
    process's resident memory stays at its high-water mark. ``Streaming`` does this by
    itself for the duration of each pass and undoes it (:mod:`streamcnn.allocator`); once
    this is called, it sees the setting and leaves it as it is.
    Returns whether the C library took the settings (False where it is not glibc).
    On machines shared with other programs, also consider ``OMP_WAIT_POLICY=PASSIVE``
    (set before starting Python), which stops idle OpenMP threads from spinning.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
