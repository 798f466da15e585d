"""Tile reads overlapped with compute: the next tile is read on a background thread while the
tile loop computes the current one, and what each streamed pass spent its time on.

A slide or a file on disk is read one tile at a time, in the forward pass and again in the
backward recomputation (:mod:`streamcnn.sources`). Reading (decoding a TIFF tile, a page
fault of a memmap) and computing use different resources, so :func:`prefetched` runs the
reads on one thread of their own, a bounded number of tiles ahead, in the order the loop
will consume them. The reads themselves are unchanged - the same calls, in the same order,
on one thread at a time - so a pass with prefetching computes bit for bit what it computes
without.

Rules the reader thread keeps (``Prefetcher``):

1. At most ``depth`` finished reads wait in a queue, and one more is being read: memory
   holds at most ``depth + 1`` tiles beyond the one the loop computes.
2. An exception raised by a read (``BaseException`` included) is handed to the loop in that
   tile's place and re-raised there, as the same exception, with a note naming the item
   (the tile); the thread reads nothing after it.
3. When the loop ends - normally, by an exception of its own (a layer that fails on a
   tile), or by ``KeyboardInterrupt`` - the thread is told to stop, finishes the read under
   way, and is joined before the loop's ``with`` block exits: no thread outlives its pass.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field

_DONE = object()  # the reader thread's last item: nothing more will come
_POLL_S = 0.05  # how often a blocked reader thread looks whether it was told to stop


@dataclass
class PassStats:
    """What one streamed pass (the forward, or the backward's recomputation) did.

    ``tiles``: tiles of the image the pass covered; ``computed``: tiles it ran through the
    module (the others reused an identical earlier tile's result: :mod:`streamcnn.dedup`,
    or, in the backward, were ``skipped``: their output gradient was zero,
    :mod:`streamcnn.skipping`, or ``reused`` the graph the forward kept,
    :mod:`streamcnn.keeping`);
    ``reads``: reads from the input's storage (one per tile read, re-reads for exact pixel
    comparisons included; for a slide with a tissue mask, only the ``read_region`` calls: a
    tile without tissue is filled with the background colour, not read). Seconds:
    ``read_s`` reading (and fingerprinting and comparing) tiles, on whichever thread read
    them; ``wait_s`` the tile loop waiting for a read (about ``read_s`` without
    prefetching, less with it); ``wall_s`` the whole pass; ``compute_s`` = ``wall_s -
    wait_s``, everything else (the module, its backward, copying outputs)."""

    tiles: int = 0
    computed: int = 0
    skipped: int = 0
    reused: int = 0
    reads: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    wall_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.wall_s - self.wait_s


@dataclass
class Stats:
    """What the latest call of a ``Streaming`` module did (``Streaming.last_stats``): whether
    reads were prefetched and identical tiles shared, and each pass's :class:`PassStats`
    (``backward`` is filled in when the backward runs)."""

    prefetch: bool
    dedup: bool
    forward: PassStats = field(default_factory=PassStats)
    backward: PassStats = field(default_factory=PassStats)
    #: the statistics passes of whole-map steps (:mod:`streamcnn.passes`), all levels
    #: together: tiles and computed tiles only
    statistics: PassStats = field(default_factory=PassStats)
    #: the backward-terms passes likewise (filled in by the backward)
    terms: PassStats = field(default_factory=PassStats)
    #: with reused overlaps (``overlap="reuse"``): per pass ("forward", "backward"), each
    #: step's blocks of computed positions, one per tile that computed any (per axis
    #: ``(start, stop)``), and the bytes of the strips the forward stored; else None, 0
    blocks: dict | None = None
    strip_bytes: int = 0


class Prefetcher:
    """``fn(item)`` for each of ``items``, computed on one background thread at most
    ``depth`` results ahead of the consumer, and yielded in order (see the module's rules).
    Use it as a context manager, which joins the thread on exit; ``describe(item)`` names an
    item in the note added to an exception its ``fn`` raised."""

    def __init__(self, fn, items, depth: int = 1, describe=repr, name: str = "streamcnn-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._describe = describe
        self._thread = threading.Thread(target=self._work, args=(fn, items), name=name,
                                        daemon=True)
        self._thread.start()

    def _work(self, fn, items) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                try:
                    result = (True, fn(item))
                except BaseException as err:  # noqa: B036 - handed to the consumer (rule 2)
                    self._put((False, (item, err)))
                    return
                if not self._put(result):
                    return
        except BaseException as err:  # noqa: B036 - the items themselves failed
            self._put((False, (None, err)))
            return
        self._put((True, _DONE))

    def _put(self, value) -> bool:
        """Queue ``value`` unless told to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            ok, payload = self._queue.get()
            if ok and payload is _DONE:
                return
            if ok:
                yield payload
                continue
            item, err = payload
            if item is not None:
                err.add_note(f"(raised while streamcnn read {self._describe(item)} on its "
                             f"prefetch thread)")
            raise err

    def close(self) -> None:
        """Stop reading ahead and join the thread (it finishes the read under way)."""
        self._stop.set()
        self._thread.join()
        while True:  # drop what was read ahead and never consumed
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def prefetched(fn, items, enabled: bool, depth: int = 1, describe=repr):
    """An iterator over ``fn(item)`` for each of ``items``: computed ahead on a
    :class:`Prefetcher` thread when ``enabled``, else one by one when the consumer asks."""
    if not enabled:
        yield map(fn, items)
        return
    with Prefetcher(fn, items, depth, describe) as ahead:
        yield iter(ahead)


def timed(fn, stats: PassStats):
    """``fn``, adding the seconds of each call to ``stats.read_s``."""
    def call(item):
        t0 = time.perf_counter()
        try:
            return fn(item)
        finally:
            stats.read_s += time.perf_counter() - t0
    return call


def waited(results, stats: PassStats):
    """``results``, adding the seconds the consumer waits for each to ``stats.wait_s``."""
    results = iter(results)
    while True:
        t0 = time.perf_counter()
        try:
            result = next(results)
        except StopIteration:
            return
        finally:
            stats.wait_s += time.perf_counter() - t0
        yield result
