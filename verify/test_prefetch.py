"""Reads overlapped with compute (``streamcnn.prefetch``): array tiles are read on a thread of
their own, a bounded number ahead, in the forward pass and in the backward recomputation.

Oracle: the same step without prefetching. Prefetching changes which thread reads, never
what is read or in which order, so outputs and gradients must be identical bit for bit and
the reads the same calls in the same order. The thread must be gone after every step: after
a clean one, after a read that fails on some tile, after the module fails on a tile while
reads are in flight, and after a KeyboardInterrupt.
"""

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from streamcnn import Streaming, StreamingError, plan
from streamcnn.prefetch import Prefetcher
from verify.test_inputs import CountingArray, front, image, normalise

TILE = 23


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("streamcnn-prefetch")]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    assert prefetch_threads() == []
    yield
    assert prefetch_threads() == [], "a prefetch thread outlived its pass"


def step(net, x, **kwargs):
    """Output, parameter gradients and the Streaming module of one step (fixed output gradient)."""
    net.zero_grad(set_to_none=True)
    streaming = Streaming(net, TILE, transform=normalise, **kwargs)
    y = streaming(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype))
    return y.detach(), [p.grad.clone() for p in net.parameters()], streaming


class ThreadArray(CountingArray):
    """Records the thread of every read, and can sleep in each (a slow disk)."""

    def __init__(self, data, delay=0.0):
        super().__init__(data)
        self.delay, self.threads = delay, []

    def __getitem__(self, index):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return super().__getitem__(index)


def test_prefetch_gives_the_same_step_bit_for_bit_and_the_same_reads():
    img = image()
    on, off = ThreadArray(img), ThreadArray(img)
    y, grads, s_on = step(front(), on, prefetch=True, dedup=False)
    y_ref, grads_ref, s_off = step(front(), off, prefetch=False, dedup=False)
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert on.reads == off.reads  # the same calls, in the same order
    assert s_on.last_stats.prefetch and not s_off.last_stats.prefetch
    assert set(off.threads) == {threading.main_thread().name}
    tiles = s_on.last_stats.forward.tiles
    assert on.threads.count(threading.main_thread().name) == 1  # only the first tile
    assert len(on.threads) == 2 * tiles and tiles > 2


def test_prefetch_is_on_for_arrays_only_and_can_be_turned_off():
    net, img = front(), image()
    assert step(net, img)[2].last_stats.prefetch
    assert not step(net, torch.from_numpy(img))[2].last_stats.prefetch  # tiles are views
    assert not step(net, img, prefetch=False)[2].last_stats.prefetch


class GatedArray(ThreadArray):
    """Sets ``started`` when the read of tile ``k`` (0-based, per pass) begins."""

    def __init__(self, data, k):
        super().__init__(data)
        self.k, self.started = k, threading.Event()

    def __getitem__(self, index):
        if len(self.reads) == self.k:
            self.started.set()
        return super().__getitem__(index)


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_next_tile_is_read_while_one_computes(prefetch):
    """While the module computes tile 1, tile 2 is being read - with prefetching only."""
    net, array = front(), GatedArray(image(), 2)
    seen = []

    def hook(module, args, out):
        if len(seen) == 1:  # tile 1 (tile 0 was the first call)
            seen.append(array.started.wait(timeout=10 if prefetch else 0.2))
        else:
            seen.append(None)

    handle = net[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            Streaming(net, TILE, transform=normalise, prefetch=prefetch)(array)
    finally:
        handle.remove()
    assert seen[1] is prefetch


def test_reads_run_at_most_two_tiles_ahead():
    """Depth 1: one finished read waits, one more is under way."""
    consumed = []
    ahead = []

    def read(k):
        ahead.append(k - len(consumed))
        return k

    with Prefetcher(read, range(40), depth=1) as results:
        for k in results:
            time.sleep(0.002)
            consumed.append(k)
    assert consumed == list(range(40))
    assert max(ahead) <= 2


class FailingArray(ThreadArray):
    """Raises on its ``k``-th read (0-based, counting both passes)."""

    def __init__(self, data, k, delay=0.0):
        super().__init__(data, delay)
        self.k = k

    def __getitem__(self, index):
        if len(self.reads) == self.k:
            self.reads.append(index)
            raise OSError("disk read error")
        return super().__getitem__(index)


def tile_origin(net, k):
    """The origin of tile ``k`` (row-major) of ``image()``, and the number of tiles."""
    p = plan(net, (2, 3, 75, 61), TILE, input_dtype=torch.uint8, transform=normalise)
    origins = [(h, w) for h in p.tile_starts[0] for w in p.tile_starts[1]]
    return origins[k], len(origins)


@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_a_failed_read_on_the_prefetch_thread_names_the_tile(pass_):
    net = front()
    (h, w), tiles = tile_origin(net, 5)
    k = 5 if pass_ == "forward" else tiles + 5
    array = FailingArray(image(), k)
    with pytest.raises(OSError, match=rf"reading the input tile at \({h}, {w}\) \(pixel offsets "
                                      rf"per spatial axis\) failed: OSError: disk read error") as err:
        step(net, array, dedup=False)
    assert any("prefetch thread" in note for note in err.value.__notes__)
    assert array.threads[k - 1] != threading.main_thread().name
    assert len(array.reads) <= k + 1  # nothing read after the failure


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_an_error_in_the_module_while_reads_are_in_flight_stops_the_thread(error, pass_):
    """The module fails on a tile (or the user presses Ctrl-C) while the next reads are under
    way: the error reaches the caller unchanged, the reader stops, its thread is joined."""
    net, array = front(), ThreadArray(image(), delay=0.01)
    calls = []
    tiles = tile_origin(net, 0)[1]
    fail_at = 4 if pass_ == "forward" else tiles + 4

    def hook(module, args, out):
        calls.append(None)
        if len(calls) == fail_at:
            raise error("tile failed")

    handle = net[2].register_forward_hook(hook)
    try:
        with pytest.raises(error, match="tile failed"):
            step(net, array, dedup=False)
    finally:
        handle.remove()
    assert len(array.reads) <= fail_at + 2  # at most the reads in flight, then it stopped


def test_an_array_refilled_before_the_backward_is_named_through_the_prefetch_thread():
    net = front()
    data = image()
    x = Streaming(net, TILE, transform=normalise)(data)
    data[:, :, 30:40, 30:40] += 1
    with pytest.raises(StreamingError, match=r"the input array changed between the streamed "
                                             r"forward and its backward"):
        x.sum().backward()


def test_stats_count_reads_and_split_time():
    net, img = front(), image()
    array = ThreadArray(img, delay=0.002)
    s = step(net, array, dedup=False)[2]
    stats = s.last_stats
    for p in (stats.forward, stats.backward):
        assert p.tiles == p.computed == p.reads > 1
        assert p.read_s >= p.reads * 0.002 and 0 <= p.wait_s <= p.wall_s
        assert p.compute_s == pytest.approx(p.wall_s - p.wait_s)
    assert len(array.reads) == stats.forward.reads + stats.backward.reads


def test_a_module_kept_alive_across_steps_leaves_no_thread():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()
    streaming = Streaming(net, 16, transform=normalise)
    for _ in range(3):
        streaming(np.random.default_rng(0).integers(0, 256, (1, 3, 50, 50), np.uint8)).sum().backward()
    assert prefetch_threads() == []
