"""Mixed precision: a streamed training step under autocast and ``torch.amp.GradScaler``
equals the conventional step under the same autocast.

The recipe is PyTorch's: forward and loss inside ``torch.autocast``, ``scaler.scale(loss)
.backward()`` *outside* it, ``scaler.unscale_``, ``step``, ``update``. Streaming's backward
recomputes every tile after the autocast region has closed, so it must replay the forward's
autocast state (``streamcnn.function.autocast_state``), not the ambient one; hooks on the
front end's convolutions record the dtype and grad mode of every call to show it did, in
both directions. ``verify/test_streaming_equivalence.py`` has the simpler bfloat16 case
(backward inside autocast, no scaler).

The oracle is conventional torch autograd on the unstreamed network under the same autocast
(and, for the float32 case, without it). The network: a stem convolution, frozen
BatchNorm, ReLU, one torchvision ``BasicBlock`` (residual add), global average pooling and
a linear head; float32 parameters, 3x3 tiles of 20 px on 48x48 images.

Tolerance, derived from the format. Autocast runs convolutions and the linear layer in the
low-precision format with float32 accumulation and rounds each result once (relative error
at most the unit roundoff u: 2^-11 for float16, 2^-8 for bfloat16); frozen BatchNorm, the
residual add and the average pool round their float32-computed results once too; ReLU,
max and casts up are exact. On the longest chain - the stem's weight gradient - a value is
rounded n = 19 times: 9 in the forward (stem conv, BN, conv1, bn1, conv2, bn2, add,
avgpool, linear) and 10 in the backward (the logits' gradient cast down, linear, avgpool,
bn2, conv2, bn1, conv1, the sum of the two paths' gradients at the block input, BN, the
stem's weight gradient). To first order, with layers of moderate gain, each run is then
within n*u of exact arithmetic and the two runs within 2*n*u of each other; we allow
2 * 20 * u (0.020 for float16, 0.16 for bfloat16), relative to the largest entry
(``rel_err``). Streaming adds no rounding: it changes the float32 accumulation order (tiles),
which moves a rounded value by at most one unit in the last place, and its weight gradient
is the float32 sum of the tiles' rounded parts instead of one rounded whole-image sum.
Measured here: about 1u (at most 1.2u over four batches, both formats): a wide margin;
gross errors (a wrong tile, a wrong scale) are O(1) and fail it.

That last difference has one visible consequence, pinned by
``test_float16_weight_gradient_overflows_later_when_streamed``: near the overflow threshold
a whole-image weight gradient can overflow float16 while each tile's part does not, and
then the two runs' scalers differ (streaming keeps the finite, correct gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.models import BasicBlock, conv3x3, freeze_batchnorm
from streamcnn import Streaming, plan
from streamcnn.testing import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FORMATS = pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["float16", "bfloat16"])
ROUNDINGS = 20  # n = 19 on the longest chain (module docstring), rounded up
F32 = 1e-4      # float32 throughout (test_streaming_equivalence.py)
SIZE, TILE, BATCH, CLASSES = 48, 20, 2, 3
LR = 0.1


def tolerance(dtype: torch.dtype) -> float:
    """2 n u: two runs, each within n roundings of exact arithmetic."""
    return 2 * ROUNDINGS * UNIT_ROUNDOFF[dtype]


def build(device: str) -> tuple[nn.Module, nn.Module]:
    """Front end (stem conv, frozen BN, ReLU, BasicBlock) and head, seeded, float32."""
    torch.manual_seed(0)
    front = nn.Sequential(conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True), BasicBlock(8, 8))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    freeze_batchnorm(front, seed=1)
    return front.to(device), head.to(device)


def data(device: str, step: int = 0):
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    return x.to(device), torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)


class Calls:
    """Forward hooks on the front end's convolutions: (grad enabled, output dtype) per call.
    The streamed forward runs without grad, the backward's recomputation with grad."""

    def __init__(self, front: nn.Module):
        self.seen = []
        self.convs = [m for m in front.modules() if isinstance(m, nn.Conv2d)]
        for m in self.convs:
            m.register_forward_hook(lambda m, i, o: self.seen.append((torch.is_grad_enabled(),
                                                                      o.dtype)))

    def dtypes(self, grad_enabled: bool) -> list:
        return [d for g, d in self.seen if g == grad_enabled]


class Run:
    """One model (streamed or not), its SGD optimiser and GradScaler, stepped the AMP way."""

    def __init__(self, device: str, streamed: bool, overlap: str = "recompute", **scaler_args):
        self.front, self.head = build(device)
        self.calls = Calls(self.front)
        budget = None  # ("reuse/2": strips under a budget of half their bytes at every step)
        if overlap == "reuse/2":
            overlap, budget = "reuse", plan(self.front, (BATCH, 3, SIZE, SIZE), TILE,
                                            overlap="reuse").strip_bytes // 2
        self.model = nn.Sequential(Streaming(self.front, TILE, overlap=overlap, strip_budget=budget)
                                   if streamed else self.front,
                                   self.head)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.scaler = torch.amp.GradScaler(device, growth_interval=1, **scaler_args)
        self.device = device

    def params(self) -> dict:
        return {n: p.detach().clone() for n, p in named(self.front, self.head)}

    def step(self, x, y, dtype) -> dict:
        """Forward under autocast, backward outside it; the unscaled gradients, the front
        end's output dtype, the largest scaled gradient and the scale after ``update``."""
        self.opt.zero_grad()
        with torch.autocast(self.device, dtype=dtype):
            features = self.model[0](x)
            loss = F.cross_entropy(self.model[1](features), y)
        self.scaler.scale(loss).backward()
        scaled_max = max(p.grad.abs().max().item() for _, p in named(self.front, self.head))
        self.scaler.unscale_(self.opt)
        grads = {n: p.grad.detach().clone() for n, p in named(self.front, self.head)}
        self.scaler.step(self.opt)
        self.scaler.update()
        return dict(grads=grads, features=features.dtype, scaled_max=scaled_max,
                    new_scale=self.scaler.get_scale())


def named(front: nn.Module, head: nn.Module) -> list:
    """Parameters by the same names whether the front end is streamed or not."""
    return list(front.named_parameters(prefix="front")) + list(head.named_parameters(prefix="head"))


def assert_grads_close(got: dict, ref: dict, tol: float, what: str) -> None:
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, (
        f"{what}: gradient of {worst}: relative error {errs[worst]:.2e} > {tol:.2e}")


def tiles() -> int:
    return plan(build("cpu")[0], (BATCH, 3, SIZE, SIZE), TILE).num_tiles


# ---------------------------------------------------------------- the tests

@FORMATS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overlap", ["recompute", "reuse", "reuse/2"])
def test_streamed_amp_step_matches_conventional(device, dtype, overlap):
    """Output dtype, unscaled gradients within 2nu, the same scale growth after the step.
    (bfloat16 has float32's exponent range and needs no scaler; it is run with one to show
    the scaler's arithmetic is unchanged by streaming in both formats.)"""
    x, y = data(device)
    ref = Run(device, streamed=False, init_scale=2.0 ** 10).step(x, y, dtype)
    got = Run(device, streamed=True, overlap=overlap, init_scale=2.0 ** 10).step(x, y, dtype)
    assert got["features"] == ref["features"] == dtype
    # scaled gradients 16x below overflow: no found-inf decision is near its threshold
    assert max(ref["scaled_max"], got["scaled_max"]) < torch.finfo(dtype).max / 16
    assert_grads_close(got["grads"], ref["grads"], tolerance(dtype), f"{device} {dtype}")
    assert got["new_scale"] == ref["new_scale"] == 2.0 ** 11  # no inf found: the scale grew


@FORMATS
@pytest.mark.parametrize("device", DEVICES)
def test_backward_recomputation_replays_the_forwards_autocast(device, dtype):
    """Backward called outside autocast: every tile's recomputation still runs in ``dtype``."""
    run = Run(device, streamed=True, init_scale=2.0 ** 10)
    run.step(*data(device), dtype)
    per_pass = tiles() * len(run.calls.convs)
    for grad_enabled, what in ((False, "forward"), (True, "backward's recomputation")):
        seen = run.calls.dtypes(grad_enabled)
        assert seen == [dtype] * per_pass, (
            f"the {what} ran {len(seen)} convolutions in {sorted(set(map(str, seen)))}; "
            f"expected {per_pass} in {dtype}")


@FORMATS
@pytest.mark.parametrize("device", DEVICES)
def test_float32_forward_recomputes_in_float32_inside_autocast(device, dtype):
    """The converse: a forward outside autocast, its backward called inside an autocast
    region, recomputes in float32 and gives float32 conventional gradients (1e-4)."""
    grads = {}
    for streamed in (False, True):
        front, head = build(device)
        calls = Calls(front)
        model = nn.Sequential(Streaming(front, TILE) if streamed else front, head)
        x, y = data(device)
        loss = F.cross_entropy(model(x), y)
        with torch.autocast(device, dtype=dtype):
            loss.backward()
        grads[streamed] = {n: p.grad for n, p in named(front, head)}
    seen = calls.dtypes(grad_enabled=True)
    assert seen == [torch.float32] * tiles() * len(calls.convs), (
        f"the recomputation ran in {sorted(set(map(str, seen)))}, not the forward's float32")
    assert_grads_close(grads[True], grads[False], F32, f"{device} float32 forward")


@pytest.mark.parametrize("device", DEVICES)
def test_float16_overflow_skips_the_step_alike_then_both_recover(device):
    """Step 1 with a scale of 2^40: every scaled gradient overflows float16 (already at the
    head, far beyond the threshold), in both runs; both skip the step and back off to 2^10.
    Step 2 is taken by both, with gradients within 2nu and the same scale growth."""
    runs = [Run(device, streamed=s, init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)
            for s in (False, True)]
    before = [r.params() for r in runs]
    first = [r.step(*data(device, 1), torch.float16) for r in runs]
    for r, b, f in zip(runs, before, first):
        assert not any(torch.isfinite(g).all() for g in f["grads"].values()), "all overflowed"
        assert all(torch.equal(p, b[n]) for n, p in r.params().items()), "step skipped"
        assert f["new_scale"] == 2.0 ** 10
    ref, got = (r.step(*data(device, 2), torch.float16) for r in runs)
    assert_grads_close(got["grads"], ref["grads"], tolerance(torch.float16), f"{device} step 2")
    assert got["new_scale"] == ref["new_scale"] == 2.0 ** 11
    for r, b in zip(runs, before):
        assert all(not torch.equal(p, b[n]) for n, p in r.params().items()), "step taken"


@pytest.mark.parametrize("device", DEVICES)
def test_float16_weight_gradient_overflows_later_when_streamed(device):
    """Known difference, at the overflow threshold only. Under autocast a convolution's
    weight gradient is computed in float16 and cast up; conventionally it is one
    whole-image sum, rounded to float16 once; streamed, each tile's part is rounded to
    float16 and the parts are summed in float32. A 1-channel conv's bias gradient under
    ``loss = sum(output)`` is the pixel count, 64*64 = 4096; scaled by 32 it is 131072 >
    65504, float16's largest value, while each 18 px tile's part (at most 17*17*32 = 9248)
    is not: the conventional step finds an inf and is skipped, the streamed one is taken
    with the exact gradient. Away from the threshold both scalers decide alike (the tests above)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1).to(device)
    x = torch.randn(1, 1, 64, 64).to(device)
    outcomes = []
    for model in (conv, Streaming(conv, 18)):
        conv.zero_grad()
        bias = conv.bias.detach().clone()
        opt = torch.optim.SGD(conv.parameters(), lr=LR)
        scaler = torch.amp.GradScaler(device, init_scale=32.0)
        with torch.autocast(device, dtype=torch.float16):
            loss = model(x).float().sum()
        scaler.scale(loss).backward()
        scaled = conv.bias.grad.item()
        scaler.step(opt)
        scaler.update()
        outcomes.append((scaled, not torch.equal(conv.bias, bias), scaler.get_scale()))
    assert outcomes[0] == (float("inf"), False, 16.0)   # conventional: overflow, skipped
    assert outcomes[1] == (131072.0, True, 32.0)        # streamed: exact, step taken
