"""Reused overlaps (``Streaming(..., overlap="reuse")``, :mod:`streamcnn.strips`): each tile
computes every map only where no earlier tile did, reads the rest from strips, and in the
backward (tiles in reverse) leaves the gradient of what it read in gradient strips.

Oracles: conventional autograd on the whole input (``streamcnn.testing.compare``: output,
input gradient, every parameter gradient, a gradient on one side only failing) and overlap
recomputation (the default path, itself proven against autograd), both in float64 at 1e-10
relative: the same sums in another order (per-tile partial sums, crops of other sizes
picking other kernels), ~1e-16 per operation grown by the sums' lengths. Counting: the
blocks each pass computed (``last_stats.blocks``) are disjoint and cover every map, so each
position is computed once in the forward and once in the backward's recomputation.

Networks: the faithful copies of torchvision's ResNet (BasicBlock, Bottleneck, ResNet-34
and -50 through layer3), DenseNet, MobileNetV2, VGG and ConvNeXt blocks and a 1D ResNet
(``test_graph_models.CASES``, odd sizes, batch 2, tiles from the minimum), chains, random
DAGs (``test_graph_properties``), a uint8 array with a transform; every entry path in
``test_entry_paths``, AMP in ``test_mixed_precision``, DDP in ``test_ddp`` (both ways).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import models
import streamcnn
from streamcnn import ImageArray, Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, compare, rel_err
from test_graph_models import CASES, frozen, rand

F64 = 1e-10


def tile_of(net, case, extra):
    ndim = len(case.shape) - 2
    tile = tuple(rf.min_tile_size + e for rf, e in zip(streamcnn.receptive_field(net, ndim), extra))
    return tile[0] if ndim == 1 else tile


def _params():
    return [pytest.param(n, e, id=f"{n}-min+{'x'.join(map(str, e))}")
            for n in sorted(CASES) for e in CASES[n].extras]


@pytest.mark.parametrize("name,extra", _params())
def test_graph_models_match_conventional(name, extra):
    case = CASES[name]
    net = frozen(case)
    tile = tile_of(net, case, extra)
    assert streamcnn.plan(net, case.shape, tile).num_tiles > 1, "test bug: a single tile"
    cmp = compare(net, rand(*case.shape), tile, overlap="reuse")
    assert cmp.worst <= F64, cmp


@pytest.mark.parametrize("name", ["basic_block_stride2_downsample", "resnet1d_stack"])
def test_every_entry_path(name):
    case = CASES[name]
    net = frozen(case)
    cmp = compare(net, rand(*case.shape), tile_of(net, case, case.extras[-1]), paths=ALL_PATHS,
                  overlap="reuse")
    assert cmp.worst <= F64, cmp


def step(streamed: Streaming, x: torch.Tensor, seed: int = 5):
    """Output, input gradient and parameter gradients for a seeded random output gradient."""
    streamed.module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = streamed(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return y.detach(), x.grad, {n: p.grad for n, p in streamed.module.named_parameters()}


def assert_same_step(got, ref, tol=F64):
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = got, ref
    assert rel_err(y, y_ref) <= tol and rel_err(gx, gx_ref) <= tol
    assert gp.keys() == gp_ref.keys()
    for n in gp_ref:
        assert (gp[n] is None) == (gp_ref[n] is None), n
        assert gp[n] is None or rel_err(gp[n], gp_ref[n]) <= tol, n


@pytest.mark.parametrize("name", ["mobilenet_v2_inverted_residuals", "densenet_blocks_and_transition",
                                  "convnext_stages", "resnet1d_stack"])
def test_reuse_equals_recomputation(name):
    case = CASES[name]
    net = frozen(case)
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape)
    assert_same_step(step(Streaming(net, tile, overlap="reuse"), x),
                     step(Streaming(net, tile), x))


def _mask(shape, blocks):
    """How often each position lies in one of ``blocks``."""
    counts = torch.zeros(shape, dtype=torch.int32)
    for block in blocks:
        counts[tuple(slice(a, b) for a, b in block)] += 1
    return counts


@pytest.mark.parametrize("name", ["resnet34_front_through_layer3", "mobilenet_v2_inverted_residuals",
                                  "resnet1d_stack"])
def test_each_position_is_computed_once_per_pass(name):
    case = CASES[name]
    net = frozen(case)
    tile = tile_of(net, case, case.extras[0])
    streamed = Streaming(net, tile, overlap="reuse")
    step(streamed, rand(*case.shape))
    blocks = streamed.last_stats.blocks
    p = streamcnn.plan(net, case.shape, tile)
    assert p.num_tiles > 2
    recomputed = 0
    for s, found in blocks["forward"].items():
        assert sorted(found) == sorted(blocks["backward"][s]), f"step {s}: the passes differ"
        counts = _mask(p.steps[s].shape[2:], found)
        assert counts.max() == 1, f"{p.steps[s].name}: a position computed twice"
        # every position between the first and the last one computed is computed: the tiles
        # leave no gap (positions left out lie at the map's edges, needed by no output)
        inside = counts[tuple(slice(min(b[a][0] for b in found), max(b[a][1] for b in found))
                              for a in range(len(found[0])))]
        assert inside.min() == 1, f"{p.steps[s].name}: a position between computed ones is not"
        recomputed += len(found) > 1
    assert recomputed > len(blocks["forward"]) / 2, "test bug: few steps need several tiles"
    assert _mask(p.output_shape[2:], blocks["forward"][len(p.steps) - 1]).min() == 1


def test_plan_counts_the_strips_stored():
    case = CASES["basic_block_stride2_downsample"]
    net = frozen(case)
    tile = tile_of(net, case, case.extras[-1])
    streamed = Streaming(net, tile, overlap="reuse")
    step(streamed, rand(*case.shape))
    p = streamed.plan(case.shape)
    assert p.overlap_mode == "reuse" and p.strip_bytes == streamed.last_stats.strip_bytes > 0
    assert p.reuse_factor <= 1.0 < p.recompute_factor
    assert p.recommended_overlap == "reuse" and "overlap='reuse'" in str(p)


def normalise(t):
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    return (t.double() / 255 - mean) / 0.25


def test_uint8_array_with_a_transform():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                        nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1)).double()
    img = np.random.default_rng(0).integers(0, 256, (2, 75, 61, 3), dtype=np.uint8)
    got = Streaming(net, 23, transform=normalise, overlap="reuse")(ImageArray(img, "NHWC"))
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=got.dtype)
    got.backward(g)
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = net(normalise(torch.from_numpy(img).permute(0, 3, 1, 2)))
    ref.backward(g)
    assert rel_err(got, ref) <= F64
    assert all(rel_err(a, p.grad) <= F64 for a, p in zip(grads, net.parameters()))


def test_inside_torch_utils_checkpoint():
    case = CASES["basic_block_identity"]
    net = frozen(case)
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape)
    streamed = Streaming(net, tile, overlap="reuse")
    xs = x.clone().requires_grad_()
    checkpoint.checkpoint(streamed, xs, use_reentrant=False).pow(2).sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    xr = x.clone().requires_grad_()
    net(xr).pow(2).sum().backward()
    assert rel_err(xs.grad, xr.grad) <= F64
    assert all(rel_err(a, p.grad) <= F64 for a, p in zip(got, net.parameters()))


def test_float32_is_as_close_as_recomputation():
    """float32 against float64 autograd: within 4x of recomputation's own error (both are
    float32 sums in another order than the reference's)."""
    case = CASES["mobilenet_v2_inverted_residuals"]
    net = frozen(case)
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape)
    exact = step(Streaming(net, tile), x)
    net32 = frozen(case).float()
    errs = {}
    for overlap in ("recompute", "reuse"):
        y, gx, gp = step(Streaming(net32, tile, overlap=overlap), x.float())
        errs[overlap] = max([rel_err(y.double(), exact[0]), rel_err(gx.double(), exact[1])]
                            + [rel_err(gp[n].double(), exact[2][n]) for n in gp])
    assert errs["reuse"] <= max(4 * errs["recompute"], 1e-6), errs


def test_identical_tiles_are_all_computed():
    """dedup (on by default) does not apply: every tile runs, in order, and the result is
    still conventional backprop's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).double()
    x = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    x[..., 40:50, 10:20] = 1.0
    streamed = Streaming(net, 24, overlap="reuse")
    assert_same_step(step(streamed, x), step(Streaming(net, 24, dedup=False), x))
    assert streamed.last_stats.forward.computed == streamed.last_stats.forward.tiles


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2)


class TwoMaps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.a(x)
        return y, self.b(y)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.block.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return self.block(x)


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        a, b = torch.split(self.conv(x), 2, dim=1)
        return a * b


REFUSED = {
    "batchnorm in training mode": (lambda: nn.Sequential(  # (a bias before it: no gradient)
        nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3)),
        "reduces over space"),
    "upsampling": (Upsampling, "upsample step"),
    "several output maps": (TwoMaps, "several feature maps"),
    "a hook on a traced module": (Hooked, "forward hooks"),
    "a tuple of maps": (Split, "without it being a map itself"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_reuse_is_refused_and_auto_recomputes(name):
    build, message = REFUSED[name]
    torch.manual_seed(0)
    net = build().double()
    x = rand(1, 3, 40, 36)
    with pytest.raises(StreamingError, match=message):
        Streaming(net, 24, overlap="reuse")(x)
    assert streamcnn.plan(net, x.shape, 24).reuse_refusal is not None
    cmp = compare(net, x, 24, overlap="auto")
    assert cmp.worst <= F64, cmp


def test_auto_reuses_where_it_can():
    torch.manual_seed(0)
    net = models.vgg_front().double().eval()
    streamed = Streaming(net, 80, overlap="auto")
    step(streamed, rand(1, 3, 107, 99))
    assert streamed.last_stats.blocks["forward"]


def test_pixel_loss_recomputes():
    """``pixel_loss`` runs each tile's backward right after its forward: ``"auto"`` takes it as
    ``"recompute"`` (conventional's numbers), ``"reuse"`` is refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    x, target = rand(1, 3, 48, 40), rand(1, 2, 48, 40, seed=2)
    per_pixel = functools.partial(F.mse_loss, reduction="none")
    loss = Streaming(net, 24, overlap="auto").pixel_loss(x, target, per_pixel)
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    F.mse_loss(net(x), target).backward()
    assert all(rel_err(a, p.grad) <= F64 for a, p in zip(got, net.parameters()))
    with pytest.raises(StreamingError, match="pixel_loss"):
        Streaming(net, 24, overlap="reuse").pixel_loss(x, target, per_pixel)


def test_bad_overlap_value():
    with pytest.raises(ValueError, match="overlap must be one of"):
        Streaming(nn.Conv2d(1, 1, 3), 16, overlap="share")


# ---------------------------------------------------------------- strips at chosen steps


def _budget(net, case, tile, share: float) -> int:
    return int(share * streamcnn.plan(net, case.shape, tile, overlap="reuse").strip_bytes)


@pytest.mark.parametrize("share", [0.5, 0.125, 0.0])
@pytest.mark.parametrize("name", ["basic_block_stride2_downsample", "mobilenet_v2_inverted_residuals",
                                  "densenet_blocks_and_transition", "resnet1d_stack"])
def test_strips_at_chosen_steps_only(name, share):
    """Under ``strip_budget`` the steps nearest the input recompute their overlap: the strips
    fit the budget (as plan() counts them), each position of a step keeping strips is still
    computed once per pass, some step computes positions twice (the test is not vacuous),
    and the step equals conventional autograd's and overlap recomputation's (float64, 1e-10:
    the same sums in other orders)."""
    case = CASES[name]
    net = frozen(case)
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape)
    budget = _budget(net, case, tile, share)
    streamed = Streaming(net, tile, overlap="reuse", strip_budget=budget)
    got = step(streamed, x)
    p = streamed.plan(case.shape)
    assert p.strip_bytes == streamed.last_stats.strip_bytes <= budget
    assert p.strip_budget == budget and len(p.strip_steps) < len(p.steps) - 1
    twice = 0
    for s, found in streamed.last_stats.blocks["forward"].items():
        counts = _mask(p.steps[s].shape[2:], found)
        if s in p.strip_steps:
            assert counts.max() == 1, f"{p.steps[s].name}: keeps strips but computed a position twice"
        twice += int(counts.max() > 1)
    assert twice, "test bug: no step recomputes its overlap"
    assert_same_step(got, step(Streaming(net, tile), x))
    cmp = compare(net, x, tile, overlap="reuse", strip_budget=budget)
    assert cmp.worst <= F64, cmp


def test_strip_budget_along_every_entry_path():
    case = CASES["basic_block_stride2_downsample"]
    net = frozen(case)
    tile = tile_of(net, case, case.extras[-1])
    cmp = compare(net, rand(*case.shape), tile, paths=ALL_PATHS, overlap="reuse",
                  strip_budget=_budget(net, case, tile, 0.3))
    assert cmp.worst <= F64, cmp


def test_plan_lists_the_strip_budgets():
    """plan() gives, per budget, the strips' bytes and the positions computed per pass: the
    bytes fall and the work grows as the budget shrinks, from every step keeping strips
    (each position once) to none (the overlap recomputed wherever a tile needs it, at most
    what recomputing computes: a recomputing tile computes all its input reaches)."""
    case = CASES["resnet34_front_through_layer3"]
    net = frozen(case)
    tile = tile_of(net, case, case.extras[0])
    p = streamcnn.plan(net, case.shape, tile, overlap="reuse")
    choices = p.strip_choices
    assert choices[0].budget is None and choices[0].strip_bytes == p.strip_bytes > 0
    assert choices[-1].budget == 0 and choices[-1].strip_bytes == 0 and choices[-1].steps < choices[0].steps
    for a, b in zip(choices, choices[1:]):
        assert b.strip_bytes <= a.strip_bytes and b.factor >= a.factor - 1e-12, (a, b)
        assert b.budget is None or b.strip_bytes <= b.budget
    assert choices[0].factor == pytest.approx(p.reuse_factor) and choices[-1].factor <= p.recompute_factor
    assert choices[-1].factor > choices[0].factor
    text = str(p)
    assert "strip_budget" in text and "computed per pass" in text
    half = streamcnn.plan(net, case.shape, tile, overlap="reuse", strip_budget=choices[1].budget)
    assert half.strip_bytes == choices[1].strip_bytes and half.reuse_factor == choices[1].factor
    assert half.streaming_peak_bytes < p.streaming_peak_bytes  # (the strips are in the peak)


def _bands_at(monkeypatch) -> set:
    """The devices the strips were stored on, in the runs after this call."""
    found: set = set()
    store = streamcnn.strips.Strips._store

    def recording(self, act, tile, block):
        store(self, act, tile, block)
        found.update(b.device.type for b in self.bands.values())
    monkeypatch.setattr(streamcnn.strips.Strips, "_store", recording)
    return found


def test_strips_in_host_memory(monkeypatch):
    """``strip_memory="host"``: the bands live in CPU memory. On a CPU module that is where
    they live anyway, so the step is the same bit for bit (the same operations)."""
    case = CASES["basic_block_stride2_downsample"]
    net = frozen(case)
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape)
    devices = _bands_at(monkeypatch)
    got = step(Streaming(net, tile, overlap="reuse", strip_memory="host"), x)
    assert devices == {"cpu"}
    assert_same_step(got, step(Streaming(net, tile, overlap="reuse"), x), tol=0)
    assert streamcnn.plan(net, case.shape, tile, overlap="reuse", strip_memory="host").host_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strips_in_host_memory_with_a_gpu_module(monkeypatch):
    """A GPU module's strips in host memory: bands on the CPU, each copied in when a tile
    reads it; the step equals the strips-on-the-GPU step and conventional autograd's."""
    case = CASES["basic_block_stride2_downsample"]
    net = frozen(case).cuda()
    tile, x = tile_of(net, case, case.extras[-1]), rand(*case.shape).cuda()
    devices = _bands_at(monkeypatch)
    got = step(Streaming(net, tile, overlap="reuse", strip_memory="host"), x)
    assert devices == {"cpu"}
    assert_same_step(got, step(Streaming(net, tile, overlap="reuse"), x))
    cmp = compare(net, x, tile, overlap="reuse", strip_memory="host", strip_budget=_budget(
        net, case, tile, 0.5))
    assert cmp.worst <= F64, cmp
    p = streamcnn.plan(net, case.shape, tile, overlap="reuse", strip_memory="host")
    assert p.host_bytes == 2 * p.strip_bytes > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"strip_budget": -1}, "strip_budget must be None"), ({"strip_budget": 1.5}, "strip_budget must be None"),
    ({"strip_budget": True}, "strip_budget must be None"), ({"strip_memory": "gpu"}, "strip_memory must be")])
def test_bad_strip_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Streaming(nn.Conv2d(1, 1, 3), 16, overlap="reuse", **kwargs)
    with pytest.raises(ValueError, match=message):
        streamcnn.plan(nn.Conv2d(1, 1, 3), (1, 1, 32, 32), 16, overlap="reuse", **kwargs)


@pytest.mark.parametrize("kwargs", [{"strip_budget": 0}, {"strip_memory": "host"}])
def test_strip_options_without_reuse_are_refused(kwargs):
    """Without reused overlaps no tile stores strips: a budget or place for them would be
    silently ignored. (plan() takes them with either overlap: it reports reuse under them.)"""
    with pytest.raises(ValueError, match="pass overlap='reuse'"):
        Streaming(nn.Conv2d(1, 1, 3), 16, **kwargs)
    p = streamcnn.plan(nn.Conv2d(1, 1, 3), (1, 1, 64, 64), 16, **kwargs)
    assert p.overlap_mode == "recompute" and p.strip_choices
