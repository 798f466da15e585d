"""BatchNorm in training mode, GroupNorm and InstanceNorm inside the streamed part, against
conventional training of the same module in training mode (the oracle: torch itself).

Float64, 1e-10 relative: the statistics are the same sums (merged per tile by Chan's
formula), the whole-map terms of the input gradient the same sums split over tiles, all in
another order. Every step compares the output, the input gradient, every parameter gradient
and every buffer (running statistics, ``num_batches_tracked``) after the step, over several
optimiser steps. Convolutions right before a normalisation have no bias (as in ResNet): its
gradient is zero in exact arithmetic, so only rounding noise would be compared. The loss is
a random projection of the output, as elsewhere in verify/.
"""

import copy

import models
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from test_streaming_properties import SETTINGS

import streamcnn
from bench.models import BasicBlock, Bottleneck, resnet_front
from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, compare, rel_err

F64 = 1e-10


def rand(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def affine_at_random(net: nn.Module, seed: int = 0) -> nn.Module:
    """Normalisation weights from [0.5, 1.5] and biases from [-0.5, 0.5] (torch starts them
    at 1 and 0, which would hide a weight applied twice or a bias lost)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return net


def train(net, images, stream, tile, lr=0.02):
    """Each step's output, input gradient, parameter gradients and buffers afterwards. (A
    learning rate small enough that no ReLU channel dies: a dead channel leaves a weight
    gradient of a few tiny terms, each the result of (N1)'s cancellations, whose relative
    rounding error 1e-10 does not bound, conventionally or streamed.)"""
    model = Streaming(net, tile) if stream else net
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    record = []
    for k, x in enumerate(images):
        xi = x.clone().requires_grad_()
        y = model(xi)
        loss = (y * rand(*y.shape, seed=100 + k)).sum()
        opt.zero_grad()
        loss.backward()
        record.append((y.detach(), xi.grad, [p.grad.clone() for p in net.parameters()],
                       [b.clone() for b in net.buffers()]))
        opt.step()
    return record, [p.detach().clone() for p in net.parameters()]


def assert_trains_alike(build, shape, extra, steps=3, seed=0):
    """Streamed and conventional training alike, tiles ``extra`` pixels above the minimum."""
    torch.manual_seed(seed)
    net = affine_at_random(build().double().train(), seed)
    tile = tuple(r.min_tile_size + extra for r in streamcnn.receptive_field(net, len(shape) - 2))
    ref = copy.deepcopy(net)
    assert streamcnn.plan(net, shape, tile).num_tiles > 1, "test bug: a single tile"
    images = [rand(*shape, seed=s) * (1 + s) + s for s in range(steps)]
    got, params = train(net, images, True, tile)
    want, ref_params = train(ref, images, False, tile)
    for k, ((y, gx, g, b), (y0, gx0, g0, b0)) in enumerate(zip(got, want)):
        assert rel_err(y, y0) <= F64, f"step {k}: output"
        assert rel_err(gx, gx0) <= F64, f"step {k}: input gradient"
        for i, (a, a0) in enumerate(zip(g, g0)):
            assert rel_err(a, a0) <= F64, f"step {k}: gradient of parameter {i}"
        for i, (a, a0) in enumerate(zip(b, b0)):
            assert rel_err(a.double(), a0.double()) <= F64, f"step {k}: buffer {i}"
    for p, p0 in zip(params, ref_params):
        assert rel_err(p, p0) <= F64


def chain():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 5, 3, bias=False),
                         nn.BatchNorm2d(5, momentum=None), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(5, 3, 3, padding=1))


def block(kind):
    def build():
        planes = 4 if kind is BasicBlock else 2
        out = planes * kind.expansion
        b = kind(6, planes, stride=2, downsample=nn.Sequential(
            nn.Conv2d(6, out, 1, 2, bias=False), nn.BatchNorm2d(out)))
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                             nn.ReLU(), b)
    return build


def group_and_instance():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.GroupNorm(3, 6), nn.SiLU(),
                         nn.Conv2d(6, 4, 3, stride=2, bias=False), nn.InstanceNorm2d(4, affine=True),
                         nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                         nn.InstanceNorm2d(4, track_running_stats=True), nn.Conv2d(4, 2, 1))


def no_running_stats():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False),
                         nn.Conv2d(4, 2, 3))


def one_d():
    return nn.Sequential(nn.Conv1d(2, 4, 5, padding=2, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.MaxPool1d(3, 2), nn.Conv1d(4, 4, 3, bias=False), nn.GroupNorm(2, 4),
                         nn.ReLU(), nn.Conv1d(4, 3, 3, bias=False), nn.InstanceNorm1d(3, affine=True), nn.Conv1d(3, 2, 1))


NETWORKS = {  # network, input shape, tile pixels above the minimum
    "chain of convolutions, pools and BatchNorm": (chain, (2, 3, 57, 61), 7),
    "ResNet BasicBlock with downsample": (block(BasicBlock), (2, 3, 41, 39), 5),
    "ResNet Bottleneck with downsample": (block(Bottleneck), (2, 3, 41, 39), 5),
    "DenseNet-style concat blocks": (lambda: models.densenet_front(drop_rate=0.0), (2, 3, 101, 93), 6),
    "GroupNorm and InstanceNorm": (group_and_instance, (2, 3, 39, 35), 4),
    "BatchNorm without running statistics or affine": (no_running_stats, (3, 3, 33, 29), 3),
    "1D BatchNorm, GroupNorm, InstanceNorm": (one_d, (2, 2, 97), 9),
    "1D ResNet stack": (models.resnet1d_stack, (2, 2, 301), 11),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_training_steps_equal_conventional(name):
    assert_trains_alike(*NETWORKS[name])


@pytest.mark.parametrize("name", ["chain of convolutions, pools and BatchNorm", "GroupNorm and InstanceNorm"])
def test_minimum_tile(name):
    build, shape, _ = NETWORKS[name]
    assert_trains_alike(build, shape, 0, steps=1)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
def test_every_entry_path():
    """Leaf or not, backward or autograd.grad of a subset, sum or random loss."""
    torch.manual_seed(0)
    net = affine_at_random(block(BasicBlock)().double().train())
    cmp = compare(net, rand(2, 3, 41, 39), 20, paths=ALL_PATHS)
    assert cmp.worst <= F64, cmp


def test_no_grad_forward_updates_the_running_statistics_once():
    torch.manual_seed(0)
    net = chain().double().train()
    ref = copy.deepcopy(net)
    x = rand(2, 3, 37, 41)
    with torch.no_grad():
        y, y0 = Streaming(net, 25)(x), ref(x)
    assert rel_err(y, y0) <= F64
    for b, b0 in zip(net.buffers(), ref.buffers()):
        assert rel_err(b.double(), b0.double()) <= F64
    assert net[1].num_batches_tracked.item() == 1


def test_resnet_front_in_training_mode():
    """The prostate paper's geometry (narrow), every BatchNorm in training mode: 16 of them."""
    build = lambda: resnet_front((1, 1), width=4, through="layer2")  # noqa: E731
    assert_trains_alike(build, (1, 3, 131, 117), 9, steps=2)


def test_plan_says_what_training_mode_normalisation_costs():
    torch.manual_seed(0)
    net = block(BasicBlock)().train()
    p = streamcnn.plan(net, (1, 3, 64, 64), 32)
    assert (p.norms, p.norm_levels) == (4, 3)
    assert (p.forward_passes, p.backward_passes) == (4, 4)
    text = str(p)
    assert ("4 normalisations with whole-image statistics (BatchNorm in training mode, GroupNorm, "
            "InstanceNorm) in 3 levels: 4 forward and 4 backward passes") in text
    assert "up to 4.0× the time of a step with frozen statistics" in text
    assert "freeze" not in text
    deep = streamcnn.plan(resnet_front(width=8).train(), (1, 3, 1024, 1024), 600, checkpoints=False)
    assert (deep.norms, deep.norm_levels) == (29, 27)
    assert "freeze" in str(deep) and deep.checkpoint_time_factor is None
    stored = streamcnn.plan(resnet_front(width=8).train(), (1, 3, 1024, 1024), 600)
    assert "with level checkpoints" in str(stored) and "freeze" not in str(stored)
    assert stored.checkpoint_time_factor < 2.5 and stored.checkpoint_bytes > 0
    assert streamcnn.plan(net.eval(), (1, 3, 64, 64), 32).norms == 0


def test_sync_batchnorm_in_training_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4))
    with pytest.raises(StreamingError, match=r"layer '1' \(SyncBatchNorm\) cannot be streamed: "
                                             r"SyncBatchNorm in training mode"):
        Streaming(net, 16)(torch.randn(1, 3, 40, 40))


def test_float32_is_as_accurate_as_conventional_float32():
    """Streaming's float32 error against float64 within 4x conventional float32's own (see
    test_graph_float32 for why not a fixed tolerance)."""
    torch.manual_seed(0)
    net32 = affine_at_random(block(BasicBlock)().train())
    net64 = copy.deepcopy(net32).double()
    x = rand(2, 3, 81, 77, dtype=torch.float32)
    g = rand(2, 4, 41, 39, seed=5, dtype=torch.float32)

    def run(model, net, xx, gg):
        xi = xx.clone().requires_grad_()
        y = model(xi)
        y.backward(gg)
        out = [y.detach().double(), xi.grad.double()] + [p.grad.double() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return out

    truth = run(net64, net64, x.double(), g.double())
    twin = copy.deepcopy(net32)
    conventional = run(twin, twin, x, g)
    streamed = run(Streaming(net32, 30), net32, x, g)
    eps = torch.finfo(torch.float32).eps
    for k, (s, c, t) in enumerate(zip(streamed, conventional, truth)):
        assert rel_err(s, t) <= 4 * max(rel_err(c, t), eps), k


# ---------------------------------------------------------------- random graphs

class _Branches(nn.Module):
    def __init__(self, a, b, how):
        super().__init__()
        self.a, self.b, self.how = a, b, how

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) if self.how == "cat" else self.a(x) + self.b(x)


NORMS = {
    "bn": lambda c: nn.BatchNorm2d(c), "bn-no-stats": lambda c: nn.BatchNorm2d(c, track_running_stats=False),
    "gn": lambda c: nn.GroupNorm(2 if c % 2 == 0 else 1, c), "in": lambda c: nn.InstanceNorm2d(c, affine=True),
    "none": lambda c: nn.Identity(),
}


@st.composite
def branchy(draw):
    """A stem, then one or two blocks of two branches (added or concatenated), each branch a
    conv (kernel, stride 1 or a strided pair) with a random normalisation or none."""
    c = 4
    layers = [nn.Conv2d(3, c, 3, padding=1, bias=False), NORMS[draw(st.sampled_from(sorted(NORMS)))](c),
              nn.ReLU()]  # (a norm's bias reaching the next norm through convolutions alone has
    # no gradient in exact arithmetic: rounding noise, nothing to compare)
    for _ in range(draw(st.integers(1, 2))):
        stride = draw(st.sampled_from([1, 2]))
        def branch():
            k = draw(st.sampled_from([1, 3]))
            return nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, bias=False),
                                 NORMS[draw(st.sampled_from(sorted(NORMS)))](c), nn.ReLU())
        how = draw(st.sampled_from(["add", "cat"]))
        layers.append(_Branches(branch(), branch(), how))
        if how == "cat":
            layers += [nn.Conv2d(2 * c, c, 1, bias=False)]
    layers.append(nn.Conv2d(c, 2, 3))
    size = (draw(st.integers(30, 48)), draw(st.integers(30, 48)))
    return nn.Sequential(*layers), size, draw(st.integers(0, 12)), draw(st.sampled_from(ALL_PATHS))


@settings(max_examples=25, **SETTINGS)
@given(branchy())
def test_random_graphs_with_normalisations_on_random_branches(case):
    net, size, extra, path = case
    torch.manual_seed(0)
    net = affine_at_random(net.double().train())
    tile = tuple(r.min_tile_size + extra for r in streamcnn.receptive_field(net, 2))
    cmp = compare(net, rand(2, 3, *size), tile, paths=path)
    assert cmp.worst <= F64, cmp


def test_readme_shows_this_plan():
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    torch.manual_seed(0)
    text = str(streamcnn.plan(block(BasicBlock)().train(), (1, 3, 64, 64), 32))
    lines = text.splitlines()[-3:]
    assert "\n".join(lines) in readme
