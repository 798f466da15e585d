"""Graph blocks (reference.graph: Residual, Concat) against torch autograd and finite differences.

Oracles, none of them our code: torch's own conv / max-pool / ReLU, ``+`` and
``torch.cat`` with torch autograd on the same network written as an nn.Module
(verify/graph_twins.py builds both from one spec and one weight stream), and
central finite differences of the loss.

Tolerances: float64, 1e-10 relative against torch (the same products summed in a
different order; ~1e-15 per operation). Finite differences: 1e-7 relative; the
loss is piecewise linear in x and in each kernel (convolutions, sums, ReLU, max),
so away from kinks the central difference is exact up to rounding,
~ eps * |loss| / h = 1e-16 * 10 / 1e-6 = 1e-9 relative to gradients of order 1.
"""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checks
import graph_twins as twins
from reference import overlap
from reference.graph import Concat, Residual
from reference.layers import Conv, MaxPool, ReLU
from reference.streaming import conventional
from test_reference_conv import central_differences

RTOL = 1e-10


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_blocks_equal_torch_autograd(data, ndim):
    """conventional() through a chain with residual and concatenation blocks equals torch autograd:
    output, input gradient, and every convolution's kernel and bias gradients."""
    spec, c_in = data.draw(twins.graphs())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    module, chain, _ = twins.build(spec, c_in, ndim, rng)
    field = overlap.receptive_field(chain, ndim)[0]
    length = field.size + data.draw(st.integers(0, 2 * field.stride + 3))
    x = rng.standard_normal((2, c_in) + (length,) * ndim)
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = module(xt)
    r = rng.standard_normal(tuple(out_t.shape))
    out_t.backward(torch.from_numpy(r))

    out, weight_grads, x_grad = conventional(chain, x, lambda o: r)
    checks.assert_rel(out, out_t.detach().numpy(), RTOL, "output")
    checks.assert_rel(x_grad, xt.grad.numpy(), RTOL, "input gradient")
    ours, theirs = twins.conv_grads(chain, weight_grads), twins.torch_convs(module)
    assert len(ours) == len(theirs)
    for i, ((w, b), conv) in enumerate(zip(ours, theirs)):
        checks.assert_rel(w, conv.weight.grad.numpy(), RTOL, f"conv {i} kernel gradient")
        checks.assert_rel(b, conv.bias.grad.numpy(), RTOL, f"conv {i} bias gradient")


def _fd_chain(rng):
    """A residual block (conv-ReLU-conv beside the identity), then a concatenation of a strided conv and a pool."""
    return [
        Conv(rng.standard_normal((2, 2, 3))),
        Residual([Conv(rng.standard_normal((3, 2, 3)), padding=1), ReLU(), Conv(rng.standard_normal((2, 3, 3)), padding=1)], []),
        Concat([Conv(rng.standard_normal((2, 2, 3)), stride=2, padding=1)], [MaxPool(3, 2, 1)]),
    ]


def test_blocks_equal_finite_differences():
    """dLoss/dx and the kernel gradients inside both kinds of block, against central differences."""
    rng = np.random.default_rng(7)
    chain, x = _fd_chain(rng), rng.standard_normal((1, 2, 11))
    r = rng.standard_normal(conventional(chain, x, lambda o: o)[0].shape)
    _, weight_grads, x_grad = conventional(chain, x, lambda o: r)

    def loss():
        return float((conventional(chain, x, lambda o: o)[0] * r).sum())

    checks.assert_rel(x_grad, central_differences(loss, x), 1e-7, "input gradient")
    kernels = {"a.0.w": chain[1].branches[0][0].w, "a.2.w": chain[1].branches[0][2].w}
    for name, w in kernels.items():
        checks.assert_rel(weight_grads[1][name], central_differences(loss, w), 1e-7, f"residual {name}")
    checks.assert_rel(weight_grads[2]["a.0.w"], central_differences(loss, chain[2].branches[0][0].w), 1e-7,
                      "concat a.0.w")


def test_gradient_names_follow_the_branches():
    """Parameter gradients are named branch.layer.parameter, nested blocks included; pools and ReLUs have none."""
    rng = np.random.default_rng(8)
    inner = Concat([Conv(rng.standard_normal((1, 2, 1)))], [])
    block = Residual([Conv(rng.standard_normal((2, 2, 3)), padding=1, bias=rng.standard_normal(2)), ReLU()],
                     [inner, Conv(rng.standard_normal((2, 3, 1)))])
    x = rng.standard_normal((1, 2, 6))
    _, grads = block.backward(x, np.ones((1, 2, 6)))
    assert set(grads) == {"a.0.w", "a.0.b", "b.0.a.0.w", "b.1.w"}
    assert block.has_params and not Residual([MaxPool(3, 1, 1)], [ReLU()]).has_params
    assert block.param_grads(x, np.ones((1, 2, 6))).keys() == grads.keys()


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_receptive_field_is_the_hull_of_what_torch_reads(data, ndim):
    """receptive_field on a graph: output k reads exactly [k*stride - offset, k*stride - offset + size) at its ends.

    Oracle: torch autograd on the twin network made positive and linear (weights > 0,
    no ReLU, average pools over the max-pools' windows), where an output depends
    on exactly the inputs its windows read; the first and last such input must be
    the ends of the hull.
    """
    spec, c_in = data.draw(twins.graphs())
    module, chain, _ = twins.build(spec, c_in, ndim, np.random.default_rng(0), positive_linear=True)
    fields = overlap.receptive_field(chain, ndim)
    length = max(2 * (f.size + f.offset) + 2 * f.stride for f in fields)
    x = torch.ones((1, c_in) + (length,) * ndim, dtype=torch.float64, requires_grad=True)
    out = module(x)
    middle = tuple(n // 2 for n in out.shape[2:])
    out[(0, slice(None)) + middle].sum().backward()  # every channel: a concatenation keeps its paths apart
    read = x.grad[0].abs().sum(0).numpy() > 0
    for axis, (f, k) in enumerate(zip(fields, middle)):
        positions = np.flatnonzero(read.any(axis=tuple(a for a in range(ndim) if a != axis)))
        assert 0 < k * f.stride - f.offset and k * f.stride - f.offset + f.size < length, "the test needs an interior output"
        assert (positions[0], positions[-1] + 1) == (k * f.stride - f.offset, k * f.stride - f.offset + f.size), axis


def test_hull_takes_offset_and_reach_from_different_paths():
    """Paths on one grid that reach out differently: the block's field is the hull (worked by hand).

    Path a, conv 3 stride 2 padding 1: output k reads [2k - 1, 2k + 2). Path b, max-pool
    2 stride 2: [2k, 2k + 2). Hull [2k - 1, 2k + 2): size 3, offset 1 (from a), right end
    from both. With path b a conv 4, stride 2, padding 1 ([2k - 1, 2k + 3)), the right
    end comes from b: size 4.
    """
    a = [Conv(np.ones((1, 1, 3)), stride=2, padding=1)]
    assert tuple(overlap.receptive_field([Residual(a, [MaxPool(2)])], 1)[0]) == (3, 2, 1)
    assert tuple(overlap.receptive_field([Residual(a, [Conv(np.ones((1, 1, 4)), stride=2, padding=1)])], 1)[0]) == (4, 2, 1)
