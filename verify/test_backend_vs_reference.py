"""The torch backend against the NumPy reference: Algorithm 1 and Algorithm 2.

The two were written independently (``streamcnn`` tracks valid intervals through
unmodified torch modules; ``reference`` computes exact ranges with Eqs. 1, 5, 7),
so agreement here is evidence about both. Chains are drawn at random (seeded by
hypothesis) from conv / ReLU / max-pool with strides, padding and dilation.

Tolerance: float64, 1e-10 relative. Both sides sum the same products in different
orders (im2col/BLAS vs a loop over kernel taps), so they differ by rounding only:
about 1e-15 relative per operation, far below 1e-10.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import checks
import reference
import streamcnn
from reference import layers as ref_layers

RTOL = 1e-10



def _close(actual, expected, what):
    checks.assert_rel(actual, expected, RTOL, what)


@st.composite
def chains(draw, ndim):
    """A chain of 1-4 windowed layers (conv or max-pool, ReLU after convs) as twin torch/reference lists."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    conv_cls, pool_cls = (nn.Conv1d, nn.MaxPool1d) if ndim == 1 else (nn.Conv2d, nn.MaxPool2d)
    torch_layers, ref_chain, channels = [], [], draw(st.integers(1, 3))
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()) or not ref_chain:
            k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            p = draw(st.integers(0, (d * (k - 1) + 1) // 2))
            c_out = draw(st.integers(1, 3))
            w = rng.standard_normal((c_out, channels) + (k,) * ndim)
            b = rng.standard_normal(c_out)
            conv = conv_cls(channels, c_out, k, stride=s, padding=p, dilation=d).double()
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w))
                conv.bias.copy_(torch.from_numpy(b))
            torch_layers += [conv, nn.ReLU()]
            ref_chain += [ref_layers.Conv(w, stride=s, dilation=d, padding=p, bias=b), ref_layers.ReLU()]
            channels = c_out
        else:
            k = draw(st.integers(2, 3))
            s = draw(st.integers(1, k))
            p = draw(st.integers(0, k // 2))
            torch_layers.append(pool_cls(k, stride=s, padding=p))
            ref_chain.append(ref_layers.MaxPool(k, stride=s, padding=p))
    return nn.Sequential(*torch_layers), ref_chain, channels


def _in_channels(module):
    return next(m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))).in_channels


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_algorithm1_backend_equals_reference(data, ndim):
    """Streaming(module)(x) and its backward equal reference.streaming.streamed (Algorithm 1)."""
    module, ref_chain, _ = data.draw(chains(ndim))
    rf = streamcnn.receptive_field(module, ndim)[0]
    # a tile that both implementations accept (the reference also bounds its larger backward crops)
    tile = 2 * rf.size + 2 * rf.stride + data.draw(st.integers(0, 6))
    length = data.draw(st.integers(tile + 1, 3 * tile))  # several tiles, sizes off the stride grid
    shape = (2, _in_channels(module)) + (length,) * ndim
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape)
    out_ref_conv = reference.streaming.conventional(ref_chain, x, lambda o: np.ones_like(o))[0]
    grad = rng.standard_normal(out_ref_conv.shape)

    out_ref, wgrads_ref, xgrad_ref = reference.streaming.streamed(ref_chain, x, tile, lambda o: grad)

    xt = torch.from_numpy(x).requires_grad_(True)
    out = streamcnn.Streaming(module, tile)(xt)
    (out * torch.from_numpy(grad)).sum().backward()

    _close(out.detach().numpy(), out_ref, "output")
    _close(xt.grad.numpy(), xgrad_ref, "input gradient")
    convs = [m for m in module if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    ref_convs = [g for layer, g in zip(ref_chain, wgrads_ref) if isinstance(layer, ref_layers.Conv)]
    assert len(convs) == len(ref_convs)
    for i, (conv, g) in enumerate(zip(convs, ref_convs)):
        _close(conv.weight.grad.numpy(), g["w"], f"conv {i} kernel gradient")
        _close(conv.bias.grad.numpy(), g["b"], f"conv {i} bias gradient")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_receptive_field_backend_equals_reference(data, ndim):
    """The backend's analytic receptive field, total stride and padding offset equal the reference's."""
    module, ref_chain, _ = data.draw(chains(ndim))
    for axis, (mine, ref) in enumerate(zip(streamcnn.receptive_field(module, ndim),
                                           reference.overlap.receptive_field(ref_chain, ndim))):
        assert (mine.size, mine.stride, mine.offset) == (ref.size, ref.stride, ref.offset), f"axis {axis}"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_invalid_borders_backend_equal_algorithm2(data, ndim):
    """The backend's analytic invalid borders of an interior tile equal what Algorithm 2 finds.

    Algorithm 2 (reference.overlap.algorithm2) pushes an all-ones tile through constant
    kernels and compares with a large image; the backend derives the same bands from
    the layer hyper-parameters by interval arithmetic. Compared at the last layer's output.
    """
    module, ref_chain, _ = data.draw(chains(ndim))
    rf = streamcnn.receptive_field(module, ndim)[0]
    tile = 2 * rf.size + 2 * rf.stride + data.draw(st.integers(0, 3 * rf.stride + 4))
    found = reference.overlap.algorithm2(ref_chain, (tile,) * ndim)
    for axis, mine in enumerate(streamcnn.receptive_field(module, ndim, tile_size=tile)):
        assert mine.tile_output_size == found.sizes[-1][axis], f"axis {axis}: tile output size"
        assert (mine.invalid_left, mine.invalid_right) == found.forward[-1][axis], f"axis {axis}: invalid bands"
        assert found.output_stride[axis] == mine.stride


def test_paper_fig1_example():
    """The paper's 1D example (Fig. 1): 14 values, kernel 3, three tiles of 6 overlapping by n - 1 = 2."""
    rng = np.random.default_rng(14)
    w, b, x, grad = rng.standard_normal((1, 1, 3)), rng.standard_normal(1), rng.standard_normal((1, 1, 14)), rng.standard_normal((1, 1, 12))
    module = nn.Sequential(nn.Conv1d(1, 1, 3)).double()
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(w))
        module[0].bias.copy_(torch.from_numpy(b))
    ref_chain = [ref_layers.Conv(w, bias=b)]

    the_plan = streamcnn.plan(module, (1, 1, 14), 6)
    assert the_plan.tiles_per_axis == (3,) and the_plan.overlap == (2,)
    assert reference.overlap.analytic_overlap(ref_chain)[0].forward == 2

    out_ref, wgrads_ref, xgrad_ref = reference.streaming.streamed(ref_chain, x, 6, lambda o: grad)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = streamcnn.Streaming(module, 6)(xt)
    (out * torch.from_numpy(grad)).sum().backward()
    _close(out.detach().numpy(), out_ref, "output")
    _close(xt.grad.numpy(), xgrad_ref, "input gradient")
    _close(module[0].weight.grad.numpy(), wgrads_ref[0]["w"], "kernel gradient")
