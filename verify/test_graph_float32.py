"""Float32 streaming is as accurate as conventional float32, with a float64 run as the truth.

Why not a fixed float32 tolerance: a max-pool's argmax flips under any change of
summation order whenever two candidates of a window lie within rounding of each
other, and a flip sends a whole gradient entry to another pixel (a ReLU whose
input rounds across zero does the same). So two float32 runs of a deep network
differ by ~1e-3 and more in their gradients even without streaming, and which
windows flip depends on the kernels torch picks for each shape and layout.

So each test runs the same weights and input three ways: in float64 (the truth);
conventionally in float32, in both of torch's memory layouts (contiguous and
channels-last: different kernels, different summation orders, both correct float32
computations), whose larger error is conventional float32's own error; and
streamed in float32. For the output, the input gradient and every parameter
gradient, streaming's error must be at most ``FACTOR`` times conventional float32's
own error (or float32's epsilon, if larger). Errors are relative to the largest
magnitude (``streamcnn.testing.rel_err``). On this machine streaming's errors were
at most 2.3x the conventional ones (12 seeds, two tile sizes; flips or not).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import models
import streamcnn
from bench.models import resnet_front
from streamcnn.testing import rel_err

FACTOR = 4
EPS32 = torch.finfo(torch.float32).eps
# VGG-16's layout ("D") through its fourth pooling stage at 1/8 of its width: ten 3x3
# convolutions, each followed by a ReLU, and a 2x2 max-pool after the ReLU ending each stage
DEEP_STACK = (8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M")


def run(model: nn.Module, params: list, x: torch.Tensor, grad_out: torch.Tensor,
        channels_last: bool = False) -> list:
    """[output, input gradient, gradients of ``params``] of one forward and backward."""
    for p in params:
        p.grad = None
    xi = x.detach().clone().requires_grad_()
    inp = xi.contiguous(memory_format=torch.channels_last) if channels_last else xi.clone()
    y = model(inp)
    y.backward(grad_out)
    return [y.detach(), xi.grad] + [p.grad.clone() for p in params]


def check_float32(net32: nn.Module, shape: tuple, extra: int, seed: int):
    """Streaming's float32 error within FACTOR of conventional float32's (see module doc)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out_shape = net32(x).shape
    g = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1))
    net64 = copy.deepcopy(net32).double()
    truth = run(net64, list(net64.parameters()), x.double(), g.double())
    names, params = zip(*net32.named_parameters())
    names = ["output", "input grad", *names]

    def errors(results):
        return [rel_err(r.double(), t) for r, t in zip(results, truth)]

    own = [max(a, b, EPS32) for a, b in zip(errors(run(net32, params, x, g)),
                                            errors(run(net32, params, x, g, True)))]
    tile = tuple(rf.min_tile_size + extra for rf in streamcnn.receptive_field(net32, 2))
    assert streamcnn.plan(net32, shape, tile).num_tiles > 1, "test bug: a single tile"
    streamed = errors(run(streamcnn.Streaming(net32, tile), params, x, g))
    worse = {n: f"{s:.1e} vs {c:.1e}" for n, s, c in zip(names, streamed, own) if s > FACTOR * c}
    assert not worse, f"streamed float32 error vs conventional float32's own error: {worse}"


@pytest.mark.parametrize("seed,extra", [(0, 0), (1, 0), (2, 21)])
def test_deep_stack_with_max_pools_after_relus(seed, extra):
    """A plain stack; 173x161 images, tiles of the minimum (106) or 127 pixels."""
    net = models.vgg_front(DEEP_STACK, batch_norm=False, seed=seed).float().eval()
    check_float32(net, (2, 3, 173, 161), extra, seed)


def test_resnet_front_float32():
    """A residual graph: ResNet-18's geometry through layer2 (max-pool after the stem's
    ReLU, frozen BatchNorm) at 1/8 width; 131x125 images, minimum tiles (106)."""
    sample = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(99))
    net = resnet_front((2, 2), width=8, through="layer2")
    net = models.frozen(net, sample).float()
    check_float32(net, (2, 3, 131, 125), 0, 3)
