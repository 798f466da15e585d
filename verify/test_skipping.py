"""Tiles whose owned output gradient is exactly zero are not recomputed (streamcnn.skipping).

Oracles: conventional autograd on the whole image (``testing.compare``, every entry path) and
the same streamed step without skipping (``skip_zero_gradients=False``). Float64, 1e-10
relative: a skipped tile's contributions are exact zeros, the others' sums are the same
sums in another order. Where conventional backprop gives NaN (0 × inf), streaming must too:
the NaN pattern is compared exactly.
"""

import pytest
import torch
import torch.nn as nn

from streamcnn import Streaming
from streamcnn.testing import ALL_PATHS, compare, rel_err

F64 = 1e-10


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.GELU()).double()


def step(module, x, grad_out=None, head="max", **kwargs):
    """Output gradient, input gradient, parameter gradients and the backward's stats."""
    for p in module.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    streamed = Streaming(module, 20, **kwargs)
    y = streamed(x)
    if grad_out is not None:
        y.backward(grad_out)
    else:
        (y.amax((2, 3)) if head == "max" else y).sum().backward()
    return x.grad, [p.grad for p in module.parameters()], streamed.last_stats.backward


def assert_same(got, want):
    (gx, gp, _), (wx, wp, _) = got, want
    assert rel_err(gx, wx) <= F64
    for a, b in zip(gp, wp):
        assert rel_err(a, b) <= F64


def test_a_max_head_skips_most_tiles_and_gives_the_same_gradients():
    module, x = net(), rand(1, 3, 64, 64)
    skipped = step(module, x)
    full = step(module, x, skip_zero_gradients=False)
    assert skipped[2].skipped >= skipped[2].tiles - 8 and full[2].skipped == 0
    assert skipped[2].computed + skipped[2].skipped == skipped[2].tiles
    assert_same(skipped, full)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_output_gradients_on_every_entry_path(seed):
    """A masked head: random patches of a random output gradient, the rest exactly zero."""
    module, x = net(seed), rand(2, 3, 61, 57, seed=seed)
    out = Streaming(module, 20)(x)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.zeros_like(out)
    for _ in range(1 + seed):
        i, j = (int(torch.randint(0, s - 3, (), generator=gen)) for s in out.shape[2:])
        grad[..., i:i + 3, j:j + 3] = torch.randn(grad[..., i:i + 3, j:j + 3].shape, generator=gen,
                                                  dtype=torch.float64)
    cmp = compare(module, x, 20, grad_out=grad, paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp


def test_a_zero_output_gradient_still_gives_gradients_not_none():
    """Conventionally every gradient is then zeros, not None: one tile is always computed."""
    module, x = net(), rand(1, 3, 64, 64)
    y = Streaming(module, 20)(x)
    cmp = compare(module, x, 20, grad_out=torch.zeros_like(y), paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp  # (its "sum" paths have a gradient of ones)
    gx, gp, stats = step(module, x, grad_out=torch.zeros_like(y))
    assert stats.computed == 1 and gx is not None and not gx.any()
    assert all(g is not None and not g.any() for g in gp)


class _Overflow(nn.Module):
    """exp then a clamp: an infinite value inside the tile, a finite output, and a NaN
    gradient conventionally wherever the exp overflowed (0 × inf), whatever the output
    gradient there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.exp(self.conv(x)).clamp(max=2.0)


def assert_same_with_nans(got, want):
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        assert torch.equal(a.isnan(), b.isnan())
        assert rel_err(a.nan_to_num(), b.nan_to_num()) <= F64


def test_a_tile_that_computed_an_infinite_value_is_recomputed():
    module = _Overflow().double()
    x = rand(1, 3, 64, 64)
    x[..., 50:52, 50:52] = 1e4  # exp overflows in the last tiles only
    grad = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    grad[..., 5:8, 5:8] = 1.0  # (gradient in the first tile only)
    gx, gp, stats = step(module, x, grad_out=grad)
    want = step(module, x, grad_out=grad, skip_zero_gradients=False)
    x_ref = x.clone().requires_grad_()
    module.zero_grad()
    module(x_ref).backward(grad)
    assert x_ref.grad.isnan().any(), "test bug: no NaN conventionally"
    assert_same_with_nans((gx, gp), (x_ref.grad, [p.grad for p in module.parameters()]))
    assert_same_with_nans((gx, gp), want[:2])
    assert 0 < stats.skipped < stats.tiles - 1  # the overflowing tiles were kept


class _Sqrt(nn.Module):
    """sqrt of a channel scaled by 0: a finite 0 whose derivative is infinite (0 × inf =
    NaN reaches the convolution's gradients conventionally)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("scale", torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1))

    def forward(self, x):
        return torch.sqrt(self.conv(x).square() * self.scale)


def test_an_operation_with_an_unbounded_derivative_turns_skipping_off():
    module, x = _Sqrt().double(), rand(1, 3, 64, 64)
    grad = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    grad[..., 5:8, 5:8] = 1.0  # (gradient in the first tile only)
    gx, gp, stats = step(module, x, grad_out=grad)
    assert stats.skipped == 0
    x_ref = x.clone().requires_grad_()
    module.zero_grad()
    module(x_ref).backward(grad)
    assert x_ref.grad.isnan().all(), "test bug: not NaN everywhere conventionally"
    assert_same_with_nans((gx, gp), (x_ref.grad, [p.grad for p in module.parameters()]))


def test_a_non_finite_parameter_turns_skipping_off():
    module, x = net(), rand(1, 3, 64, 64)
    with torch.no_grad():
        module[3].bias[0] = float("inf")
    assert step(module, x)[2].skipped == 0


def test_training_mode_normalisation_turns_skipping_off():
    """Its backward adds whole-map terms at every position a tile owns."""
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                           nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).double().train()
    x = rand(2, 3, 64, 64)
    assert step(module, x)[2].skipped == 0
    cmp = compare(module, x, 20, paths=ALL_PATHS[:1])
    assert cmp.worst <= F64


def test_skipping_and_dedup_together():
    """A constant image with an island: shared tiles, a max head, the same gradients."""
    module, x = net(), torch.zeros(1, 3, 96, 96, dtype=torch.float64)
    x[..., 40:50, 40:50] = rand(1, 3, 10, 10)
    both = step(module, x)
    neither = step(module, x, dedup=False, skip_zero_gradients=False)
    assert both[2].skipped > 0 and both[2].computed < neither[2].computed
    assert_same(both, neither)
