"""Eqs. 1, 5 and 7 (reference.conv) against oracles nobody here wrote.

Oracles: scipy.signal.correlate (Eq. 1), torch.nn.functional.conv1d/conv2d and
torch autograd (Eqs. 1, 5, 7), and central finite differences (Eqs. 5, 7).
Everything is float64. Tolerance 1e-10 relative to the largest magnitude: the
implementations sum the same products in different orders, which costs a few
ulps per term; 1e-10 leaves four orders of magnitude to spare and still catches
any wrong index, which moves values by O(1).
"""

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

import checks
from reference import conv

RTOL = 1e-10



def assert_rel(actual, expected, rtol=RTOL):
    checks.assert_rel(actual, expected, rtol)


def random_case(seed, ndim):
    """Random shapes, strides and dilations; stride/dilation passed as int or per-axis tuple."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 5, ndim))
    dilation = tuple(int(d) for d in rng.integers(1, 4, ndim))
    stride = tuple(int(s) for s in rng.integers(1, 4, ndim))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    spatial = tuple(int(e + rng.integers(0, 9)) for e in extent)
    n, c_in, c_out = (int(v) for v in rng.integers(1, 4, 3))
    x = rng.standard_normal((n, c_in) + spatial)
    w = rng.standard_normal((c_out, c_in) + kernel)
    as_arg = lambda t: t[0] if len(set(t)) == 1 and rng.random() < 0.5 else t  # noqa: E731
    return x, w, as_arg(stride), as_arg(dilation)


def torch_conv(ndim):
    return F.conv1d if ndim == 1 else F.conv2d


def scipy_forward(x, w, stride, dilation):
    """Eq. 1 via scipy: correlate with a zero-dilated kernel, then keep every s-th output."""
    ndim = x.ndim - 2
    stride = (stride,) * ndim if isinstance(stride, int) else stride
    dilation = (dilation,) * ndim if isinstance(dilation, int) else dilation
    extent = tuple(d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation))
    w_dilated = np.zeros(w.shape[:2] + extent)
    w_dilated[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)] = w
    out = np.stack([
        np.stack([scipy.signal.correlate(x[b], w_dilated[o], mode="valid", method="direct")[0]
                  for o in range(w.shape[0])])
        for b in range(x.shape[0])
    ])
    return out[(Ellipsis,) + tuple(slice(None, None, s) for s in stride)]


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("seed", range(12))
def test_eq1_matches_scipy_correlate(seed, ndim):
    x, w, stride, dilation = random_case(seed, ndim)
    assert_rel(conv.forward(x, w, stride, dilation), scipy_forward(x, w, stride, dilation))


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("seed", range(100, 115))
def test_eq1_eq5_eq7_match_torch_autograd(seed, ndim):
    x, w, stride, dilation = random_case(seed, ndim)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = torch_conv(ndim)(xt, wt, stride=stride, dilation=dilation)
    grad_out = np.random.default_rng(seed + 1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(grad_out))

    assert_rel(conv.forward(x, w, stride, dilation), yt.detach().numpy())
    assert_rel(conv.weight_grad(x, grad_out, w.shape, stride, dilation), wt.grad.numpy())
    assert_rel(conv.input_grad(grad_out, w, x.shape, stride, dilation), xt.grad.numpy())


def test_eq1_as_written_in_1d():
    """(x * w)_k = sum_i w_i x_{k+i}, k = 0..f, f = N - n: written out for one vector."""
    x = np.arange(14.0).reshape(1, 1, 14) ** 1.5
    w = np.array([0.5, -1.0, 2.0]).reshape(1, 1, 3)
    expected = [sum(w[0, 0, i] * x[0, 0, k + i] for i in range(3)) for k in range(14 - 3 + 1)]
    assert_rel(conv.forward(x, w)[0, 0], expected)


def central_differences(f, a, h=1e-6):
    """d f / d a by central differences, element by element (f is a scalar function)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        plus = f()
        a[idx] = old - h
        minus = f()
        a[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


# The loss sum(forward(x, w) * R) is linear in w and in x, so central differences
# have no truncation error; what is left is rounding, ~1e-16 / h = 1e-10 relative.
FD_RTOL = 1e-7

FD_CASES = [
    ((2, 2, 11), (3, 2, 3), 2, 2),
    ((1, 2, 9, 8), (2, 2, 3, 2), (2, 1), (1, 2)),
    ((2, 1, 7, 10), (2, 1, 2, 3), 3, 1),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, dilation", FD_CASES)
def test_eq5_matches_central_differences(x_shape, w_shape, stride, dilation):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    r = rng.standard_normal(conv.forward(x, w, stride, dilation).shape)
    numeric = central_differences(lambda: np.sum(conv.forward(x, w, stride, dilation) * r), w)
    assert_rel(conv.weight_grad(x, r, w.shape, stride, dilation), numeric, FD_RTOL)


@pytest.mark.parametrize("x_shape, w_shape, stride, dilation", FD_CASES)
def test_eq7_matches_central_differences(x_shape, w_shape, stride, dilation):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    r = rng.standard_normal(conv.forward(x, w, stride, dilation).shape)
    numeric = central_differences(lambda: np.sum(conv.forward(x, w, stride, dilation) * r), x)
    assert_rel(conv.input_grad(r, w, x.shape, stride, dilation), numeric, FD_RTOL)


def test_eq7_is_the_full_convolution_of_the_paper_example():
    """Sec. 3.2: flip(w) * [0, 0, dp_0 .. dp_f, 0, 0] for n = 3, stride 1."""
    rng = np.random.default_rng(3)
    w, dp = rng.standard_normal(3), rng.standard_normal(12)
    padded = np.concatenate([[0.0, 0.0], dp, [0.0, 0.0]])
    expected = [sum(w[::-1][j] * padded[i + j] for j in range(3)) for i in range(14)]
    got = conv.input_grad(dp.reshape(1, 1, 12), w.reshape(1, 1, 3), (1, 1, 14))[0, 0]
    assert_rel(got, expected)
    # and Eq. 7 as a sum: dx_i = sum_j w_j dp_{i-j} over valid i - j
    as_sum = [sum(w[j] * dp[i - j] for j in range(3) if 0 <= i - j < 12) for i in range(14)]
    assert_rel(got, as_sum)


def test_unread_inputs_get_zero_gradient():
    """Kernel 3, stride 3 on 13 inputs: 4 outputs read x[0..11]; x[12] is read by none."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 1, 13)), rng.standard_normal((1, 1, 3))
    y = conv.forward(x, w, stride=3)
    assert y.shape == (1, 1, 4)
    dx = conv.input_grad(np.ones_like(y), w, x.shape, stride=3)
    assert dx.shape == x.shape
    assert dx[0, 0, 12] == 0.0
    assert_rel(dx[0, 0, :12], np.tile(w[0, 0], 4))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ndim", [1, 2])
def test_transposed_convolution_matches_torch(seed, ndim):
    """``conv.transposed`` (Eq. 7 as the adjoint of Eq. 1) against torch's conv_transpose."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 5, ndim))
    stride = int(rng.integers(1, 4))
    dilation = int(rng.integers(1, 3))
    padding = int(rng.integers(0, 3))
    output_padding = int(rng.integers(0, max(stride, dilation)))
    x = rng.standard_normal((2, 3) + tuple(int(n) for n in rng.integers(3, 9, ndim)))
    w = rng.standard_normal((3, 2) + kernel)
    ours = conv.transposed(x, w, stride, padding, output_padding, dilation)
    fn = F.conv_transpose1d if ndim == 1 else F.conv_transpose2d
    theirs = fn(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=padding,
                output_padding=output_padding, dilation=dilation).numpy()
    assert ours.shape == theirs.shape
    assert_rel(ours, theirs)
