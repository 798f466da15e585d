"""Global steps (squeeze-and-excitation and friends) inside the streamed part, against
conventional autograd on the whole image (the oracle: torch itself).

A global step reduces a feature map over every position (a mean, max or L2 norm), computes
a small gate from it, and broadcasts the gate back (``streamcnn.reductions``). Float64, 1e-10
relative: the reductions are float64 sums (or exact extremes) of the tiles' owned parts,
the backward's whole-map gradient of each reduced value the sum of the tiles' parts, all in
another order than torch's. The blocks are faithful copies of the libraries' code (torchvision
and timm do not load against this CPU torch build); each class names the file it copies.
Several tiles per axis, batch 2, and training-mode BatchNorm where the block has it.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, ENTRIES, METHODS, Path, compare
from bench.models import MBConv, SqueezeExcitation, _make_divisible, conv_bn_act  # torchvision's

F64 = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check(net, x, tile, **kwargs):
    net = net.double()
    errs = compare(net, x, tile, **kwargs)
    assert errs.worst < F64, errs
    return errs


def efficientnet_front(training_bn=False):
    net = nn.Sequential(conv_bn_act(3, 16, 3, 2), MBConv(16, 16, 1, 3, 1), MBConv(16, 24, 6, 3, 2),
                        MBConv(24, 24, 6, 5, 1))
    net.train(training_bn)
    return net


def mobilenet_v3_front():
    """torchvision/models/mobilenetv3.py: InvertedResidual with SE (ReLU inside, hard-sigmoid
    scale, squeeze channels _make_divisible(c // 4, 8)) and hardswish blocks."""
    def block(cin, cout, expand, k, stride, act):
        hidden = cin * expand
        return MBConv(cin, cout, expand, k, stride, act=act, scale_activation=nn.Hardsigmoid,
                      squeeze=_make_divisible(hidden // 4, 8),
                      se_layer=lambda c, s, activation, scale_activation: SqueezeExcitation(
                          c, s, scale_activation=scale_activation))
    return nn.Sequential(conv_bn_act(3, 16, 3, 2, act=nn.Hardswish),
                         block(16, 16, 1, 3, 2, nn.ReLU), block(16, 24, 4, 5, 1, nn.Hardswish)).eval()


class SEModule(nn.Module):
    """timm/layers/squeeze_excite.py: SEModule (norm_layer: BatchNorm2d here)."""

    def __init__(self, channels, rd_channels, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = norm_layer(rd_channels) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


def hard_sigmoid(x, inplace: bool = False):
    """timm/layers/activations.py"""
    return F.relu6(x + 3.) / 6.


class EffectiveSEModule(nn.Module):
    """timm/layers/squeeze_excite.py: EffectiveSEModule ('Effective Squeeze-Excitation',
    CenterMask)."""

    def __init__(self, channels, add_maxpool=False):
        super().__init__()
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc(x_se)
        return x * hard_sigmoid(x_se)


class EcaModule(nn.Module):
    """timm/layers/eca.py: EcaModule (kernel size from the channels, gamma 2, beta 1)."""

    def __init__(self, channels, gamma=2, beta=1):
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        kernel_size = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2,
                              bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class GRN(nn.Module):
    """ConvNeXt-V2, models/utils.py: GRN (channels last)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    """ConvNeXt-V2, models/convnextv2.py: Block (drop path 0)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.grn(x)
        x = self.pwconv2(x)
        x = x.permute(0, 3, 1, 2)
        return input + x


class ChannelAttn(nn.Module):
    """timm/layers/cbam.py: ChannelAttn (mean and amax pooling, shared MLP)."""

    def __init__(self, channels, rd_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class OriginalChannelGate(nn.Module):
    """CBAM's channel attention as in Jongchan/attention-module (MODELS/cbam.py), with
    torch's global pooling layers for its avg_pool2d/max_pool2d over the whole size: mean
    and max through AdaptiveAvgPool2d(1)/AdaptiveMaxPool2d(1) (one position takes a max's
    gradient), a shared MLP on the flattened vector."""

    def __init__(self, channels, reduction=2):
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // reduction),
                                 nn.ReLU(), nn.Linear(channels // reduction, channels))

    def forward(self, x):
        att = self.mlp(self.avg(x)) + self.mlp(self.max(x))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)


class SpatialAttn(nn.Module):
    """timm/layers/cbam.py: SpatialAttn (channel mean and max, a 7x7 conv, a sigmoid)."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = conv_bn_act(2, 1, kernel_size, act=None)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        x_attn = self.conv(x_attn)
        return x * self.gate(x_attn)


class Cbam(nn.Module):
    """timm/layers/cbam.py: CbamModule."""

    def __init__(self, channels, channel=None):
        super().__init__()
        self.channel = channel or ChannelAttn(channels, max(1, channels // 4))
        self.spatial = SpatialAttn()

    def forward(self, x):
        return self.spatial(self.channel(x))


def stem(c=8):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())


def test_torchvision_mbconv_silu_se():
    check(efficientnet_front().eval(), rand(2, 3, 64, 60), 36)


def test_mobilenet_v3_hard_sigmoid_se():
    check(mobilenet_v3_front(), rand(2, 3, 64, 64, seed=1), 36)


def test_training_mode_batchnorm_beside_se():
    """The MBConv front end in training mode: every BatchNorm's statistics and the SE gates
    found level by level (a BatchNorm after a gate is a level deeper, and the reverse).
    Random output gradients only, and no BatchNorm bias right before a 1x1 convolution and a
    training-mode BatchNorm (as between EfficientNet's blocks): a summed loss, or such a
    bias, has a zero gradient in exact arithmetic, rounding noise either way (test_norms)."""
    net = nn.Sequential(conv_bn_act(3, 16, 3, 2), MBConv(16, 16, 1, 3, 1), MBConv(16, 16, 4, 5, 1),
                        nn.Conv2d(16, 8, 3, padding=1)).train()
    random_loss = [Path(e, m, "random") for e in ENTRIES for m in METHODS]
    check(net, rand(2, 3, 64, 64, seed=2), 36, paths=random_loss)


def test_timm_se_module_with_eval_batchnorm_on_the_pooled_vector():
    net = nn.Sequential(stem(), SEModule(8, 4), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        net[1].bn.running_mean.uniform_(-0.2, 0.2)
        net[1].bn.running_var.uniform_(0.5, 1.5)
    check(net, rand(2, 3, 30, 34, seed=3), 12)


def test_effective_se_with_max():
    net = nn.Sequential(stem(), EffectiveSEModule(8, add_maxpool=True), nn.Conv2d(8, 4, 3, padding=1))
    check(net, rand(2, 3, 30, 30, seed=4), 12)


def test_eca():
    net = nn.Sequential(stem(16), EcaModule(16), nn.Conv2d(16, 4, 3, padding=1))
    check(net, rand(2, 3, 28, 28, seed=5), 12)


def test_grn_convnext_v2_block():
    net = nn.Sequential(stem(8), ConvNeXtV2Block(8), ConvNeXtV2Block(8))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, GRN):
                m.gamma.uniform_(-1, 1)
                m.beta.uniform_(-0.5, 0.5)
    check(net, rand(2, 3, 36, 36, seed=6), 20)


def test_cbam_timm_channel_and_spatial_attention():
    net = nn.Sequential(stem(), Cbam(8), nn.Conv2d(8, 4, 3, padding=1)).eval()
    check(net, rand(2, 3, 32, 32, seed=7), 16)


def test_cbam_original_channel_gate_adaptive_pools():
    net = nn.Sequential(stem(), Cbam(8, channel=OriginalChannelGate(8)), nn.Conv2d(8, 4, 3, padding=1)).eval()
    check(net, rand(2, 3, 32, 32, seed=8), 16)


def test_every_entry_path():
    net = nn.Sequential(stem(), SEModule(8, 4, norm_layer=None), EffectiveSEModule(8, add_maxpool=True),
                        nn.Conv2d(8, 4, 3, padding=1))
    check(net, rand(2, 3, 26, 26, seed=9), 12, paths=ALL_PATHS)


class SE1d(nn.Module):
    def __init__(self, c, max_pool=False):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool1d(1) if max_pool else nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Conv1d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(self.pool(x))) + torch.norm(x, p=2, dim=2, keepdim=True) * 0.1


@pytest.mark.parametrize("max_pool", [False, True])
def test_one_dimensional(max_pool):
    net = nn.Sequential(nn.Conv1d(3, 6, 5, padding=2), nn.ReLU(), SE1d(6, max_pool),
                        nn.Conv1d(6, 4, 3, padding=1))
    check(net, rand(2, 3, 90, seed=10), 24)


class MaxGate(nn.Module):
    """Extremes over the map, in the three tie rules: amax shares the gradient evenly among
    ties, adaptive max pooling and max(dim) give it to the first in row-major order."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x):
        if self.kind == "amax":
            m = x.amax((2, 3), keepdim=True)
        elif self.kind == "amin":
            m = x.amin((2, 3), keepdim=True)
        else:
            m = self.pool(x)
        return x * torch.tanh(m) + m


@pytest.mark.parametrize("kind", ["amax", "amin", "adaptive"])
def test_ties_in_constant_regions(kind):
    """A ReLU of a constant region: many positions, across tiles, hold the same extreme."""
    x = rand(2, 3, 30, 30, seed=11)
    x[:, :, 4:26, 2:28] = 0.25
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1), MaxGate(kind),
                        nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():
        net[2].weight.abs_()  # (a max in the constant region, for some channels)
    check(net, x, 10)


def test_max_dim_on_one_dimensional_map():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x).relu()
            return y * torch.max(y, dim=-1, keepdim=True).values
    x = rand(2, 3, 60, seed=12)
    x[:, :, 10:50] = 0.0
    check(M(), x, 16)


class SelectiveKernelNoStack(nn.Module):
    """Selective kernel (SKNet) written without torch.stack: two branches summed, a gate
    from their global mean, a softmax across the branches on the pooled vector."""

    def __init__(self, c):
        super().__init__()
        self.a = conv_bn_act(c, c, 3, act=nn.ReLU)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False),
                               nn.BatchNorm2d(c), nn.ReLU())
        self.fc = nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, 2 * c, 1))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        s = (a + b).mean((2, 3), keepdim=True)
        z = self.fc(s)
        n, c2 = z.shape[:2]
        att = z.view(n, 2, c2 // 2, 1, 1).softmax(dim=1)
        return a * att[:, 0] + b * att[:, 1]


def test_selective_kernel_without_stack():
    check(nn.Sequential(stem(), SelectiveKernelNoStack(8)).eval(), rand(2, 3, 30, 30, seed=13), 16)


def test_skip_and_keep_graphs_are_off_with_global_steps():
    """(dedup is on: verify/test_dedup_global.py)"""
    from streamcnn import dedup, skipping
    net = nn.Sequential(stem(), SEModule(8, 4, norm_layer=None)).double()
    s = Streaming(net, 12, keep_graphs=None)
    graph, _ = s.prepare(__import__("streamcnn.sources", fromlist=["x"]).source_of(rand(1, 3, 24, 24)))
    assert dedup.allowed(graph) and not skipping.allowed(graph)
    check(net, rand(1, 3, 24, 24), 12, keep_graphs=None)


def test_pixel_loss_with_global_steps():
    net = nn.Sequential(stem(), SEModule(8, 4, norm_layer=None), nn.Conv2d(8, 3, 1)).double()
    x = rand(2, 3, 28, 28, seed=14)
    target = rand(2, 3, 28, 28, seed=15)
    loss = F.mse_loss(net(x), target)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    streamed = Streaming(net, 12).pixel_loss(x, target, lambda y, t: F.mse_loss(y, t, reduction="none"))
    sgrads = torch.autograd.grad(streamed, list(net.parameters()))
    assert abs(streamed.item() - loss.item()) <= F64 * abs(loss.item())
    for a, b in zip(sgrads, grads):
        assert (a - b).abs().max() <= F64 * b.abs().max()


# ------------------------------------------------------------------ refused, clearly

class PerRowPool(nn.Module):
    """Coordinate attention's per-row mean."""

    def forward(self, x):
        return x * torch.sigmoid(x.mean(3, keepdim=True))


@pytest.mark.parametrize("block, words", [
    (PerRowPool(), "some spatial axes only"),
])
def test_refused_clearly(block, words):
    net = nn.Sequential(stem(), block).double()
    with pytest.raises(StreamingError, match=words):
        Streaming(net, 12)(rand(1, 3, 24, 24))


def test_returning_a_pooled_value_is_refused():
    net = nn.Sequential(stem(), nn.AdaptiveAvgPool2d(1)).double()
    with pytest.raises(StreamingError, match="returns a value pooled"):
        Streaming(net, 12)(rand(1, 3, 24, 24))


def test_training_batchnorm_on_the_pooled_vector_is_refused():
    net = nn.Sequential(stem(), SEModule(8, 4)).double().train()
    with pytest.raises(StreamingError, match="pooled over the whole map in training mode"):
        Streaming(net, 12)(rand(2, 3, 24, 24))


# ---------------------------------------------------------------- arrays, random graphs

def test_uint8_array_with_a_transform():
    """A uint8 channels-last array read tile by tile, a transform to float64, SE gates: the
    output and every parameter gradient as conventional autograd's on the converted image."""
    import numpy as np

    from streamcnn import ImageArray
    torch.manual_seed(0)
    net = nn.Sequential(stem(), SEModule(8, 4, norm_layer=None), nn.Conv2d(8, 4, 3, padding=1),
                        EffectiveSEModule(4, add_maxpool=True)).double()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 30, 34, 3), dtype=np.uint8)
    transform = lambda t: t.double() / 255  # noqa: E731
    x = transform(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    grad_out = rand(2, 4, 30, 34, seed=5)
    expected = torch.autograd.grad(net(x), list(net.parameters()), grad_out)
    y = Streaming(net, 14, transform=transform)(ImageArray(pixels, "NHWC"))
    got = torch.autograd.grad(y, list(net.parameters()), grad_out)
    assert (y - net(x)).abs().max() <= F64 * net(x).abs().max()
    assert max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected)) <= F64


def _gate(kind: str, c: int) -> nn.Module:
    """One global step of the kinds real blocks use."""
    if kind == "se":
        return SEModule(c, max(c // 2, 1), norm_layer=None)
    if kind == "effective-max":
        return EffectiveSEModule(c, add_maxpool=True)
    if kind == "eca":
        return EcaModule(c)
    if kind == "split":
        from verify.test_split_attention import SplitAttn
        return SplitAttn(c, radix=2)
    if kind == "sk":
        from verify.test_split_attention import SelectiveKernel, perturbed
        return perturbed(SelectiveKernel(c)).eval()
    if kind == "gc":
        from verify.test_positions import GlobalContext
        gc = GlobalContext(c, fuse_add=True, rd_ratio=1 / 2)
        gc.conv_attn.bias = None  # (a softmax ignores it: its gradient is zero, test_positions)
        return gc
    return nn.Identity()


class _Residual(nn.Module):
    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_with_global_steps_on_random_branches(seed):
    """Seeded random stacks: convolutions (strided now and then), activations, and global
    gates on the trunk or inside residual branches, several deep (levels nest), against
    conventional autograd on a random entry path."""
    import random
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c, layers = 6, [nn.Conv2d(3, 6, 3, padding=1)]
    for _ in range(rng.randint(2, 5)):
        gate = _gate(rng.choice(["se", "effective-max", "eca", "split", "sk", "gc", "none"]), c)
        conv = nn.Conv2d(c, c, 3, stride=rng.choice([1, 1, 2]), padding=1)
        if rng.random() < 0.5 and conv.stride == (1, 1):
            layers.append(_Residual(nn.Sequential(conv, nn.ReLU(), gate)))
        else:
            layers += [conv, rng.choice([nn.ReLU(), nn.SiLU(), nn.Tanh()]), gate]
    net = nn.Sequential(*layers)
    side = rng.choice([36, 44, 52])
    path = Path(rng.choice(ENTRIES), rng.choice(METHODS), rng.choice(["sum", "random"]))
    least = max(streamcnn.plan(net.double(), (2, 3, side, side), side).min_tile_size)
    check(net, rand(2, 3, side, side, seed=seed), rng.randint(least, max(least, side - 1)), paths=path)
