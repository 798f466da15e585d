"""Algorithm 1 (reference.streaming.streamed) equals ordinary backprop and torch autograd.

Ordinary backprop is our own reference.streaming.conventional (Eqs. 1, 5, 7 on the
whole image, proved in test_reference_conv.py); torch autograd is the outside oracle.

Chains of Conv (stride, dilation, padding, bias) / ReLU / MaxPool (stride,
padding), in 1D and 2D, float64, for several tile sizes. The loss is
sum(output * R) for a random R (so dLoss/dOutput = R) or a non-linear one.
Tolerance 1e-10 relative to the largest magnitude: streaming sums the kernel
gradient tile by tile (Eq. 6), a different order than one big sum; everything
else is the same products in the same order, and the outputs must agree exactly.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checks
from reference import overlap, tiling
from reference.layers import Conv, MaxPool, ReLU
from reference.streaming import conventional, streamed

RTOL = 1e-10



def assert_rel(actual, expected, rtol=RTOL):
    checks.assert_rel(actual, expected, rtol)


def chain_2d(rng):
    return [
        Conv(rng.standard_normal((4, 3, 3, 3)), padding=1, bias=rng.standard_normal(4)), ReLU(), MaxPool(2),
        Conv(rng.standard_normal((5, 4, 3, 2)), stride=(2, 1), dilation=(1, 2), padding=(1, 0)), ReLU(),
        MaxPool(3, stride=2, padding=1),
        Conv(rng.standard_normal((2, 5, 2, 2)), bias=rng.standard_normal(2)),
    ]


def chain_1d(rng):
    return [
        Conv(rng.standard_normal((3, 2, 5)), stride=2, padding=2), ReLU(),
        Conv(rng.standard_normal((4, 3, 3)), dilation=2, padding=1, bias=rng.standard_normal(4)), ReLU(),
        MaxPool(3, stride=2, padding=1),
        Conv(rng.standard_normal((2, 4, 3))),
    ]


def torch_run(layers, x, r):
    """The same chain in torch; returns output, per-layer parameter grads and the input grad."""
    xt = torch.tensor(x, requires_grad=True)
    ndim = x.ndim - 2
    params, y = [], xt
    for layer in layers:
        if isinstance(layer, Conv):
            wt = torch.tensor(layer.w, requires_grad=True)
            bt = None if layer.b is None else torch.tensor(layer.b, requires_grad=True)
            y = (F.conv1d if ndim == 1 else F.conv2d)(y, wt, bt, stride=layer.stride, padding=layer.padding,
                                                       dilation=layer.dilation)
            params.append({"w": wt} if bt is None else {"w": wt, "b": bt})
        elif isinstance(layer, ReLU):
            y = F.relu(y)
            params.append({})
        else:
            k, s, p = zip(*layer.window(ndim))
            y = (F.max_pool1d if ndim == 1 else F.max_pool2d)(y, k, stride=s, padding=p)
            params.append({})
    y.backward(torch.tensor(r))
    return y.detach().numpy(), [{k: v.grad.numpy() for k, v in p.items()} for p in params], xt.grad.numpy()


def assert_same_result(a, b, exact_output=True):
    (out_a, grads_a, gx_a), (out_b, grads_b, gx_b) = a, b
    if exact_output:
        np.testing.assert_array_equal(out_a, out_b)
    else:
        assert_rel(out_a, out_b)
    assert_rel(gx_a, gx_b)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert_rel(ga[name], gb[name])


@pytest.mark.parametrize("tile_size", [(40, 28), (47, 33), (56, 100), (100, 100)])
def test_algorithm1_2d_equals_conventional_and_torch(tile_size):
    rng = np.random.default_rng(0)
    layers, x = chain_2d(rng), rng.standard_normal((2, 3, 61, 47))
    r = rng.standard_normal(conventional(layers, x, lambda o: o)[0].shape)
    record = []
    result = streamed(layers, x, tile_size, lambda out: r, record=record)
    assert_same_result(result, conventional(layers, x, lambda out: r))
    assert_same_result(result, torch_run(layers, x, r), exact_output=False)
    if tile_size != (100, 100):
        assert len(record) > 1, "the test must actually stream"
    for entry in record:
        assert all(t.size <= ts for t, ts in zip(entry["tile"], tile_size))


@pytest.mark.parametrize("tile_size", [49, 60, 90, 400])
def test_algorithm1_1d_equals_conventional_and_torch(tile_size):
    rng = np.random.default_rng(1)
    layers, x = chain_1d(rng), rng.standard_normal((2, 2, 203))
    r = rng.standard_normal(conventional(layers, x, lambda o: o)[0].shape)
    result = streamed(layers, x, tile_size, lambda out: r)
    assert_same_result(result, conventional(layers, x, lambda out: r))
    assert_same_result(result, torch_run(layers, x, r), exact_output=False)


def test_algorithm1_with_a_nonlinear_loss():
    """grad_fn sees the stitched output (lines 9-11), e.g. loss = sum(sin(out)) * mean(out)."""
    rng = np.random.default_rng(2)
    layers, x = chain_2d(rng), rng.standard_normal((1, 3, 40, 40))

    def grad_fn(out):
        return np.cos(out) * out.mean() + np.sin(out).sum() / out.size

    assert_same_result(streamed(layers, x, (40, 30), grad_fn), conventional(layers, x, grad_fn))


def test_paper_example_three_tiles():
    """A vector of 14, one kernel of 3, three tiles (Fig. 1)."""
    rng = np.random.default_rng(3)
    layers, x = [Conv(rng.standard_normal((1, 1, 3)))], rng.standard_normal((1, 1, 14))
    r = rng.standard_normal((1, 1, 12))
    record = []
    result = streamed(layers, x, 8, lambda out: r, record=record)
    assert [e["tile"][0].out for e in record] == [(0, 4), (4, 8), (8, 12)]
    assert [e["tile"][0].forward[0] for e in record] == [(0, 6), (4, 10), (8, 14)]  # overlap o = n - 1 = 2
    assert_same_result(result, conventional(layers, x, lambda out: r))
    assert_same_result(result, torch_run(layers, x, r), exact_output=False)


def test_every_tile_output_is_a_slice_of_the_full_output():
    rng = np.random.default_rng(4)
    layers, x = chain_2d(rng), rng.standard_normal((1, 3, 50, 45))
    full = conventional(layers, x, lambda o: o)[0]
    record = []
    streamed(layers, x, (40, 30), lambda out: out, record=record)
    for entry in record:
        box = (Ellipsis,) + tuple(slice(*t.out) for t in entry["tile"])
        np.testing.assert_array_equal(entry["output"], full[box])


@pytest.mark.parametrize("make, shape", [(chain_1d, (1, 2, 600)), (chain_2d, (1, 3, 500, 400))])
def test_interior_tiles_overlap_as_analytic_overlap_says(make, shape):
    """Neighbouring tiles away from the border overlap by analytic_overlap: forward and backward."""
    layers = make(np.random.default_rng(5))
    ndim = len(shape) - 2
    required = overlap.analytic_overlap(layers)
    for axis in range(ndim):
        chain = [layer.window(ndim)[axis] for layer in layers]
        tiles = tiling.plan_axis(chain, shape[2 + axis], 64)
        interior = [(a, b) for a, b in zip(tiles, tiles[1:])
                    if not any(map(any, a.backward_pad + b.backward_pad))]
        assert interior, "the test needs tiles away from the border"
        for a, b in interior:
            assert a.forward[0][1] - b.forward[0][0] == required[axis].forward
            assert a.backward[0][1] - b.backward[0][0] == required[axis].backward
