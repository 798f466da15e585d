"""DistributedDataParallel around a Streaming front end gives conventional whole-batch backprop.

Two CPU processes (gloo backend, world size 2, one torch thread each) each wrap
``nn.Sequential(Streaming(front, TILE), head)`` in ``DistributedDataParallel``, stream their
half of every batch and step SGD; DDP's hooks all-reduce (average) the gradients each
rank's streamed backward produced. The oracle is conventional torch autograd in this
process: the unwrapped network, unstreamed, on the whole batch, with the loss averaged over
it (the mean of two equal halves' means, which is what DDP's average of the ranks'
gradients computes). Same seeds, float64, tolerance 1e-10 relative (``rel_err``): the only
differences are summation orders (tiles, the two halves, the all-reduce).

The front end is a small ResNet stem with two torchvision ``BasicBlock``s (residual adds,
a strided 1x1 downsample) and BatchNorm frozen in eval mode after ``model.train()``, as the
prostate paper froze it. One start of two processes (forked on Linux: ``start_method``)
runs every scenario; the tests read what the ranks wrote. A rank that fails, hangs or
outlives ``TIMEOUT_S`` fails the tests with its traceback; the processes are always reaped.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.models import BasicBlock, conv1x1, conv3x3, freeze_batchnorm
from streamcnn import Streaming
from streamcnn.testing import rel_err

F64 = 1e-10
WORLD = 2
PER_RANK = 2          # samples each rank streams per (micro-)batch
SIZE, TILE = 48, 32   # 3x3 tiles of 32 px per image (receptive field 24, stride 4)
CLASSES = 3
STEPS = 3             # optimiser steps of the training scenario
ACCUM = 2             # micro-batches per step of the no_sync scenario
LR, MOMENTUM = 0.1, 0.9
TIMEOUT_S = 300       # the whole run; generous for a loaded 2-core machine
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)  # a lost peer raises, never hangs
# Python >= 3.12 warns on every fork of a process with threads (pytest's parent may have a
# tqdm monitor); the ranks use one torch thread and no lock those threads hold
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")


# ---------------------------------------------------------------- what both sides build

def build() -> tuple[nn.Module, nn.Module]:
    """Front end (stem, two BasicBlocks, frozen BatchNorm) and head, seeded, float64."""
    torch.manual_seed(0)
    front = nn.Sequential(
        conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=nn.Sequential(
            conv1x1(8, 16, 2), nn.BatchNorm2d(16))))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))
    front, head = front.double(), head.double()
    freeze_batchnorm(front, seed=1)  # non-trivial running statistics and affine weights
    return front, head


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` with every BatchNorm frozen (eval mode), the usual fine-tuning recipe."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def batch(step: int, n: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: ``n`` images of ``size``² and labels, seeded."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=gen)


def share(t: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    """Part ``part`` of ``parts`` equal consecutive slices of the batch dimension."""
    n = t.shape[0] // parts
    return t[part * n:(part + 1) * n]


def unwrapped(model: nn.Module, what: str = "parameters") -> dict[str, torch.Tensor]:
    """Parameters (or ``what="buffers"``) by their names in ``nn.Sequential(front, head)``,
    whether ``model`` is that or ``nn.Sequential(Streaming(front), head)``, possibly inside DDP."""
    model = getattr(model, "module", model)  # DDP
    front, head = model
    named = f"named_{what}"
    return dict(getattr(getattr(front, "module", front), named)(prefix="0")) | dict(
        getattr(head, named)(prefix="1"))


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Each parameter's gradient (None where it has none: ``assert_all_close`` fails on a
    None on one side only)."""
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in unwrapped(model).items()}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrapped(model).items()}


# ---------------------------------------------------------------- the ranks

def _ddp_model() -> DDP:
    front, head = build()
    # find_unused_parameters=False (the default): every parameter must get its gradient
    # through the streamed backward, or DDP's reducer raises at the next forward
    overlap, budget = ("reuse", 0) if OVERLAP[0] == "reuse, strip_budget=0" else (OVERLAP[0], None)
    return DDP(train_mode(nn.Sequential(Streaming(front, TILE, overlap=overlap, strip_budget=budget),
                                        head)))


def _train(rank: int) -> dict:
    """STEPS SGD steps on this rank's half of each batch: gradients after the first
    backward (already all-reduced) and the parameters after the last step."""
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    out = {}
    for step in range(STEPS):
        x, y = batch(step, WORLD * PER_RANK)
        opt.zero_grad()
        F.cross_entropy(model(share(x, rank, WORLD)), share(y, rank, WORLD)).backward()
        if step == 0:
            out["grads"] = grads(model)
        opt.step()
    out["params"] = params(model)
    return out


def _accumulate(rank: int) -> dict:
    """One step of ACCUM micro-batches: all but the last backward under ``no_sync()``
    (local gradients, no communication), the last one all-reduces the accumulated sum."""
    model = _ddp_model()
    x, y = batch(STEPS, WORLD * ACCUM * PER_RANK)
    x, y = share(x, rank, WORLD), share(y, rank, WORLD)
    out = {}
    for m in range(ACCUM):
        xm, ym = share(x, m, ACCUM), share(y, m, ACCUM)
        if m < ACCUM - 1:
            with model.no_sync():
                (F.cross_entropy(model(xm), ym) / ACCUM).backward()
            out[f"unsynced{m}"] = grads(model)
        else:
            (F.cross_entropy(model(xm), ym) / ACCUM).backward()
    out["synced"] = grads(model)
    return out


SCENARIOS = {"train": _train, "accumulate": _accumulate}


def _loopback_for_gloo() -> None:
    """Both ranks are on this host: let gloo use the loopback interface rather than whatever
    the host name resolves to (unresolvable or firewalled names break gloo's connect)."""
    names = {name for _, name in socket.if_nameindex()}
    for lo in ("lo", "lo0"):
        if lo in names:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
            return


def _rank_main(rank: int, workdir: str, scenarios: dict) -> None:
    """Entry point of a rank's process: run every scenario (name -> function of the rank),
    save the results (or the traceback) in ``workdir``."""
    work = Path(workdir)
    try:
        torch.set_num_threads(1)
        _loopback_for_gloo()
        dist.init_process_group("gloo", init_method=f"file://{work / 'rendezvous'}", rank=rank,
                                world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
        try:
            results = {name: run(rank) for name, run in scenarios.items()}
        finally:
            dist.destroy_process_group()
        torch.save(results, work / f"rank{rank}.pt")
    except BaseException:
        (work / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


# ---------------------------------------------------------------- the parent

def start_method() -> str:
    """``fork`` on Linux: the ranks inherit the imported torch and streamcnn, where ``spawn``
    re-imports them in each rank (about 5 s of CPU each here, 15 s and more on a loaded 2-core
    machine). Safe here as in DataLoader workers: each rank runs one torch thread and gloo,
    and the parent never initialised a process group. ``spawn`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def run_ranks(workdir: Path, scenarios: dict = SCENARIOS,
              timeout: float = TIMEOUT_S) -> list[dict]:
    """Run ``_rank_main`` with ``scenarios`` (module-level functions: ``spawn`` pickles them)
    in WORLD new processes; their results, by rank.

    Stops waiting as soon as one rank fails (its peer would only wait for the collective
    timeout); terminates, then kills, whatever is still running; raises AssertionError
    naming each failed or hung rank, with its traceback.
    """
    ctx = mp.get_context(start_method())
    procs = [ctx.Process(target=_rank_main, args=(rank, str(workdir), scenarios),
                         name=f"ddp-rank{rank}", daemon=True) for rank in range(WORLD)]
    try:
        for p in procs:
            p.start()
        _wait(procs, time.monotonic() + timeout)
        running = [p.is_alive() for p in procs]
    finally:
        _reap(procs)
    failed = [rank for rank, alive in enumerate(running) if not alive and procs[rank].exitcode]
    problems = []
    for rank, p in enumerate(procs):
        error = workdir / f"rank{rank}.error"
        if error.exists():
            problems.append(f"rank {rank} raised:\n{error.read_text()}")
        elif running[rank]:
            problems.append(f"rank {rank} was terminated when rank {failed[0]} failed" if failed
                            else f"rank {rank} was still running after {timeout} s (a hung "
                                 f"collective?) and was terminated")
        elif p.exitcode != 0:
            problems.append(f"rank {rank} exited with code {p.exitcode} before reporting (killed, "
                            f"or failed while starting: see its stderr)")
    assert not problems, "\n".join(problems)
    return [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD)]


def _wait(procs: list, deadline: float) -> None:
    """Until all exit, one fails, or the deadline passes."""
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            return
        multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()],
                                        timeout=max(0.0, min(1.0, deadline - time.monotonic())))


def _reap(procs: list) -> None:
    """Terminate, then kill, every started process still running; join them all."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


#: how the ranks' tiles treat their overlap (set before the ranks start: forked, they
#: inherit it); both ways are run, each in one start of the ranks
OVERLAP = ["recompute"]


@pytest.fixture(scope="module", params=["recompute", "reuse", "reuse, strip_budget=0"])
def ranks(request, tmp_path_factory) -> list[dict]:
    if request.param != "recompute" and start_method() != "fork":
        pytest.skip("the ranks learn the overlap mode by inheriting it (fork)")
    OVERLAP[0] = request.param
    try:
        return run_ranks(tmp_path_factory.mktemp("ddp"))
    finally:
        OVERLAP[0] = "recompute"


def conventional_grads(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
    """The oracle: gradients of ``scale * mean cross-entropy`` of the unstreamed network."""
    front, head = build()
    model = train_mode(nn.Sequential(front, head))
    (scale * F.cross_entropy(model(x), y)).backward()
    return grads(model)


def assert_all_close(got: dict, ref: dict, what: str, tol: float = F64) -> None:
    """Every tensor of ``got`` within ``tol`` (``rel_err``) of ``ref``'s; a None (no gradient)
    on one side only fails."""
    assert got.keys() == ref.keys(), what
    missing = [n for n in ref if (got[n] is None) != (ref[n] is None)]
    assert not missing, f"{what}: a gradient on one side only: {missing}"
    errs = {n: rel_err(got[n], ref[n]) for n in ref if ref[n] is not None}
    worst = max(errs, key=errs.get, default=None)
    if worst is None:
        return
    assert errs[worst] <= tol, f"{what}: {worst} relative error {errs[worst]:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- the tests

def test_first_step_gradients_are_the_whole_batch_gradients(ranks):
    """After the first backward every rank holds the all-reduced gradient, which equals
    conventional backprop's on the whole batch (every parameter, BatchNorm's included)."""
    ref = conventional_grads(*batch(0, WORLD * PER_RANK))
    for rank, result in enumerate(ranks):
        assert_all_close(result["train"]["grads"], ref, f"rank {rank}, step 0")


def test_ranks_agree_bitwise_and_with_conventional_training(ranks):
    """After STEPS SGD steps with momentum the ranks' parameters are bit-identical, and
    equal those of conventional training on the whole batches."""
    front, head = build()
    model = train_mode(nn.Sequential(front, head))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    start = params(model)
    for step in range(STEPS):
        x, y = batch(step, WORLD * PER_RANK)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    p0, p1 = (r["train"]["params"] for r in ranks)
    for name, p in p0.items():
        assert torch.equal(p, p1[name]), f"{name} differs between the ranks"
    assert_all_close(p0, params(model), f"parameters after {STEPS} steps")
    assert all(rel_err(p, start[n]) > 1e-3 for n, p in params(model).items()), "it trained"


def test_no_sync_accumulates_locally_then_all_reduces(ranks):
    """Under ``no_sync()`` a rank keeps its own micro-batch's gradient (the two ranks'
    differ); the last, synced backward leaves the whole batch's mean gradient on both."""
    x, y = batch(STEPS, WORLD * ACCUM * PER_RANK)
    for rank, result in enumerate(ranks):
        xr, yr = share(x, rank, WORLD), share(y, rank, WORLD)
        for m in range(ACCUM - 1):
            local = conventional_grads(share(xr, m, ACCUM), share(yr, m, ACCUM), 1 / ACCUM)
            assert_all_close(result["accumulate"][f"unsynced{m}"], local,
                             f"rank {rank}, micro-batch {m} under no_sync")
        assert_all_close(result["accumulate"]["synced"], conventional_grads(x, y),
                         f"rank {rank}, after the synced micro-batch")
    g0, g1 = (r["accumulate"]["unsynced0"] for r in ranks)
    assert all(rel_err(g0[n], g1[n]) > 1e-3 for n in g0), "no_sync kept the gradients local"
