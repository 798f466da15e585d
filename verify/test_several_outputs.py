"""Modules that return several feature maps - a ResNet body's ``{"layer2": ..., "layer3": ...}``,
a feature pyramid's levels, deep supervision - against conventional autograd (the oracle:
torch itself, ``streamcnn.testing.compare``, which sums every map in the ``"sum"`` loss and
gives each its own random gradient in the ``"random"`` one).

``Streaming`` returns the module's structure (tuples, named tuples, lists, dicts), each map
stitched from the parts its tiles own, and the backward takes any combination of the maps'
gradients: all, some (an unused map sends none; a parameter only it depends on gets no
gradient, as conventionally), through ``backward()`` or ``torch.autograd.grad``. Float64,
1e-10 relative: the same sums in another order. Tiles are several per axis everywhere.
"""

from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from bench.models import BasicBlock, conv1x1
from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, compare, rel_err
from streamcnn.tiling import tile_image
from streamcnn.trace import analyse

F64 = 1e-10


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def frozen_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, with running statistics and affine parameters drawn at random (the defaults,
    0 and 1, would hide a statistic applied twice or lost)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return net.eval()


def stage(inplanes: int, planes: int, stride: int) -> nn.Module:
    down = None if stride == 1 and inplanes == planes else nn.Sequential(
        conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride, down)


class ResNetBody(nn.Module):
    """A ResNet body returning two stages (strides 4 and 8), as torchvision's
    ``IntermediateLayerGetter`` does for a segmentation head."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 2 * width, 2)

    def forward(self, x):
        x2 = self.layer2(self.layer1(self.stem(x)))
        return {"layer2": x2, "layer3": self.layer3(x2)}


class Pyramid(nn.Module):
    """Three levels at strides 1, 2 and 4, each through a lateral 1x1 convolution (a feature
    pyramid's bottom-up half)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(5, 6, 3, stride=2)
        self.lateral = nn.ModuleList(nn.Conv2d(c, 3, 1) for c in (4, 5, 6))

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        c = torch.tanh(self.c3(b))
        return tuple(lat(m) for lat, m in zip(self.lateral, (a, b, c)))


class Nested(nn.Module):
    """A list inside a dict, beside a map of another stride."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        a = F.gelu(self.a(x))
        b = self.b(a)
        return {"coarse": self.c(F.relu(b)), "levels": [a, b * 2]}


class DeepSupervision(nn.Module):
    """Auxiliary outputs computed before the main one, and coarser (stride 4 and 2 against the
    main output's 1): the last traced step is not the coarsest map."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.aux4 = nn.Conv2d(4, 2, 3, stride=2, padding=1)
        self.aux2 = nn.Conv2d(4, 2, 1)
        self.main = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x):
        d = F.relu(self.down(x))
        return {"aux": (self.aux4(d), self.aux2(d)), "main": self.main(x)}


class TwoAndThree(nn.Module):
    """Strides 2 and 3: neither map's grid is the tiles' (their common grid has stride 6)."""

    def __init__(self):
        super().__init__()
        self.two = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.three = nn.Conv2d(3, 4, 5, stride=3, padding=2)

    def forward(self, x):
        return [self.three(x), torch.sigmoid(self.two(x))]


class OneD(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 5, padding=2)
        self.b = nn.Conv1d(4, 4, 3, stride=2)
        self.pool = nn.MaxPool1d(3, 2, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = self.b(a)
        return {"fine": a, "coarse": self.pool(b), "mid": b}


CASES = {  # module, input shape, tile size
    "ResNet body, dict of strides 4 and 8": (lambda: frozen_batchnorm(ResNetBody()), (2, 3, 92, 86), 60),
    "tuple of strides 1, 2, 4": (Pyramid, (2, 3, 41, 38), 14),
    "list inside a dict": (Nested, (1, 3, 37, 43), 16),
    "deep supervision": (DeepSupervision, (2, 3, 39, 44), 18),
    "strides 2 and 3": (TwoAndThree, (1, 3, 47, 52), 17),
    "1D": (OneD, (2, 2, 131), 30),
}


def case(name):
    build, shape, tile = CASES[name]
    torch.manual_seed(0)
    return build().double(), rand(*shape), tile


@pytest.mark.parametrize("name", CASES)
def test_every_entry_path_matches_conventional(name):
    net, x, tile = case(name)
    plan = streamcnn.plan(net, x.shape, tile, dtype=torch.float64)
    assert all(n > 1 for n in plan.tiles_per_axis), f"test bug: {plan.tiles_per_axis} tiles"
    errs = compare(net, x, tile, paths=ALL_PATHS)
    assert errs.worst <= F64, errs


@pytest.mark.parametrize("name", CASES)
def test_returns_the_module_structure(name):
    net, x, tile = case(name)
    with torch.no_grad():
        want, got = net(x), Streaming(net, tile)(x)
    assert type(got) is type(want)
    flat, spec = torch.utils._pytree.tree_flatten(got)
    ref, ref_spec = torch.utils._pytree.tree_flatten(want)
    assert spec == ref_spec
    assert all(rel_err(a, b) <= F64 for a, b in zip(flat, ref))


@pytest.mark.parametrize("name", ["tuple of strides 1, 2, 4", "deep supervision", "1D"])
def test_an_output_the_loss_does_not_use(name):
    """Each map in turn left out of the loss: its gradient is None in the streamed backward, and
    a parameter only it depends on gets no gradient, on both sides (compare fails otherwise)."""
    net, x, tile = case(name)
    with torch.no_grad():
        maps, spec = torch.utils._pytree.tree_flatten(net(x))
    for unused in range(len(maps)):
        grads = [None if k == unused else rand(*m.shape, seed=7 + k) for k, m in enumerate(maps)]
        errs = compare(net, x, tile, grad_out=torch.utils._pytree.tree_unflatten(grads, spec),
                       paths=[p for p in ALL_PATHS if p.loss == "random"])
        assert errs.worst <= F64, (unused, errs)


def test_a_parameter_of_an_unused_output_gets_no_gradient():
    net, x, tile = case("tuple of strides 1, 2, 4")
    fine, _, _ = Streaming(net, tile)(x)
    fine.sum().backward()
    assert net.lateral[2].weight.grad is None and net.c3.weight.grad is None
    assert net.lateral[0].weight.grad is not None and net.c2.weight.grad is None


def test_autograd_grad_of_one_output_and_of_two():
    """The same forward, differentiated twice: one map, then a loss of two others."""
    net, x, tile = case("list inside a dict")
    params = list(net.parameters())
    xs = x.clone().requires_grad_()
    got, want = Streaming(net, tile)(xs), net(xs)
    g = rand(*want["levels"][1].shape, seed=3)
    for a, b in zip(torch.autograd.grad(got["levels"][1], [xs] + params, g, allow_unused=True,
                                        retain_graph=True),
                    torch.autograd.grad(want["levels"][1], [xs] + params, g, allow_unused=True,
                                        retain_graph=True)):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) <= F64)
    loss = lambda y: (y["coarse"] ** 2).sum() + (y["levels"][0] * 3).sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(got), [xs] + params, allow_unused=True),
                    torch.autograd.grad(loss(want), [xs] + params, allow_unused=True)):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) <= F64)


@pytest.mark.parametrize("kwargs", [dict(keep_graphs=None), dict(keep_graphs=10 ** 9),
                                    dict(skip_zero_gradients=False), dict(prefetch=False)])
def test_kept_graphs_and_skipped_tiles(kwargs):
    net, x, tile = case("deep supervision")
    assert compare(net, x, tile, paths=ALL_PATHS[:4], **kwargs).worst <= F64


def test_tiles_without_gradient_are_skipped_only_where_every_map_has_none():
    """The loss reads one corner of the main map and one of an auxiliary map, at opposite
    corners: the tiles owning neither are skipped, and the gradients stay conventional's."""
    net, x, tile = case("deep supervision")
    grads = [torch.zeros(m.shape, dtype=torch.float64) for m in
             torch.utils._pytree.tree_flatten(net(x))[0]]
    grads[0][..., -2:, -2:] = 1.0  # aux stride 4, bottom right
    grads[2][..., :3, :3] = 1.0  # main, top left
    spec = torch.utils._pytree.tree_flatten(net(x))[1]
    streaming = Streaming(net, tile)
    y = streaming(x.clone().requires_grad_())
    torch.autograd.backward(torch.utils._pytree.tree_flatten(y)[0], grads)
    assert streaming.last_stats.backward.skipped > 0
    assert streaming.last_stats.dedup is False
    errs = compare(net, x, tile, grad_out=torch.utils._pytree.tree_unflatten(grads, spec),
                   paths=[p for p in ALL_PATHS if p.loss == "random"])
    assert errs.worst <= F64, errs


def test_uniform_image_with_dedup_on_stays_exact():
    """Dedup is off for several output maps: a blank image, all tiles alike, still matches."""
    net, _, tile = case("tuple of strides 1, 2, 4")
    x = torch.full((1, 3, 45, 40), 0.25, dtype=torch.float64)
    streaming = Streaming(net, tile, dedup=True)
    with torch.no_grad():
        streaming(x)
    assert streaming.last_stats.dedup is False
    assert compare(net, x, tile, dedup=True).worst <= F64


class Shared(nn.Module):
    """The same map twice (once inside a dict), and the input itself as an output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.tanh(self.a(x))
        return x, y, {"again": y}


def test_a_map_returned_twice_and_the_input_returned():
    torch.manual_seed(0)
    net, x = Shared().double(), rand(2, 3, 30, 35)
    with torch.no_grad():
        out = Streaming(net, 12)(x)
    assert out[1] is out[2]["again"]  # one tensor, as the module returns it
    assert torch.equal(out[0], x)
    assert compare(net, x, 12, paths=ALL_PATHS).worst <= F64


Pair = namedtuple("Pair", "fine coarse")


class Named(nn.Module):
    def __init__(self, ordered: bool = False):
        super().__init__()
        self.ordered = ordered
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        a = F.relu(self.a(x))
        if self.ordered:
            return OrderedDict(coarse=self.b(a), fine=a)
        return Pair(a, self.b(a))


@pytest.mark.parametrize("ordered", [False, True])
def test_named_tuples_and_ordered_dicts_keep_their_type(ordered):
    torch.manual_seed(0)
    net, x = Named(ordered).double(), rand(1, 3, 33, 30)
    with torch.no_grad():
        out = Streaming(net, 12)(x)
    assert type(out) is (OrderedDict if ordered else Pair)
    assert compare(net, x, 12).worst <= F64


def test_batchnorm_in_training_mode_with_two_outputs():
    """Whole-image statistics with two output maps, one of them after a second BatchNorm:
    output, input gradient, parameter gradients and running statistics equal conventional
    training's over two steps, the second with the coarser map (and its BatchNorms) left out of
    the loss."""
    torch.manual_seed(0)
    net = frozen_batchnorm(ResNetBody()).double().train()
    ref = ResNetBody().double()
    ref.load_state_dict(net.state_dict())
    ref.train()
    x = rand(2, 3, 92, 86)
    for used in (("layer2", "layer3"), ("layer2",)):
        results = []
        for model, module in ((Streaming(net, 60), net), (ref, ref)):
            module.zero_grad()
            xi = x.clone().requires_grad_()
            y = model(xi)
            torch.autograd.backward([y[k] for k in used],
                                    [rand(*y[k].shape, seed=len(k)) for k in used])
            results.append((y, xi.grad, [p.grad for p in module.parameters()], list(module.buffers())))
        (y, gx, g, b), (y0, gx0, g0, b0) = results
        assert all(rel_err(y[k], y0[k]) <= F64 for k in y0)
        assert rel_err(gx, gx0) <= F64
        for a, a0 in zip(g, g0):
            assert (a is None) == (a0 is None) and (a is None or rel_err(a, a0) <= F64)
        for a, a0 in zip(b, b0):
            assert rel_err(a.double(), a0.double()) <= F64


class WithNumber(nn.Module):
    def __init__(self, extra):
        super().__init__()
        self.extra = extra
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return {"map": y, "extra": self.extra(y)}


@pytest.mark.parametrize("extra, match", [
    (lambda y: 3, r"returns int as \['extra'\]; it must return a feature map"),
    (lambda y: None, r"returns NoneType as \['extra'\]"),
    (lambda y: y.shape[-1], r"operation 'getitem' cannot be streamed: it reads the feature map's "
                            r"spatial size"),
    (lambda y: y.permute(0, 2, 3, 1), r"returns a feature map as \['extra'\] in layout \(N, H, W, C\)"),
    (lambda y: y.mean((2, 3)), r"returns a value pooled over the whole feature map \(global "
                               r"pooling\)"),
])
def test_what_is_not_a_feature_map_is_refused(extra, match):
    with pytest.raises(StreamingError, match=match):
        Streaming(WithNumber(extra), 12)(torch.randn(1, 3, 30, 30))


def test_a_structure_without_maps_is_refused():
    class Empty(nn.Module):
        def forward(self, x):
            return {}

    with pytest.raises(StreamingError, match="returns dict without a feature map"):
        Streaming(Empty(), 12)(torch.randn(1, 3, 30, 30))


def test_tiles_too_small_for_one_output_say_which():
    """A 9-pixel tile gives the stride-4 maps a valid position on their grid, but the stride-1
    map fewer than 4 valid positions per tile: the tiles, 4 pixels apart, would miss some."""
    net, x, _ = case("deep supervision")
    with pytest.raises(streamcnn.TileTooSmallError, match=r"layer 'main\.4' \(Conv2d\), which the "
                                                          r"tiles must cover \(an output.* >= 10"):
        Streaming(net, 9)(x)
    assert compare(net, x, 10).worst <= F64


def test_plan_reports_each_output():
    net, x, tile = case("list inside a dict")
    plan = streamcnn.plan(net, x.shape, tile, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    assert plan.output_shape == {"coarse": tuple(y["coarse"].shape),
                                 "levels": [tuple(t.shape) for t in y["levels"]]}
    assert plan.output_stride == {"coarse": (4, 4), "levels": [(1, 1), (2, 2)]}
    assert [p for p, _, _ in plan.outputs] == ["['coarse']", "['levels'][0]", "['levels'][1]"]
    text = str(plan)
    assert "-> 3 outputs" in text and "['levels'][1] (1, 4, 19, 22), output stride 2×2" in text
    assert "tiles start on a 4×4 px grid" in text

    class CoarseOnly(Nested):
        def forward(self, x):
            return super().forward(x)["coarse"]

    # every output map is held, and its gradient: the two maps more, twice
    alone = streamcnn.plan(CoarseOnly().double(), x.shape, tile, dtype=torch.float64)
    extra = sum(t.numel() * t.element_size() for t in y["levels"])
    assert plan.streaming_peak_bytes - alone.streaming_peak_bytes >= 2 * extra


def test_channel_stats_of_the_whole_output_needs_a_name():
    net, x, tile = case("list inside a dict")
    with pytest.raises(ValueError, match="returns 3 feature maps"):
        streamcnn.channel_stats(net, x, tile, "")
    stats = streamcnn.channel_stats(net, x, tile, "c")
    with torch.no_grad():
        want = net.c(F.relu(net.b(F.gelu(net.a(x)))))
    assert rel_err(stats["c"].mean, want.mean((0, 2, 3))) <= F64


# ---------------------------------------------------------------- one output, as before

class Single(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(4, 3, 3, padding=1))

    def forward(self, x):
        return self.wrap(self.net(x))


def test_one_map_in_a_structure_streams_bit_for_bit_as_the_bare_map():
    """``y``, ``(y,)`` and ``{"out": y}``: the same tiles, numbers and gradients, bit for bit."""
    results = []
    for wrap in (lambda y: y, lambda y: (y,), lambda y: {"out": y}):
        torch.manual_seed(0)
        net, x = Single(wrap).double(), rand(2, 3, 41, 38).requires_grad_()
        streaming = Streaming(net, 14)
        out = streaming(x)
        y = torch.utils._pytree.tree_flatten(out)[0]
        assert len(y) == 1 and type(out) is type(wrap(y[0]))
        (y[0] * rand(*y[0].shape, seed=2)).sum().backward()
        results.append((y[0].detach(), x.grad, [p.grad for p in net.parameters()],
                        streaming.last_stats.dedup))
    for y, gx, g, dedup in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(gx, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(g, results[0][2]))
        assert dedup is True  # one map: dedup stays on


def test_one_output_graph_and_tiling_are_unchanged():
    """One map: the traced graph's last step is the output and gets no step after it, and the
    tiling is ``tile_axis``'s without targets, as before several outputs existed."""
    torch.manual_seed(0)
    graph = analyse(Single(lambda y: y), 2, 3)
    assert graph.outputs == (len(graph.steps) - 1,) and graph.maps == graph.outputs
    assert len(graph.axis(0)) == len(graph.steps)
    tilings = tile_image(graph, (41, 38), 14)
    assert tilings == tuple(streamcnn.geometry.tile_axis(graph.axis(a), n, 14, name)
                            for a, (n, name) in enumerate(zip((41, 38), ("height", "width"))))
    several = analyse(Nested(), 2, 3)
    assert len(several.axis(0)) == len(several.steps) + 1


# ---------------------------------------------------------------- decoders with several outputs

def test_torchvision_fpn_over_a_resnet_body():
    """verify/models.py's faithful copy of torchvision's BackboneWithFPN: an OrderedDict of
    five maps (strides 4 to 64) from a size read per level (``F.interpolate(top,
    size=lateral.shape[-2:])``), on an image of several tiles per axis."""
    from models import resnet_fpn
    net = resnet_fpn().double()
    x = rand(1, 3, 640, 576)
    with torch.no_grad():
        assert list(Streaming(net, 384)(x)) == ["0", "1", "2", "3", "pool"]
    errs = compare(net, x, 384)
    assert errs.worst <= F64, errs


class UNetDeepSupervision(nn.Module):
    """A U-Net that also returns its decoder's coarser maps, each through a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.Conv2d(4, 4, 3, padding=1)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(4, 4, 2, 2), nn.ConvTranspose2d(4, 4, 2, 2)])
        self.heads = nn.ModuleList([nn.Conv2d(4, 2, 1) for _ in range(3)])

    def forward(self, x):
        a = self.enc[0](x).relu()
        b = self.enc[1](F.max_pool2d(a, 2)).relu()
        c = self.enc[2](F.max_pool2d(b, 2)).relu()
        d = self.up[0](c) + b
        e = self.up[1](d) + a
        return {"out": self.heads[0](e), "aux": [self.heads[1](d), self.heads[2](c)]}


def test_unet_with_deep_supervision():
    torch.manual_seed(0)
    errs = compare(UNetDeepSupervision().double(), rand(1, 3, 72, 56), 32, paths=ALL_PATHS)
    assert errs.worst <= F64, errs


def test_inference_into_a_structure_of_arrays(tmp_path):
    """``out=`` the output's structure of arrays (a memmap, a zarr array): each map written
    tile by tile, the same structure returned."""
    zarr = pytest.importorskip("zarr")
    import numpy as np
    torch.manual_seed(0)
    net = UNetDeepSupervision().double()
    x = rand(1, 3, 72, 56)
    with torch.no_grad():
        want = net(x)
    out = {"out": np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float64, (1, 2, 72, 56)),
           "aux": [zarr.create_array(tmp_path / "aux0.zarr", shape=(1, 2, 36, 28), dtype="f8"),
                   np.zeros((1, 2, 18, 14))]}
    with torch.no_grad():
        got = Streaming(net, 32)(x, out=out)
    assert got is out
    assert rel_err(torch.from_numpy(np.asarray(out["out"])), want["out"]) <= F64
    assert rel_err(torch.from_numpy(out["aux"][0][:]), want["aux"][0]) <= F64
    assert rel_err(torch.from_numpy(out["aux"][1]), want["aux"][1]) <= F64
    with torch.no_grad(), pytest.raises(ValueError, match="out is structured as"):
        Streaming(net, 32)(x, out=np.zeros((1, 2, 72, 56)))


def test_pixel_loss_needs_one_output():
    torch.manual_seed(0)
    net = UNetDeepSupervision().double()
    with pytest.raises(StreamingError, match=r"pixel_loss takes the loss of one output map, and the "
                                             r"module returns 3"):
        Streaming(net, 32).pixel_loss(rand(1, 3, 72, 56), torch.zeros(1, 72, 56, dtype=torch.long),
                                      lambda y, t: F.cross_entropy(y, t, reduction="none"))
