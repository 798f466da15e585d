"""reference.layers (Conv with padding and bias, ReLU, MaxPool) against torch autograd.

float64; tolerance 1e-10 relative to the largest magnitude (summation order only).
Also checks the tile padding rule: a layer run on a crop with ``pad`` equal to how
far the crop reaches past the image border gives exactly the full result's slice.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checks
from reference.layers import Conv, MaxPool, ReLU

RTOL = 1e-10



def assert_rel(actual, expected, rtol=RTOL):
    checks.assert_rel(actual, expected, rtol)


CONV_CASES = [  # x shape, w shape, stride, dilation, padding
    ((2, 3, 17), (4, 3, 3), 1, 1, 1),
    ((1, 2, 16), (3, 2, 4), 2, 2, 3),
    ((2, 3, 12, 11), (4, 3, 3, 3), 1, 1, 1),
    ((1, 2, 13, 10), (2, 2, 3, 2), (2, 1), (1, 2), (2, 0)),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, dilation, padding", CONV_CASES)
def test_conv_layer_matches_torch(x_shape, w_shape, stride, dilation, padding):
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    layer = Conv(w, stride, dilation, padding, bias=b)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    torch_conv = F.conv1d if len(x_shape) == 3 else F.conv2d
    yt = torch_conv(xt, wt, bt, stride=stride, padding=padding, dilation=dilation)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(g))
    gx, grads = layer.backward(x, g)
    assert_rel(layer.forward(x), yt.detach().numpy())
    assert_rel(gx, xt.grad.numpy())
    assert_rel(grads["w"], wt.grad.numpy())
    assert_rel(grads["b"], bt.grad.numpy())


POOL_CASES = [  # x shape, kernel, stride, padding
    ((2, 3, 17), 2, None, 0),
    ((1, 2, 16), 3, 2, 1),
    ((2, 2, 12, 11), 2, None, 0),
    ((1, 3, 13, 10), (3, 2), (2, 1), (1, 1)),
]


@pytest.mark.parametrize("x_shape, kernel, stride, padding", POOL_CASES)
def test_maxpool_matches_torch(x_shape, kernel, stride, padding):
    x = np.random.default_rng(12).standard_normal(x_shape)
    layer = MaxPool(kernel, stride, padding)
    xt = torch.tensor(x, requires_grad=True)
    pool = F.max_pool1d if len(x_shape) == 3 else F.max_pool2d
    yt = pool(xt, kernel, stride=stride, padding=padding)
    g = np.random.default_rng(13).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(g))
    gx, grads = layer.backward(x, g)
    assert grads == {}
    assert_rel(layer.forward(x), yt.detach().numpy())
    assert_rel(gx, xt.grad.numpy())


def test_maxpool_ties_go_to_the_first_tap_like_torch():
    """ReLU before a pool makes ties (zeros); the gradient must go where torch sends it."""
    x = np.array([[[0.0, 0.0, 1.0, 1.0, -1.0, 0.0, 2.0, 2.0, 2.0]]])
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool1d(xt, 3, stride=2).backward(torch.ones(1, 1, 4, dtype=torch.float64))
    assert_rel(MaxPool(3, 2).backward(x, np.ones((1, 1, 4)))[0], xt.grad.numpy())


def test_relu_matches_torch():
    x = np.random.default_rng(14).standard_normal((2, 3, 9, 7))
    x[0, 0, 0, :3] = 0.0  # torch passes no gradient at exactly 0
    xt = torch.tensor(x, requires_grad=True)
    yt = F.relu(xt)
    g = np.random.default_rng(15).standard_normal(x.shape)
    yt.backward(torch.tensor(g))
    assert_rel(ReLU().forward(x), yt.detach().numpy())
    assert_rel(ReLU().backward(x, g)[0], xt.grad.numpy())


@pytest.mark.parametrize("layer", [
    Conv(np.random.default_rng(16).standard_normal((2, 2, 3)), stride=2, padding=2),
    MaxPool(3, 2, 1),
])
def test_padding_only_where_the_crop_reaches_past_the_border(layer):
    """Output slice [a, b) of the full result from the crop it reads, padded only outside the image."""
    x = np.random.default_rng(17).standard_normal((1, 2, 15))
    full = layer.forward(x)
    (extent, stride, padding), = layer.window(1)
    for a in range(full.shape[-1]):
        for b in range(a + 1, full.shape[-1] + 1):
            lo, hi = a * stride - padding, (b - 1) * stride + extent - padding
            start, stop = max(lo, 0), min(hi, 15)
            pad = ((start - lo, hi - stop),)
            assert max(pad[0]) <= padding
            tile = layer.forward(x[..., start:stop], pad=pad)
            np.testing.assert_array_equal(tile, full[..., a:b])
