"""Split attention (ResNeSt) and selective kernels (SKNet) inside the streamed part: the
channels split into groups by a reshape, or branches stacked along a new dimension, a gate
from the global mean of their sum, a softmax across the groups, and the weighted sum.

The reshape ``x.reshape((B, r, RC // r, H, W))`` with ``B, RC, H, W = x.shape`` and
``torch.stack(paths, dim=1)`` keep the batch first and the spatial axes as they are: on a
tile, ``H, W`` are the tile's, and the tile's reshape is the whole map's restricted to the
tile (``streamcnn.rules.reshape``/``stack``: a dimension of groups, neither spatial nor the
channels). Oracle: conventional autograd on the whole image; float64, 1e-10 relative (the
global mean is a float64 sum of the tiles' owned parts, the gate's gradient the sum of the
tiles' parts: the same terms added in another order). The blocks are faithful copies of
timm's code (timm does not load against this CPU torch build); each names its file.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, ENTRIES, METHODS, Path
from verify.test_global_steps import check, rand, stem
from verify.test_graph_refusals import Functional


def make_divisible(v, divisor=8, min_value=None, round_limit=.9):
    """timm/layers/helpers.py: make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class RadixSoftmax(nn.Module):
    """timm/layers/split_attn.py: RadixSoftmax."""

    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        batch = x.size(0)
        if self.radix > 1:
            x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            x = F.softmax(x, dim=1)
            x = x.reshape(batch, -1)
        else:
            x = torch.sigmoid(x)
        return x


class SplitAttn(nn.Module):
    """timm/layers/split_attn.py: SplitAttn (ResNeSt's split-attention convolution)."""

    def __init__(self, in_channels, out_channels=None, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups=1, bias=False, radix=2, rd_ratio=0.25, rd_channels=None,
                 rd_divisor=8, act_layer=nn.ReLU, norm_layer=None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.radix = radix
        mid_chs = out_channels * radix
        if rd_channels is None:
            attn_chs = make_divisible(in_channels * radix * rd_ratio, min_value=32, divisor=rd_divisor)
        else:
            attn_chs = rd_channels * radix
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, mid_chs, kernel_size, stride, padding, dilation,
                              groups=groups * radix, bias=bias)
        self.bn0 = norm_layer(mid_chs) if norm_layer else nn.Identity()
        self.drop = nn.Identity()
        self.act0 = act_layer(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, attn_chs, 1, groups=groups)
        self.bn1 = norm_layer(attn_chs) if norm_layer else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(attn_chs, mid_chs, 1, groups=groups)
        self.rsoftmax = RadixSoftmax(radix, groups)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn0(x)
        x = self.drop(x)
        x = self.act0(x)

        B, RC, H, W = x.shape
        if self.radix > 1:
            x = x.reshape((B, self.radix, RC // self.radix, H, W))
            x_gap = x.sum(dim=1)
        else:
            x_gap = x
        x_gap = x_gap.mean((2, 3), keepdim=True)
        x_gap = self.fc1(x_gap)
        x_gap = self.bn1(x_gap)
        x_gap = self.act1(x_gap)
        x_attn = self.fc2(x_gap)

        x_attn = self.rsoftmax(x_attn).view(B, -1, 1, 1)
        if self.radix > 1:
            out = (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        else:
            out = x * x_attn
        return out.contiguous()


class ConvNormAct(nn.Sequential):
    """timm/layers/conv_bn_act.py: ConvNormAct (same padding, no bias, BatchNorm, ReLU)."""

    def __init__(self, cin, cout, kernel_size=3, dilation=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                                   dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SelectiveKernelAttn(nn.Module):
    """timm/layers/selective_kernel.py: SelectiveKernelAttn."""

    def __init__(self, channels, num_paths=2, attn_channels=32):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def forward(self, x):
        torch._assert(x.shape[1] == self.num_paths, '')
        x = x.sum(1).mean((2, 3), keepdim=True)
        x = self.fc_reduce(x)
        x = self.bn(x)
        x = self.act(x)
        x = self.fc_select(x)
        B, C, H, W = x.shape
        x = x.view(B, self.num_paths, C // self.num_paths, H, W)
        x = torch.softmax(x, dim=1)
        return x


class SelectiveKernel(nn.Module):
    """timm/layers/selective_kernel.py: SelectiveKernel (keep_3x3: a 5x5 branch as a 3x3
    dilated by 2; ``split_input``: each branch gets its share of the input channels)."""

    def __init__(self, in_channels, out_channels=None, kernel_size=None, dilation=1, groups=1,
                 rd_ratio=1. / 16, rd_divisor=8, split_input=True):
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = kernel_size or [3, 5]
        dilation = [dilation * (k - 1) // 2 for k in kernel_size]
        kernel_size = [3] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.split_input = split_input
        if self.split_input:
            assert in_channels % self.num_paths == 0
            in_channels = in_channels // self.num_paths
        groups = min(out_channels, groups)
        self.paths = nn.ModuleList([ConvNormAct(in_channels, out_channels, k, d, groups)
                                    for k, d in zip(kernel_size, dilation)])
        attn_channels = make_divisible(out_channels * rd_ratio, divisor=rd_divisor)
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, attn_channels)

    def forward(self, x):
        if self.split_input:
            x_split = torch.split(x, self.in_channels // self.num_paths, 1)
            x_paths = [op(x_split[i]) for i, op in enumerate(self.paths)]
        else:
            x_paths = [op(x) for op in self.paths]
        x = torch.stack(x_paths, dim=1)
        x_attn = self.attn(x)
        x = x * x_attn
        x = torch.sum(x, dim=1)
        return x


def perturbed(net: nn.Module) -> nn.Module:
    """Running statistics away from 0 and 1, so that eval BatchNorm is not the identity."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


RANDOM_LOSS = [Path(e, m, "random") for e in ENTRIES for m in METHODS]


@pytest.mark.parametrize("radix, groups", [(2, 1), (4, 1), (2, 2)])
def test_resnest_split_attention(radix, groups):
    torch.manual_seed(radix + groups)
    net = nn.Sequential(stem(8), SplitAttn(8, radix=radix, groups=groups, norm_layer=nn.BatchNorm2d),
                        nn.Conv2d(8, 4, 3, padding=1))
    check(perturbed(net).eval(), rand(2, 3, 30, 34, seed=radix), 13)


def test_split_attention_every_entry_path():
    torch.manual_seed(0)
    net = nn.Sequential(stem(8), SplitAttn(8, radix=2, norm_layer=nn.BatchNorm2d), nn.ReLU(),
                        SplitAttn(8, radix=2, norm_layer=nn.BatchNorm2d))
    check(perturbed(net).eval(), rand(2, 3, 28, 28, seed=7), 12, paths=ALL_PATHS)


@pytest.mark.parametrize("checkpoints", [False, "memory", "disk"])
def test_split_attention_beside_training_batchnorm(checkpoints):
    """bn0 in training mode normalises the map the reshape splits (a level of its own below
    the gate's), bn1 on the pooled vector in eval mode; with and without level checkpoints
    (the grouped map crosses a cut). Random output gradients (see test_global_steps)."""
    torch.manual_seed(1)
    net = nn.Sequential(stem(8), SplitAttn(8, radix=2, norm_layer=nn.BatchNorm2d),
                        nn.Conv2d(8, 4, 3, padding=1))
    perturbed(net).train()
    net[1].bn1.eval()
    check(net, rand(2, 3, 32, 30, seed=3), 14, paths=RANDOM_LOSS, checkpoints=checkpoints)


@pytest.mark.parametrize("split_input", [True, False])
def test_timm_selective_kernel(split_input):
    torch.manual_seed(2)
    net = nn.Sequential(stem(8), SelectiveKernel(8, split_input=split_input), nn.Conv2d(8, 4, 3, padding=1))
    check(perturbed(net).eval(), rand(2, 3, 30, 30, seed=4), 16)


def test_selective_kernel_branches_in_training_mode():
    torch.manual_seed(3)
    net = nn.Sequential(stem(8), SelectiveKernel(8), nn.Conv2d(8, 4, 3, padding=1))
    perturbed(net).train()
    net[1].attn.bn.eval()
    check(net, rand(2, 3, 30, 30, seed=5), 16, paths=RANDOM_LOSS)


def _radix(x):  # the split and its merge back, as timm's RadixSoftmax writes the vector
    B, C, H, W = x.shape
    return x.reshape(B, 2, C // 2, H, W).relu().view(B, -1, H, W)


def test_split_and_merge_back():
    """The split and its merge back (x.view(B, -1, H, W)) restore the channels in order."""
    net = nn.Sequential(stem(8), Functional(_radix), nn.Conv2d(8, 4, 3, padding=1))
    check(net, rand(2, 3, 26, 26, seed=6), 12)


@pytest.mark.parametrize("f, words", [
    (lambda x: x.reshape(x.shape[0] * 2, x.shape[1] // 2, x.shape[2], x.shape[3]).sum(0, keepdim=True),
     "batch"),
    (lambda x: x.reshape(x.shape[0], 2, 2, x.shape[1] // 4, x.shape[2], x.shape[3]).sum((1, 2)),
     "more than two dimensions"),
    (lambda x: x.view(x.shape[0], x.shape[1], x.shape[3], x.shape[2]), "reshapes the feature map"),
    (lambda x: torch.stack([x, x], dim=3).sum(3), "between spatial ones"),
    (lambda x: F.avg_pool2d(x, 3, stride=1).reshape(x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
     "reshapes the feature map"),
    (lambda x: torch.stack([x, x], dim=0).sum(0), "before the batch"),
])
def test_refused_clearly(f, words):
    net = nn.Sequential(stem(8), Functional(f)).double()
    with pytest.raises(StreamingError, match=words):
        Streaming(net, 12)(rand(2, 3, 24, 24))
