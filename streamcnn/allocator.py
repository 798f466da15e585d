"""Keep the memory a tile frees for the next tile, while a streamed pass runs (glibc, CPU).

Every tile allocates its activations afresh. With glibc's defaults a buffer of at least the
mmap threshold (adaptive, at most 32 MiB) is mapped when torch allocates it and unmapped when
torch frees it, and a heap whose free top grows past the trim threshold (twice the mmap
threshold) is shrunk, so each tile faults its activations in again: about a quarter of a
streamed step on the benchmark machine (reports/BENCH.md, "Per-tile overhead").
:func:`reuse_freed_memory` takes every allocation from the heap and keeps freed memory there
while a pass runs, then puts glibc's settings back and returns the freed memory to the
system (before a step's final backward too: :func:`release`). ``Streaming(..., reuse_memory=False)`` turns it off;
``reuse_memory="small"`` keeps only buffers under 32 MiB on the heap and leaves larger ones
mapped, so that they go back to the system when freed: a lower peak where the heap would
otherwise grow past a pass's live memory (freed large blocks that fit no later request), for
the price of faulting the large buffers in again in every tile.

What is put back, and what cannot be. glibc has no call that reads its settings, and setting
any of them with ``mallopt`` also switches off its adaptive mmap threshold for good (glibc's
``mp_.no_dyn_threshold``). So before changing anything the scope first moves the adaptive
threshold to where glibc's own rule stops raising it, its ceiling: it allocates and frees
one buffer just under 32 MiB, exactly as any program that frees such a buffer does (the
threshold becomes 32 MiB less a page, the trim threshold twice that). From that state the
adaptive rule never changes either threshold again, so switching it off changes nothing
observable, and the values to restore are known: at most 65536 mappings (glibc's default)
and the trim threshold twice the mmap threshold. What stays is therefore the ceiling itself:
after the first streamed pass, buffers between the old threshold (128 KiB in a fresh process)
and 32 MiB come from the heap, as they would after the program freed one such buffer.

Where the settings are not glibc's adaptive defaults, nothing is touched: another C library
(macOS, musl) or another malloc in front of glibc (jemalloc, tcmalloc), a 32-bit process,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``
or those ``GLIBC_TUNABLES`` set, or ``mallopt`` called before (a threshold fixed below 32 MiB,
or mapping switched off, as :func:`streamcnn.tuning.keep_freed_memory` does) - checked before
each pass by probing with untouched allocations (:meth:`Glibc.route`; a thread allocating at
that very moment could mislead the probe). A user who fixed the threshold at exactly 32 MiB
with ``mallopt`` cannot be told from glibc's ceiling, and gets the ceiling's trim threshold. The settings are process-wide
while a pass runs: other threads' frees are kept too until the pass ends. Nested and
concurrent passes share one application (a counter). No result changes: only where torch's
buffers live does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

# glibc's mallopt parameter numbers (malloc.h) and defaults (malloc/malloc.c, 64-bit)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_MMAP_MAX = 65536
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8  # DEFAULT_MMAP_THRESHOLD_MAX: the adaptive ceiling

# Settings a user makes before Python starts; any of them means glibc is not adaptive here.
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.mmap_max",
                 "glibc.malloc.trim_threshold", "glibc.malloc.top_pad", "glibc.malloc.hugetlb")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


class _Mallinfo(ctypes.Structure):  # glibc before 2.33: int fields (hblks, a count, fits)
    _fields_ = [(f.replace("2", ""), ctypes.c_int) for f, _ in _Mallinfo2._fields_]


class Glibc:
    """The process's malloc functions, when they are glibc's on a 64-bit system."""

    def __init__(self, lib: ctypes.CDLL):
        self.malloc = lib.malloc
        self.malloc.restype, self.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        self.free = lib.free
        self.free.restype, self.free.argtypes = None, [ctypes.c_void_p]
        self.mallopt = lib.mallopt
        self.mallopt.restype, self.mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
        self.malloc_trim = lib.malloc_trim
        self.malloc_trim.restype, self.malloc_trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
        try:
            self._mallinfo = lib.mallinfo2
            self._mallinfo.restype = _Mallinfo2
        except AttributeError:
            self._mallinfo = lib.mallinfo
            self._mallinfo.restype = _Mallinfo
        self.page = os.sysconf("SC_PAGESIZE")

    def info(self):
        return self._mallinfo()

    def route(self, nbytes: int) -> bool | None:
        """Whether glibc maps a request of ``nbytes`` that its free heap memory cannot serve
        (True), or grows the heap for it (False); None when that could not be seen.

        The threshold only matters when the free memory is short, so the request is repeated
        (untouched) until glibc has to get memory from the system; all are then freed, as
        any program frees them (freeing a mapped one may raise the adaptive threshold)."""
        start = self.info()
        held, verdict = [], None
        try:
            for _ in range(start.fordblks // nbytes + 2):
                before = self.info()
                p = self.malloc(nbytes)
                if not p:
                    break
                held.append(p)
                after = self.info()
                if after.hblks != before.hblks:
                    verdict = after.hblks == before.hblks + 1 and after.arena == before.arena
                    break
                if after.arena != before.arena:
                    verdict = False
                    break
        finally:
            for p in reversed(held):
                self.free(p)
        return verdict


@functools.cache
def glibc() -> Glibc | None:
    """glibc's malloc functions, or None where the C library is another (macOS, musl, Windows)
    or the process is 32-bit."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            return None
        return Glibc(ctypes.CDLL(None))
    except (ValueError, OSError, AttributeError):
        return None


def user_configured(environ=os.environ) -> bool:
    """Whether glibc's malloc was configured before Python started (environment, tunables)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(k in environ for k in USER_ENV) or any(t in tunables for t in USER_TUNABLES)


def settle(libc: Glibc) -> bool:
    """Raise glibc's adaptive mmap threshold to its ceiling the way glibc itself does, and
    check that the settings are glibc's adaptive ones there: True when a buffer just under
    32 MiB now comes from the heap and one of 32 MiB is still mapped.

    glibc raises the threshold to the size of a mapped buffer when it is freed, if that size
    (with its flag bits) is at most 32 MiB, so the highest reachable threshold is 32 MiB
    less a page; the buffer here is sized to map to exactly that."""
    below = MMAP_THRESHOLD_MAX - 2 * libc.page  # maps to 32 MiB - 1 page (header, rounding)
    libc.route(below)  # if mapped, freeing it raises the threshold to the ceiling (if adaptive)
    return libc.route(below) is False and libc.route(MMAP_THRESHOLD_MAX) is True


_lock = threading.Lock()
_depth = 0
_applied = False
_mode = None  # the applied setting (True or "small")


def check_mode(mode) -> None:
    """``reuse_memory``'s values: True, False or ``"small"``."""
    if not (isinstance(mode, bool) or (isinstance(mode, str) and mode == "small")):
        raise ValueError(f"reuse_memory must be True (keep every freed buffer for the next "
                         f"tile), 'small' (keep those under 32 MiB, return larger ones) or "
                         f"False (leave glibc alone), not {mode!r}")


def _apply(mode) -> bool:
    libc = glibc()
    if libc is None or user_configured() or not settle(libc):
        return False
    if mode != "small" and not libc.mallopt(M_MMAP_MAX, 0):  # ("small": buffers of 32 MiB
        return False  # or more stay mapped, as settle left them)
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
    return True


def _restore() -> None:
    libc = glibc()
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * (MMAP_THRESHOLD_MAX - libc.page))
    libc.malloc_trim(0)  # what the pass freed goes back to the system, as with the defaults


@contextlib.contextmanager
def reuse_freed_memory(enabled=True):
    """While the block runs, glibc takes every allocation from the heap (``enabled="small"``:
    those under 32 MiB) and keeps what is freed for reuse; afterwards its settings are
    glibc's adaptive ones at their ceiling and the freed memory is returned (see the module
    docstring). A no-op where ``enabled`` is False or the settings are not glibc's adaptive
    defaults. Nested blocks share the outermost one's setting."""
    global _depth, _applied, _mode
    if not enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            _applied, _mode = _apply(enabled), enabled
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _applied:
                _restore()
                _applied = False


def release(between_passes: bool = False) -> None:
    """Inside a scope that applied the heap-only setting: return the heap's free memory to
    the system now (``malloc_trim``), keeping the setting. Called before a step's final
    backward, after the whole-map terms passes in the same scope: its peak resident memory
    is then its own, not the passes' (the heap grows past a pass's live memory where freed
    blocks fit no later request), for faulting its memory in once more. ``between_passes``:
    at the start of each statistics or terms pass, only under ``"small"`` (the least
    memory; with True, passes alike in size would each fault their memory in again)."""
    if _applied and (not between_passes or _mode == "small"):
        glibc().malloc_trim(0)


def active() -> bool:
    """Whether the heap-only setting is applied right now (inside a pass that applied it)."""
    return _applied
