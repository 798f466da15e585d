"""Exact whole-image statistics by streaming, against oracles streamcnn did not write:
forward hooks on the conventional run (``channel_stats``), torch's own
``torch.optim.swa_utils.update_bn`` (``update_bn``), and hooks again after ``lsuv_``.

Float64, 1e-10 relative: the same sums, split over the tiles' owned parts and merged by
Chan's formula, in another order. The float32 test shows what the merge is for.
"""

import copy

import models
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import assert_rel
from torch.optim.swa_utils import update_bn as torch_update_bn

import streamcnn
from bench.models import resnet_front
from streamcnn import ImageArray, StreamingError

F64 = 1e-10


def rand(*shape, seed=1, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def hooked_stats(module, images, names):
    """The oracle: per-channel mean and biased variance of the named modules' outputs over
    every image, from forward hooks on the conventional run (every call of a module; copies,
    since a later layer may work in place)."""
    seen = {name: [] for name in names}
    handles = [(module.get_submodule(n) if n else module).register_forward_hook(
        lambda m, i, o, n=n: seen[n].append(o.detach().transpose(0, 1).reshape(o.shape[1], -1).clone()))
        for n in names]
    with torch.no_grad():
        for x in images:
            module(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v, dim=1) for n, v in seen.items()}


def assert_stats(got, values):
    assert got.count == values.shape[1]
    assert_rel(got.mean, values.mean(1), F64, "mean")
    assert_rel(got.var, values.var(1, unbiased=False), F64, "var")


class Residual(nn.Module):
    """A block with a strided shortcut, used twice in the network below (a shared module)."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down = nn.Conv2d(c, c, 1, stride=2)

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x)))) + self.down(x)


def graph_net():
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), shared, nn.ReLU(), shared, Residual(4),
                         nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 3, 3)).double().eval()


def test_channel_stats_equal_hooks_on_chains_graphs_and_shared_layers():
    net = graph_net()
    names = ["0", "1", "4", "4.a", "4.down", "5", ""]
    images = [rand(2, 3, 61, 47), rand(1, 3, 38, 53, seed=2)]
    for tile in (streamcnn.receptive_field(net, 2)[0].min_tile_size, 29):
        stats = streamcnn.channel_stats(net, images, tile, names)
        truth = hooked_stats(net, images, names)
        for name in names:
            assert_stats(stats[name], truth[name])
    assert stats["1"].count == 2 * (2 * 61 * 47 + 38 * 53)  # both calls of the shared conv


@pytest.mark.parametrize("build", [models.densenet_front, models.mobilenet_v2_front])
def test_channel_stats_on_concat_and_inverted_residual_graphs(build):
    net = models.frozen(build(), rand(4, 3, 48, 48, seed=9))
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][::3]
    x = rand(2, 3, 71, 66)
    tile = max(r.min_tile_size for r in streamcnn.receptive_field(net, 2)) + 5
    stats = streamcnn.channel_stats(net, x, tile, names)
    truth = hooked_stats(net, [x], names)
    for name in names:
        assert_stats(stats[name], truth[name])


def test_channel_stats_of_1d_maps_and_arrays():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.ReLU(), nn.MaxPool1d(3, 2),
                        nn.Conv1d(3, 2, 3)).double()
    x = rand(3, 2, 201)
    stats = streamcnn.channel_stats(net, [x, ImageArray(x.numpy(), "NCL")], 40, ["0", "3"])
    truth = hooked_stats(net, [x, x], ["0", "3"])
    for name in ("0", "3"):
        assert_stats(stats[name], truth[name])


def test_channel_stats_of_a_uint8_slide_with_a_transform():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).double()
    slide = np.random.default_rng(0).integers(0, 256, (57, 63, 3), dtype=np.uint8)
    stats = streamcnn.channel_stats(net, ImageArray(slide, "HWC"), 20, ["0", "2"],
                                    transform=lambda t: t.double() / 255)
    x = torch.from_numpy(slide).permute(2, 0, 1)[None].double() / 255
    truth = hooked_stats(net, [x], ["0", "2"])
    for name in ("0", "2"):
        assert_stats(stats[name], truth[name])


def test_float32_statistics_of_a_large_image_are_accurate():
    """The point of Chan's merge: a 4096x4096 float32 map whose mean (about 50) is large
    against its spread (about 1). Within 1e-5 relative of the float64 conventional run;
    the textbook E[x^2] - E[x]^2 in float32 over the same values misses by more than 10x that."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    with torch.no_grad():
        net[0].weight.normal_(0, 0.3)
        net[0].bias.fill_(50.0)
    x = torch.randn(1, 1, 4096, 4096, generator=torch.Generator().manual_seed(3))
    got = streamcnn.channel_stats(net, x, 1024, ["0"])["0"]
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        y = net64(x.double()).transpose(0, 1).reshape(2, -1)
    assert_rel(got.mean, y.mean(1), 1e-5, "mean")
    assert_rel(got.var, y.var(1, unbiased=False), 1e-5, "var")
    with torch.no_grad():
        y32 = net(x).transpose(0, 1).reshape(2, -1)
    naive = (y32 * y32).mean(1) - y32.mean(1) ** 2
    assert ((naive.double() - y.var(1, unbiased=False)).abs() / y.var(1)).max() > 1e-4  # (~6e-4 here)


# ---------------------------------------------------------------- update_bn

class DownBlock(nn.Module):
    """A ResNet BasicBlock with a downsampling shortcut (conv + BatchNorm)."""

    def __init__(self, c, o):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.downsample = nn.Sequential(nn.Conv2d(c, o, 1, 2, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def batches(h=41, w=37):
    """Batches of different sizes and statistics, some as (image, label) tuples."""
    return [rand(2, 3, h, w, scale=2, shift=1), rand(1, 3, h, w, seed=2),
            (rand(3, 3, h, w, seed=3, scale=0.5), torch.tensor([0, 1, 0]))]


NETWORKS = {  # network, image size, tile
    "chain": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)),
              (41, 37), 20),
    "residual with downsample": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                                       nn.BatchNorm2d(4), nn.ReLU(), DownBlock(4, 6)),
                                 (41, 37), 20),
    "resnet-18 geometry": (lambda: resnet_front((1, 1), width=4, through="layer2"), (131, 117), 70),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_update_bn_equals_torchs(name):
    torch.manual_seed(0)
    build, size, tile = NETWORKS[name]
    net = build().double()
    net.eval()
    net[1].momentum = 0.3
    net[-1].train() if isinstance(net[-1], nn.BatchNorm2d) else None
    flags = [m.training for m in net.modules()]
    ref = copy.deepcopy(net)
    torch_update_bn(batches(*size), ref)
    streamcnn.update_bn(batches(*size), net, tile)
    for (key, got), (_, want) in zip(net.state_dict().items(), ref.state_dict().items()):
        if "running" in key:
            assert_rel(got, want, F64, key)
        elif "num_batches" in key:
            assert got.item() == want.item() == 3, key
    assert [m.training for m in net.modules()] == flags  # each layer's own flag, restored
    assert net[1].momentum == 0.3


def test_update_bn_with_a_batchnorm_without_running_statistics():
    """It normalises with its batch's statistics in torch's update_bn too: the BatchNorm
    after it sees them; it has nothing to update itself."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).double()
    ref = copy.deepcopy(net)
    torch_update_bn(batches(), ref)
    streamcnn.update_bn(batches(), net, 16)
    assert_rel(net[4].running_mean, ref[4].running_mean, F64, "running_mean")
    assert_rel(net[4].running_var, ref[4].running_var, F64, "running_var")


def test_update_bn_shares_passes_between_parallel_batchnorms():
    """bn1 and the downsample's BatchNorm depend on the same BatchNorms: one pass. The
    chain stem-bn, {bn1, downsample}, bn2 takes three passes, not four."""
    torch.manual_seed(0)
    net = NETWORKS["residual with downsample"][0]().double()
    runs = []
    real = streamcnn.passes.StatisticsPass.run

    def count(self, probes):
        runs.append(sorted(p.key for p in probes))
        return real(self, probes)

    streamcnn.passes.StatisticsPass.run = count
    try:
        streamcnn.update_bn([rand(1, 3, 30, 30)], net, 16)
    finally:
        streamcnn.passes.StatisticsPass.run = real
    assert [len(r) for r in runs] == [1, 2, 1]


# ---------------------------------------------------------------- lsuv_

def test_lsuv_gives_unit_variance_per_output_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 3)).double()
    images = [rand(2, 3, 45, 40, scale=3, shift=1), rand(1, 3, 45, 40, seed=2)]
    assert streamcnn.lsuv_(net, images, 20, tol=0.01) is net
    truth = hooked_stats(net, images, ["0", "3", "5"])
    for name, values in truth.items():
        assert ((values.var(1, unbiased=False) - 1).abs() <= 0.01).all(), name


# ---------------------------------------------------------------- bad input

def test_bad_input_is_named():
    net = graph_net()
    x = rand(1, 3, 40, 40)
    with pytest.raises(ValueError, match=r"no submodule 'nope'; names are paths as in "
                                         r"module.named_modules\(\)"):
        streamcnn.channel_stats(net, x, 20, ["nope"])
    with pytest.raises(ValueError, match="images is empty"):
        streamcnn.channel_stats(net, [], 20, ["0"])
    with pytest.raises(ValueError, match="at least one module name"):
        streamcnn.channel_stats(net, x, 20, [])
    refused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(4), nn.Conv2d(4, 4, 1)).double()
    with pytest.raises(StreamingError, match=r"layer '1' \(AdaptiveAvgPool2d\) cannot be streamed"):
        streamcnn.channel_stats(refused, x, 20, ["2"])
    with pytest.raises(ValueError, match="loader is empty"):
        streamcnn.update_bn(iter([]), nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), 20)
    with pytest.raises(TypeError, match="must be an image"):
        streamcnn.channel_stats(net, 3, 20, ["0"])


def test_the_ownership_tables_of_docs_statistics():
    """docs/statistics.md's example: without the ReLU among the targets its positions 10 and 11
    are never computed; with it, a fourth tile owns them and no output."""
    from streamcnn.geometry import ownership, tile_axis
    from streamcnn.trace import analyse_structure
    net = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv1d(1, 1, 1, stride=3))
    graph = analyse_structure(net, 1, 1).axis(0)
    plain = tile_axis(graph, 12, 5)
    assert list(zip(plain.starts, plain.stops)) == [(0, 5), (3, 8), (6, 11)]
    assert list(zip(plain.own_starts, plain.own_stops)) == [(0, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="do not cover every position"):
        ownership(graph, plain, 2)
    covered = tile_axis(graph, 12, 5, targets=(2,))
    assert list(zip(covered.starts, covered.stops)) == [(0, 5), (3, 8), (6, 11), (9, 12)]
    assert list(zip(covered.own_starts, covered.own_stops)) == [(0, 2), (2, 3), (3, 4), (4, 4)]
    relu = ownership(graph, covered, 2)
    assert list(zip(relu.own_starts, relu.own_stops)) == [(0, 4), (4, 7), (7, 10), (10, 12)]
