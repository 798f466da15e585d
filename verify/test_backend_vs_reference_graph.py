"""The torch backend against the NumPy reference on graphs: residual sums and channel concatenations.

Each network is built twice from one spec and one weight stream
(verify/graph_twins.py): as a chain of ``reference.graph`` blocks and layers, and
as a torch nn.Module whose blocks compute ``a(x) + b(x)`` or
``torch.cat([a(x), b(x)], 1)`` over ``nn.Sequential`` branches. The backend traces
the torch module; the reference knows the blocks. Compared, as in
test_backend_vs_reference.py for chains:

* ``streamcnn.receptive_field(module, ndim)``: size, stride, offset against
  ``reference.overlap.receptive_field`` (the hull over the paths);
* ``streamcnn.receptive_field(module, ndim, tile_size=tile)``: the tile's output
  size and invalid borders against the last level of Algorithm 2
  (``reference.overlap.algorithm2``, an all-ones tile through constant kernels);
* ``streamcnn.Streaming(module, tile)(x)`` and its backward against the
  reference's ordinary backpropagation (``reference.streaming.conventional``) over
  the whole image: float64, 1e-10 relative (the same products summed in other
  orders).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checks
import graph_twins as twins
import reference
import streamcnn

RTOL = 1e-10
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Hand-picked graphs of the kinds real networks use (specs as in graph_twins).
NAMED = {
    "ResNet basic block": [("conv", 3, 3, 1, 1, 1, True),
                           ("residual", [("conv", 3, 3, 1, 1, 1, True), ("conv", 3, 3, 1, 1, 1, False)], [])],
    "ResNet downsampling block": [("residual", [("conv", 4, 3, 2, 1, 1, True), ("conv", 4, 3, 1, 1, 1, False)],
                                   [("conv", 4, 1, 2, 1, 0, False)])],
    "Inception-style concatenation": [("concat", [("conv", 2, 1, 1, 1, 0, True)], [("conv", 2, 3, 1, 1, 1, True)]),
                                      ("concat", [("pool", 3, 1, 1)], [("conv", 2, 5, 1, 1, 2, False)])],
    "DenseNet-style concatenations": [("concat", [], [("conv", 2, 3, 1, 1, 1, True)]),
                                      ("concat", [], [("conv", 2, 3, 1, 1, 1, True)]), ("pool", 2, 2, 0)],
}
IN_CHANNELS = 3


def _twins(spec, c_in, ndim, seed=0):
    return twins.build(spec, c_in, ndim, np.random.default_rng(seed))


def _check_fields(module, chain, ndim):
    for axis, (mine, ref) in enumerate(zip(streamcnn.receptive_field(module, ndim),
                                           reference.overlap.receptive_field(chain, ndim))):
        assert (mine.size, mine.stride, mine.offset) == (ref.size, ref.stride, ref.offset), f"axis {axis}"


def _check_tile_borders(module, chain, ndim, tile):
    found = reference.overlap.algorithm2(chain, (tile,) * ndim)
    for axis, mine in enumerate(streamcnn.receptive_field(module, ndim, tile_size=tile)):
        assert mine.tile_output_size == found.sizes[-1][axis], f"axis {axis}: tile output size"
        assert (mine.invalid_left, mine.invalid_right) == found.forward[-1][axis], f"axis {axis}: invalid bands"
        assert found.output_stride[axis] == mine.stride


def _check_streaming(module, chain, x, tile, rng):
    out_ref = reference.streaming.conventional(chain, x, lambda o: np.ones_like(o))[0]
    grad = rng.standard_normal(out_ref.shape)
    out_ref, weight_grads, x_grad_ref = reference.streaming.conventional(chain, x, lambda o: grad)

    xt = torch.from_numpy(x).requires_grad_(True)
    out = streamcnn.Streaming(module, tile)(xt)
    (out * torch.from_numpy(grad)).sum().backward()

    checks.assert_rel(out.detach().numpy(), out_ref, RTOL, "output")
    checks.assert_rel(xt.grad.numpy(), x_grad_ref, RTOL, "input gradient")
    ours, theirs = twins.conv_grads(chain, weight_grads), twins.torch_convs(module)
    assert len(ours) == len(theirs)
    for i, ((w, b), conv) in enumerate(zip(ours, theirs)):
        checks.assert_rel(conv.weight.grad.numpy(), w, RTOL, f"conv {i} kernel gradient")
        checks.assert_rel(conv.bias.grad.numpy(), b, RTOL, f"conv {i} bias gradient")


def _tile(module, ndim, extra):
    rf = streamcnn.receptive_field(module, ndim)[0]
    return 2 * rf.size + 2 * rf.stride + extra


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("name", NAMED)
def test_named_graphs_backend_equals_reference(name, ndim):
    """Fields, tile borders (Algorithm 2) and streamed training step on hand-picked graphs."""
    module, chain, _ = _twins(NAMED[name], IN_CHANNELS, ndim)
    _check_fields(module, chain, ndim)
    tile = _tile(module, ndim, 1)
    _check_tile_borders(module, chain, ndim, tile)
    rng = np.random.default_rng(1)
    _check_streaming(module, chain, rng.standard_normal((2, IN_CHANNELS) + (2 * tile + 3,) * ndim), tile, rng)


@settings(max_examples=40, **HYPOTHESIS)
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_receptive_field_backend_equals_reference_on_graphs(data, ndim):
    """The backend's receptive field, total stride and padding offset of a traced graph equal the reference's hull."""
    spec, c_in = data.draw(twins.graphs())
    module, chain, _ = _twins(spec, c_in, ndim)
    _check_fields(module, chain, ndim)


@settings(max_examples=40, **HYPOTHESIS)
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_invalid_borders_backend_equal_algorithm2_on_graphs(data, ndim):
    """The backend's invalid borders of an interior tile of a graph equal what Algorithm 2 finds (last level)."""
    spec, c_in = data.draw(twins.graphs())
    module, chain, _ = _twins(spec, c_in, ndim)
    rf = streamcnn.receptive_field(module, ndim)[0]
    _check_tile_borders(module, chain, ndim, _tile(module, ndim, data.draw(st.integers(0, 3 * rf.stride + 4))))


@settings(max_examples=30, **HYPOTHESIS)
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_streaming_graph_equals_reference(data, ndim):
    """Streaming(module, tile)(x) and its backward equal the reference's ordinary backprop on the whole image."""
    spec, c_in = data.draw(twins.graphs())
    module, chain, _ = _twins(spec, c_in, ndim, data.draw(st.integers(0, 2**32 - 1)))
    tile = _tile(module, ndim, data.draw(st.integers(0, 6)))
    length = data.draw(st.integers(tile + 1, 3 * tile))  # several tiles, sizes off the stride grid
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _check_streaming(module, chain, rng.standard_normal((2, c_in) + (length,) * ndim), tile, rng)
