"""Freed tile memory kept on the heap while a pass runs (streamcnn.allocator, on by default).

Results are bit for bit those of ``reuse_memory=False``; the setting is applied during the
forward pass and the backward recomputation and nowhere else; afterwards glibc behaves as
after any program freed a 32 MiB buffer (the same probe answers as such a process, checked
in child processes, since the settings are process-wide); settings a user made are left
alone; and without glibc nothing happens. No timings here: the page faults it saves are in
reports/BENCH.md.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from bench.memory import read_status_bytes
from streamcnn import Streaming, allocator

GLIBC = allocator.glibc() is not None
ADAPTIVE = GLIBC and not allocator.user_configured()
needs_glibc = pytest.mark.skipif(not ADAPTIVE, reason="glibc with its adaptive defaults only")


def network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
                         nn.BatchNorm2d(16).eval(), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=2))


def step(reuse_memory, seen=None):
    """One training step; ``seen`` collects allocator.active() in every forward call of the
    first layer (each tile of the forward and of the backward recomputation)."""
    net = network()
    if seen is not None:
        net[0].register_forward_hook(lambda *_: seen.append(allocator.active()))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 300, 260, requires_grad=True)
    model = Streaming(net, 96, progress=False, reuse_memory=reuse_memory)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).square().mean().backward()
    return [y.detach(), x.grad] + [p.grad for p in net.parameters()]


def test_bit_identical_with_and_without():
    seen = []
    on, off = step(True, seen), step(False)
    assert all(torch.equal(a, b) for a, b in zip(on, off, strict=True))
    assert len(seen) > 2 and all(seen) == ADAPTIVE  # forward tiles and backward recomputation
    assert not allocator.active()  # put back after the backward


def test_small_is_bit_identical_and_applied():
    seen = []
    small, off = step("small", seen), step(False)
    assert all(torch.equal(a, b) for a, b in zip(small, off, strict=True))
    assert len(seen) > 2 and all(seen) == ADAPTIVE


@pytest.mark.parametrize("bad", ["yes", 1, None, "Small"])
def test_bad_setting_is_refused(bad):
    with pytest.raises(ValueError, match="reuse_memory must be True .* 'small' .* or False"):
        Streaming(network(), 96, reuse_memory=bad)


@needs_glibc
def test_small_keeps_only_buffers_under_32_mib():
    """``"small"``: a request under 32 MiB comes from the heap, one of 32 MiB is mapped (and so
    returned when freed) while the scope runs; with True both come from the heap."""
    libc, mib = allocator.glibc(), 1 << 20
    with allocator.reuse_freed_memory("small"):
        assert allocator.active()
        assert libc.route(31 * mib) is False and libc.route(32 * mib) is True
        held = [libc.malloc(8 * mib) for _ in range(16)]
        for p in held:
            ctypes.memset(p, 1, 8 * mib)
        for p in reversed(held):
            libc.free(p)
        kept = read_status_bytes("RssAnon")
        allocator.release(between_passes=True)  # (under "small": between passes too)
        assert kept - read_status_bytes("RssAnon") > 96 * mib
    with allocator.reuse_freed_memory(True):
        assert libc.route(31 * mib) is False and libc.route(32 * mib) is False
    assert not allocator.active()


@needs_glibc
def test_release_returns_the_free_heap_inside_a_scope():
    """``release`` hands the heap's free memory back (a pass's peak is then its own) and keeps
    the setting; between passes only under ``"small"``; outside a scope, it does nothing."""
    libc, mib = allocator.glibc(), 1 << 20
    with allocator.reuse_freed_memory():
        held = [libc.malloc(8 * mib) for _ in range(16)]
        for p in held:
            ctypes.memset(p, 1, 8 * mib)  # (resident now)
        for p in reversed(held):
            libc.free(p)
        kept = read_status_bytes("RssAnon")
        allocator.release(between_passes=True)  # (True: not between passes)
        assert kept - read_status_bytes("RssAnon") < 32 * mib
        allocator.release()
        assert kept - read_status_bytes("RssAnon") > 96 * mib  # of the 128 MiB freed (other threads may
        assert allocator.active()  # allocate meanwhile)
    allocator.release()  # (no scope: a no-op)


def test_opt_out_leaves_glibc_alone():
    seen = []
    step(False, seen)
    assert seen and not any(seen)


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(os, "confstr", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert allocator.glibc.__wrapped__() is None  # macOS, musl: no CS_GNU_LIBC_VERSION
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    seen = []
    on = step(True, seen)
    assert seen and not any(seen)
    assert all(torch.equal(a, b) for a, b in zip(on, step(False), strict=True))


def test_user_environment_is_respected():
    assert allocator.user_configured({"MALLOC_MMAP_MAX_": "0"})
    assert allocator.user_configured({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
    assert not allocator.user_configured({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


@needs_glibc
def test_nested_scopes_apply_once():
    with allocator.reuse_freed_memory():
        assert allocator.active()
        with allocator.reuse_freed_memory():
            assert allocator.active()
        assert allocator.active()
    assert not allocator.active()


# What a child process sees of glibc's settings: where requests of each size go when the free
# heap cannot serve them (True: mapped), and whether freeing heap memory of each total hands it
# back to the system (the trim threshold: 62 MiB kept, 90 MiB returned, at the ceiling).
CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from verify.test_allocator import step
from streamcnn import allocator, tuning
libc = allocator.glibc()
MiB = 1 << 20

def trims(count, size):
    libc.malloc_trim(0)
    held = [libc.malloc(size) for _ in range(count)]
    grown = libc.info().arena
    for p in reversed(held):
        libc.free(p)
    return libc.info().arena < grown

def probe():
    return {{"mapped": [libc.route(n) for n in (256 << 10, MiB, 8 * MiB, 31 * MiB, 32 * MiB, 64 * MiB)],
             "returned": [trims(2, 31 * MiB), trims(3, 30 * MiB)]}}

out = {{}}
mode = sys.argv[1]
if mode == "settled":  # what any program reaches by freeing one mapped buffer just under 32 MiB
    libc.free(libc.malloc(32 * MiB - 2 * libc.page))
    out["before"] = probe()
if mode == "keep_freed_memory":
    tuning.keep_freed_memory()
seen = []
reuse = "small" if mode == "small" else True
step(reuse, seen)
step(reuse)
out["active"] = any(seen)
out["after"] = probe()
print(json.dumps(out))
"""


def child(mode, env=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=root), mode], capture_output=True,
                         text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.splitlines()[-1])


CEILING = {"mapped": [False, False, False, False, True, True], "returned": [False, True]}


@needs_glibc
def test_settings_after_a_step_are_glibcs_own():
    settled, fresh = child("settled"), child("fresh")
    assert settled["active"] and fresh["active"]
    # a process that freed a 32 MiB buffer answers the same before and after streamed steps
    assert settled["before"] == CEILING and settled["after"] == CEILING
    # and a fresh process after steps answers as that one: large buffers are mapped again and
    # freed heap memory is handed back past twice the threshold, as glibc's adaptive rule does
    assert fresh["after"] == CEILING
    small = child("small")  # so does one after steps with reuse_memory="small"
    assert small["active"] and small["after"] == CEILING


@needs_glibc
def test_settings_a_user_made_are_left_alone():
    fixed = child("fresh", {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
    assert not fixed["active"] and fixed["after"]["mapped"] == [True] * 6
    kept = child("keep_freed_memory")  # mallopt at run time, seen by probing
    assert not kept["active"] and kept["after"]["mapped"] == [False] * 6
