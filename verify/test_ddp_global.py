"""DistributedDataParallel around a Streaming front end with training-mode BatchNorm and
squeeze-and-excitation, with level checkpoints in memory and on disk.

test_ddp's harness (two forked CPU processes, gloo, one torch thread each, float64) runs, in
each rank, the same network twice under ``DistributedDataParallel`` with its defaults
(buffers broadcast from rank 0 at every forward, no SyncBatchNorm): streamed,
``nn.Sequential(Streaming(front, TILE, checkpoints=...), head)``, and conventional, unstreamed.
The front end is a stem and two torchvision MBConv blocks (``bench.models``): BatchNorm in
training mode, so each rank normalises with its own share's batch statistics and updates its
running statistics from them, and a squeeze-and-excitation gate in each block (a mean over the
whole map). That is several whole-map levels, so level checkpoints store maps: in host memory
(``"auto"``, the default) and in files (``"disk"``, the system temporary folder, made the
rank's own folder so that the test sees only its own files).

The oracle is conventional DDP in the same rank on the same share of the same seeded batches.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.models import MBConv, conv_bn_act
from streamcnn import Streaming
from streamcnn.testing import rel_err
from test_ddp import (LR, MOMENTUM, PER_RANK, WORLD, assert_all_close, batch, grads, params,
                      run_ranks, share, unwrapped)

SIZE, TILE = 40, 24   # tiles of 24 px on 40 px images (output 10x10, stride 4)
CLASSES = 3
STEPS = 3
STORAGE = ("auto", "disk")
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")


def build() -> tuple[nn.Module, nn.Module]:
    """Stem and two MBConv blocks with squeeze-and-excitation, BatchNorm in training mode, and
    the head; seeded, float64. (The second block's residual keeps the first block's projection
    BatchNorm's bias gradient non-zero: a BatchNorm would otherwise cancel it exactly.)"""
    torch.manual_seed(0)
    front = nn.Sequential(conv_bn_act(3, 8, 3, 2), MBConv(8, 16, 2, 3, 2), MBConv(16, 16, 2, 3, 1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))
    return front.double(), head.double()


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in unwrapped(model, "buffers").items()}


def stored(folder: Path) -> list[str]:
    """The checkpoint files (``checkpoints.MapStore``'s folders) in ``folder``."""
    return sorted(str(f.relative_to(folder)) for d in folder.glob("streamcnn-checkpoints-*")
                  for f in [d, *d.rglob("*")])


def _train(model: nn.Module, rank: int, folder: Path) -> dict:
    """STEPS SGD steps of ``model`` on this rank's share: the (all-reduced) gradients after the
    first backward, the checkpoint files after the first forward, the parameters and buffers
    after the last step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    out = {}
    for step in range(STEPS):
        x, y = batch(step, WORLD * PER_RANK, SIZE)
        opt.zero_grad()
        logits = model(share(x, rank, WORLD))
        if step == 0:
            out["stored"] = stored(folder)
        F.cross_entropy(logits, share(y, rank, WORLD)).backward()
        if step == 0:
            out["grads"] = grads(model)
        opt.step()
    out["params"], out["buffers"] = params(model), buffers(model)
    return out


def _scenario(rank: int, checkpoints: str) -> dict:
    """The streamed and the conventional DDP model trained alike; the checkpoint files left
    once the training loop has returned (its last graph freed)."""
    folder = Path(tempfile.mkdtemp(prefix=f"ddp-rank{rank}-"))
    tempfile.tempdir = str(folder)  # where "disk" (and "auto" beyond memory) stores
    try:
        front, head = build()
        streamed = DDP(nn.Sequential(Streaming(front, TILE, checkpoints=checkpoints), head).train())
        out = {"streamed": _train(streamed, rank, folder)}
        gc.collect()
        out["left"] = stored(folder)
        front, head = build()
        out["conventional"] = _train(DDP(nn.Sequential(front, head).train()), rank, folder)
        return out
    finally:
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


def _auto(rank: int) -> dict:
    return _scenario(rank, "auto")


def _disk(rank: int) -> dict:
    return _scenario(rank, "disk")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(tmp_path_factory.mktemp("ddp_global"), {"auto": _auto, "disk": _disk})


@pytest.mark.parametrize("storage", STORAGE)
def test_first_step_gradients_equal_conventional_ddp(ranks, storage):
    """After the first backward every rank holds the all-reduced gradient of conventional DDP
    with training-mode BatchNorm (each rank's own batch statistics), to 1e-10 relative:
    float64, and the two differ only in summation order (tiles; statistics and gate means
    summed over tiles; the parameter gradients' sums over tiles)."""
    for rank, result in enumerate(ranks):
        got, ref = result[storage]["streamed"]["grads"], result[storage]["conventional"]["grads"]
        assert all(g is not None for g in ref.values()), "test bug: a parameter without gradient"
        assert_all_close(got, ref, f"rank {rank}, {storage}, step 0")


@pytest.mark.parametrize("storage", STORAGE)
def test_parameters_and_running_statistics_after_steps(ranks, storage):
    """After STEPS SGD steps with momentum: the ranks' parameters are bit-identical (DDP) and
    equal conventional DDP's; each rank's BatchNorm running_mean and running_var equal
    conventional DDP's on that rank, num_batches_tracked exactly; the ranks' running
    statistics differ (rank 0's are broadcast at each forward, then each rank updates them
    from its own share).

    Tolerance 1e-10 relative, as for the gradients: each step's gradients and batch
    statistics agree to ~1e-14 (float64, summation order), and three steps carry those
    differences on through the parameters without amplifying them by orders of magnitude
    (measured: 1e-13 at most), where any real error - a statistic of the wrong batch, an
    update missed or made twice (momentum 0.1), a wrong gradient - is 1e-3 or more."""
    for kind in ("streamed", "conventional"):
        p0, p1 = (r[storage][kind]["params"] for r in ranks)
        assert all(torch.equal(p, p1[n]) for n, p in p0.items()), f"{kind}: ranks' parameters"
    for rank, result in enumerate(ranks):
        got, ref = result[storage]["streamed"], result[storage]["conventional"]
        assert_all_close(got["params"], ref["params"], f"rank {rank}, {storage}, parameters")
        counts = [n for n in ref["buffers"] if n.endswith("num_batches_tracked")]
        assert counts and all(got["buffers"][n].item() == ref["buffers"][n].item() == STEPS
                              for n in counts)
        assert_all_close(got["buffers"], ref["buffers"], f"rank {rank}, {storage}, buffers")
    for kind in ("streamed", "conventional"):  # (the stem's: some later layers' running
        # means are equal on the ranks exactly, W·beta of the BatchNorm before them)
        b0, b1 = (r[storage][kind]["buffers"]["0.0.1.running_mean"] for r in ranks)
        assert rel_err(b0, b1) > 1e-3, f"{kind}: each rank's statistics are its own batch's"


@pytest.mark.parametrize("storage", STORAGE)
def test_checkpoint_files(ranks, storage):
    """"disk" stored the maps in files during the step; no checkpoint folder is left once the
    training loop's last graph is freed, whatever the storage."""
    for rank, result in enumerate(ranks):
        if storage == "disk":
            assert result[storage]["streamed"]["stored"], f"rank {rank}: nothing stored on disk"
        assert result[storage]["left"] == [], f"rank {rank}: files left"
