"""Every kind of supported operation, streamed against conventional autograd (float64,
1e-10 relative: the same sums in another order), each inside a small residual graph so
that it also meets a merge. The models in test_graph_models.py cover whole networks;
this file covers the operations those networks happen not to use."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn

F64 = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.")


class Op(nn.Module):
    """conv -> ``fn`` -> conv, plus a shortcut from the first conv (a merge)."""

    def __init__(self, fn, cin=4, cmid=4):
        super().__init__()
        self.fn = fn
        self.a = nn.Conv2d(3, cin, 3, padding=1)
        self.b = nn.Conv2d(cmid, cin, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        return h + self.b(self.fn(h))


def cat_chunks(h):
    a, b = torch.chunk(h, 2, dim=1)
    return torch.cat([b, F.relu(a)], 1)


def cat_split(h):
    a, b, c = h.split([1, 2, 1], dim=1)
    return torch.cat([c * 2, a, torch.sigmoid(b)], dim=1)


class ChannelScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2, 4).view(4, 1, 1))

    def forward(self, h):
        return self.gamma * h - h.mean(1, keepdim=True)  # a per-position mean over channels


class KeywordConv(nn.Module):
    """A layer called with its input by keyword."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, h):
        return self.conv(input=h)


def add_in_place(h):
    """A wider map added to ``h`` in place, and ``h`` used afterwards by its old name (fx
    records that use as the earlier node): it reads the sum, so it depends on the wider
    map's receptive field too."""
    h.add_(F.max_pool2d(h.clone(), 5, 1, 2))  # (max-pool saves the clone, not h)
    return torch.tanh(h)


OPS = {
    "chunk and cat": (cat_chunks, 4),
    "split and cat": (cat_split, 4),
    "channel slice": (lambda h: torch.cat([h[:, :2], h[:, 2:] * 3], 1), 4),
    "zero pad then valid conv": (nn.Sequential(nn.ZeroPad2d((2, 0, 1, 1)), nn.Conv2d(4, 4, (3, 3),
                                                                                   padding=(0, 0))), 4),
    "F.pad asymmetric": (lambda h: F.avg_pool2d(F.pad(h, (1, 0, 0, 1)), 2, stride=1), 4),
    "softmax over channels": (lambda h: F.softmax(h, dim=1) * h, 4),
    "local response norm": (nn.LocalResponseNorm(3), 4),
    "layer scale and channel mean": (ChannelScale(), 4),
    "channels-last norm and linear": (lambda h: F.linear(F.layer_norm(h.permute(0, 2, 3, 1), (4,)),
                                                         torch.eye(4, dtype=h.dtype) * 2).permute(0, 3, 1, 2), 4),
    "functional conv, same padding": (lambda h: F.conv2d(h, torch.ones(4, 1, 3, 2, dtype=h.dtype) / 6,
                                                         padding="same", groups=4), 4),
    "transpose and back": (lambda h: h.transpose(1, 3).relu().transpose(1, 3), 4),
    "clamp and pow": (lambda h: h.clamp(-1, 1).pow(2) - 0.5, 4),
    "multiply two branches": (lambda h: torch.sigmoid(h) * F.max_pool2d(h, 3, 1, 1), 4),
    # operations whose arguments were once misread (each binds as torch binds it)
    "clamp with a feature-map bound": (lambda h: torch.clamp(h, min=F.max_pool2d(h, 5, 1, 2) - 1), 4),
    "clamp_ with feature-map bounds": (lambda h: h.clone().clamp_(F.avg_pool2d(h, 3, 1, 1),
                                                                 max=F.max_pool2d(h, 5, 1, 2)), 4),
    "elementwise torch.max of two maps": (lambda h: torch.max(h, F.avg_pool2d(h, 3, 1, 1)), 4),
    "channel max and argmax (CBAM)": (lambda h: h * torch.sigmoid(
        torch.max(h, dim=1, keepdim=True)[0] + h.min(1, True).indices.to(h.dtype)), 4),
    "max over channels, .values": (lambda h: h - h.max(dim=1, keepdim=True).values, 4),
    "norm with p positional, over channels": (lambda h: h / (h.norm(2, 1, keepdim=True) + 1), 4),
    "std by name, over channels": (lambda h: h / (h.std(dim=1, keepdim=True, unbiased=False) + 1), 4),
    "batch reduction without keepdim": (lambda h: h + h.sum(0) - h.amax(0, keepdim=True), 4),
    "where with feature maps": (lambda h: torch.where(h > 0, h, F.max_pool2d(h, 3, 1, 1)), 4),
    "conv called by keyword": (KeywordConv(), 4),
    "in-place add of a wider map": (add_in_place, 4),
    "batch and channel counts as scalars": (lambda h: h * h.size(1) ** -0.5 + h / h.shape[0], 4),
    "one channel broadcast over per-channel constants": (lambda h: h + h.mean(1, keepdim=True) * torch.linspace(
        0.5, 2, 4, dtype=h.dtype).view(4, 1, 1), 4),
    "numpy's names axis and keepdims": (lambda h: torch.concatenate(
        [h, h - h.mean(axis=1, keepdims=True)], axis=1), 8),
}


class NotDifferentiable(nn.Module):
    """An output that depends on the input, but not differentiably: through a comparison
    and a detached branch. Conventional autograd gives the input (and the first conv) no
    gradient at all, not a zero one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.b((self.a(x) > 0).to(x.dtype)) + self.c(x.detach())


def test_no_gradient_where_the_output_is_not_differentiable_in_the_input():
    torch.manual_seed(0)
    net = NotDifferentiable().double()
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    assert streamcnn.testing.compare(net, x, 12, paths=streamcnn.testing.ALL_PATHS).worst <= F64


@pytest.mark.parametrize("name", sorted(OPS))
def test_operation_streams_exactly(name):
    fn, cmid = OPS[name]
    torch.manual_seed(0)
    net = nn.Sequential(Op(fn, cmid=cmid)).double().eval()
    rf = streamcnn.receptive_field(net, 2, channels=3)
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    for extra in (0, 9):
        tile = tuple(r.min_tile_size + extra for r in rf)
        assert streamcnn.plan(net, x.shape, tile).num_tiles > 1
        assert streamcnn.testing.compare(net, x, tile).worst <= F64, (name, tile)
