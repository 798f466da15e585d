"""Sequences of positions inside the streamed part: ``x.flatten(2)`` and ``x.reshape(B, C, H * W)``,
reductions and a softmax over all positions, and the matrix product that sums over them -
global-context attention pooling (GCNet), log-sum-exp pooling, ``x.flatten(2).mean(-1)``.

A tile's sequence is its own positions in row-major order, not a piece of the image's, so
only what treats positions alike streams (``streamcnn.rules.positions_role``): pointwise
operations, and global steps over every position. A softmax over the positions is
``exp(x - R)`` with ``R`` the log-sum-exp over the whole map (a running maximum and a float64
sum of ``exp(x - max)`` over the tiles' owned positions); ``x @ w`` over the positions is the
sum of ``x[:, p] w[p]`` over the tiles' owned positions (``streamcnn.reductions``). Oracle:
conventional autograd on the whole image; float64, 1e-10 relative (the same terms summed
in another order). The blocks are faithful copies of timm's code (timm does not load
against this CPU torch build); each names its file.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from streamcnn import Streaming, StreamingError
from streamcnn.testing import ALL_PATHS, ENTRIES, METHODS, Path, compare
from verify.test_global_steps import check, rand, stem
from verify.test_graph_refusals import Functional
from verify.test_split_attention import make_divisible

F64 = 1e-10


class LayerNorm2d(nn.LayerNorm):
    """timm/layers/norm.py: LayerNorm2d (over the channels of a channels-first map)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """timm/layers/mlp.py: ConvMlp."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.ReLU,
                 norm_layer=None):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=True)
        self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(0.)
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1, bias=True)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class GlobalContext(nn.Module):
    """timm/layers/global_context.py: GlobalContext (GCNet's attention pooling, then a scaling
    gate and/or an added context)."""

    def __init__(self, channels, use_attn=True, fuse_add=False, fuse_scale=True, rd_ratio=1. / 8,
                 rd_divisor=1, act_layer=nn.ReLU):
        super().__init__()
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True) if use_attn else None
        rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.mlp_add = ConvMlp(channels, rd_channels, act_layer=act_layer,
                               norm_layer=LayerNorm2d) if fuse_add else None
        self.mlp_scale = ConvMlp(channels, rd_channels, act_layer=act_layer,
                                 norm_layer=LayerNorm2d) if fuse_scale else None
        self.gate = nn.Sigmoid()
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode='fan_in', nonlinearity='relu')

    def forward(self, x):
        B, C, H, W = x.shape

        if self.conv_attn is not None:
            attn = self.conv_attn(x).reshape(B, 1, H * W)  # (B, 1, H * W)
            attn = F.softmax(attn, dim=-1).unsqueeze(3)  # (B, 1, H * W, 1)
            context = x.reshape(B, C, H * W).unsqueeze(1) @ attn
            context = context.view(B, C, 1, 1)
        else:
            context = x.mean(dim=(2, 3), keepdim=True)

        if self.mlp_scale is not None:
            mlp_x = self.mlp_scale(context)
            x = x * self.gate(mlp_x)
        if self.mlp_add is not None:
            mlp_x = self.mlp_add(context)
            x = x + mlp_x

        return x


def gc_net(fuse_add=False, fuse_scale=True):
    torch.manual_seed(0)
    net = nn.Sequential(stem(8), GlobalContext(8, fuse_add=fuse_add, fuse_scale=fuse_scale,
                                               rd_ratio=1 / 2),  # (LayerNorm over 4 channels)
                        nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.double()


RANDOM_LOSS = [Path(e, m, "random") for e in ENTRIES for m in METHODS]


def check_shift_invariant(net, x, tile, invariant: str, paths=ALL_PATHS, **kwargs):
    """``check`` on every entry path, but the parameter ``invariant`` (the attention logits'
    bias: a softmax does not change when every logit moves by the same amount) has a
    gradient that is zero in exact arithmetic - rounding noise on both sides. It is held to
    the scale of the other gradients instead: |streamed| <= 1e-10 x the largest gradient of
    the attention weight."""
    for path in [paths] if isinstance(paths, Path) else paths:
        errs = compare(net, x, tile, paths=path, **kwargs)
        assert all(e < F64 for n, e in errs.param_grads.items() if n != invariant), errs
        assert errs.output < F64 and (errs.input_grad or 0) < F64, errs
        params = dict(net.named_parameters())
        weight = params[invariant.replace("bias", "weight")]
        if params[invariant].grad is not None:  # (None: the path's loss left out the parameters)
            assert params[invariant].grad.abs().max() <= F64 * weight.grad.abs().max()


@pytest.mark.parametrize("fuse_add, fuse_scale", [(False, True), (True, False), (True, True)])
def test_timm_global_context(fuse_add, fuse_scale):
    check_shift_invariant(gc_net(fuse_add, fuse_scale), rand(2, 3, 30, 34, seed=1), 13,
                          "1.conv_attn.bias")


@pytest.mark.parametrize("checkpoints", [False, "memory", "disk"])
def test_global_context_beside_training_batchnorm(checkpoints):
    """A training-mode BatchNorm before and after the block: the sequences of positions
    never cross a stored cut (a tile's is its own positions), the maps around them do.
    Random output gradients (a summed loss through training-mode BatchNorm has zero
    gradients in exact arithmetic, see test_norms)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        GlobalContext(8, rd_ratio=1 / 2), nn.Conv2d(8, 4, 3, padding=1, bias=False),
                        nn.BatchNorm2d(4)).double().train()
    check_shift_invariant(net, rand(2, 3, 32, 30, seed=2), 14, "3.conv_attn.bias",
                          paths=RANDOM_LOSS, checkpoints=checkpoints)


class FlatMeanSE(nn.Module):
    """Squeeze-and-excitation with the pooling written ``x.flatten(2).mean(-1)``."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.flatten(2).mean(-1)))[:, :, None, None]


class LogSumExpPool(nn.Module):
    """A gate from log-sum-exp pooling, and a softmax over positions by nn.Softmax and
    log_softmax, through the channel-wise sums they weigh."""

    def __init__(self, c):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        lse = torch.logsumexp(x, dim=(2, 3), keepdim=True)
        w = self.softmax(x.flatten(2))
        lw = F.log_softmax(x.flatten(2), dim=2)
        pooled = (w * x.flatten(2)).sum(-1) + (lw * w).sum(2)
        return x * torch.sigmoid(lse) + pooled[..., None, None]


@pytest.mark.parametrize("block", [FlatMeanSE, LogSumExpPool])
def test_reductions_over_a_sequence(block):
    net = nn.Sequential(stem(8), block(8), nn.Conv2d(8, 4, 3, padding=1))
    check(net, rand(2, 3, 30, 34, seed=3), 13)


class GlobalContext1d(nn.Module):
    """Global-context pooling of a 1-d map (its one axis is already a sequence)."""

    def __init__(self, c):
        super().__init__()
        self.attn = nn.Conv1d(c, 1, 1, bias=False)
        self.fc = nn.Conv1d(c, c, 1)

    def forward(self, x):
        w = torch.softmax(self.attn(x), dim=-1).transpose(1, 2)  # (B, L, 1)
        return x + self.fc(x @ w)


def test_one_dimensional():
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), GlobalContext1d(8),
                        nn.Conv1d(8, 4, 3, padding=1))
    check(net, rand(2, 3, 70, seed=4), 23, paths=ALL_PATHS)


def test_float32_against_float64_autograd():
    """float32 streaming of the GC block is as close to float64 autograd as conventional
    float32 is (a softmax over every position: each weight's rounding, the sums' order)."""
    net = gc_net()
    x = rand(2, 3, 40, 44, seed=5)
    exact = net(x)
    net32 = net.float()
    conventional = (net32(x.float()).double() - exact).abs().max()
    streamed = (Streaming(net32, 17)(x.float()).double() - exact).abs().max()
    assert streamed <= 4 * conventional + 1e-6 * exact.abs().max()


class SelfAttention2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=1)
        attn = torch.softmax(q.flatten(2).transpose(1, 2) @ k.flatten(2), dim=-1)
        return (v.flatten(2) @ attn.transpose(1, 2)).view_as(x) + x


@pytest.mark.parametrize("block, words", [
    (SelfAttention2d(8), "attention connects every position"),
    (Functional(lambda x: x.flatten(2).relu().view(x.shape) + x), "reshapes a sequence of positions"),
    (Functional(lambda x: x * x.flatten(2).max(-1).values[..., None, None]), "first extreme"),
    (Functional(lambda x: (x.flatten(2) + torch.ones(144)).mean(-1)[..., None, None] * x),
     "varies over the spatial positions"),
    (Functional(lambda x: x.flatten(1).mean(-1)[..., None, None, None] * x), "mixing space and channels"),
    (Functional(lambda x: x * torch.softmax(x.flatten(2), dim=1).sum(-1)[..., None, None]), None),
])
def test_refused_clearly_or_streamed(block, words):
    net = nn.Sequential(stem(8), block).double()
    x = rand(2, 3, 12, 12)
    if words is None:  # (a softmax over the channels of a sequence is pointwise: it streams)
        check(net, rand(2, 3, 28, 28), 12)
        return
    with pytest.raises(StreamingError, match=words):
        Streaming(net, 8)(x)
