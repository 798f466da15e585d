"""The reference on CuPy arrays gives the NumPy results (skipped without CuPy or a CUDA device).

Same float64 arithmetic on another device: cuBLAS may sum channels in another
order, so 1e-10 relative, as elsewhere.
"""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    _devices = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no runtime: CuPy is installed but unusable
    _devices = 0
if _devices == 0:
    pytest.skip("CuPy is installed but no CUDA device is available", allow_module_level=True)

from reference import conv  # noqa: E402
from reference._xp import array_module  # noqa: E402
from reference.graph import Concat, Residual  # noqa: E402
from reference.layers import Conv, MaxPool, ReLU  # noqa: E402
from reference.streaming import conventional, streamed  # noqa: E402

pytestmark = pytest.mark.gpu


def assert_rel(actual, expected, rtol=1e-10):
    assert isinstance(actual, cupy.ndarray), type(actual)
    actual, expected = cupy.asnumpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= rtol * max(np.abs(expected).max(), 1e-300)


def test_dispatch_picks_cupy():
    assert array_module(cupy.ones(3)) is cupy
    assert array_module(np.ones(3)) is np


def test_eqs_1_5_7_on_cupy_equal_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 13, 11)), rng.standard_normal((4, 3, 3, 2))
    g = rng.standard_normal(conv.forward(x, w, (2, 1), (1, 2)).shape)
    xc, wc, gc = cupy.asarray(x), cupy.asarray(w), cupy.asarray(g)
    assert_rel(conv.forward(xc, wc, (2, 1), (1, 2)), conv.forward(x, w, (2, 1), (1, 2)))
    assert_rel(conv.weight_grad(xc, gc, w.shape, (2, 1), (1, 2)), conv.weight_grad(x, g, w.shape, (2, 1), (1, 2)))
    assert_rel(conv.input_grad(gc, wc, x.shape, (2, 1), (1, 2)), conv.input_grad(g, w, x.shape, (2, 1), (1, 2)))


def test_algorithm1_on_cupy_equals_numpy():
    rng = np.random.default_rng(1)
    w1, b1, w2 = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), rng.standard_normal((2, 4, 3, 3))
    x = rng.standard_normal((1, 3, 40, 36))

    def chain(xp):
        return [Conv(xp.asarray(w1), padding=1, bias=xp.asarray(b1)), ReLU(), MaxPool(2), Conv(xp.asarray(w2), stride=2)]

    r = rng.standard_normal(conventional(chain(np), x, lambda o: o)[0].shape)
    out_n, grads_n, gx_n = conventional(chain(np), x, lambda o: r)
    out_c, grads_c, gx_c = streamed(chain(cupy), cupy.asarray(x), 24, lambda o: cupy.asarray(r))
    assert_rel(out_c, out_n)
    assert_rel(gx_c, gx_n)
    for gc, gn in zip(grads_c, grads_n):
        for name in gn:
            assert_rel(gc[name], gn[name])


def test_graph_blocks_on_cupy_equal_numpy():
    """A residual block and a concatenation through conventional(): CuPy arrays in, CuPy arrays out, NumPy's values."""
    rng = np.random.default_rng(2)
    w1, w2, w3 = rng.standard_normal((3, 3, 3, 3)), rng.standard_normal((3, 3, 3, 3)), rng.standard_normal((2, 3, 1, 1))
    x = rng.standard_normal((1, 3, 20, 18))

    def chain(xp):
        return [Residual([Conv(xp.asarray(w1), padding=1), ReLU(), Conv(xp.asarray(w2), padding=1)], []),
                Concat([MaxPool(3, 1, 1)], [Conv(xp.asarray(w3))])]

    r = rng.standard_normal(conventional(chain(np), x, lambda o: o)[0].shape)
    out_n, grads_n, gx_n = conventional(chain(np), x, lambda o: r)
    out_c, grads_c, gx_c = conventional(chain(cupy), cupy.asarray(x), lambda o: cupy.asarray(r))
    assert_rel(out_c, out_n)
    assert_rel(gx_c, gx_n)
    for gc, gn in zip(grads_c, grads_n):
        assert gc.keys() == gn.keys()
        for name in gn:
            assert_rel(gc[name], gn[name])
