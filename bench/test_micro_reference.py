"""Micro-benchmarks: the NumPy reference's Eqs. 1, 5 and 7 against torch on the same shapes.

Run by ``python -m bench`` through pytest-benchmark (not part of ``make verify``).
Every case first checks that the reference and torch agree (float64, rtol 1e-10,
since both compute the same sums in double precision), so the timings compare
equal work. Readers learn what the reference costs; it is the ground truth, not
the fast path.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

conv = pytest.importorskip("reference.conv", reason="reference/conv.py (helper A) is not importable yet")

# name: (x shape, w shape, stride, dilation)
CASES = {
    "3->8ch 32x32": ((1, 3, 32, 32), (8, 3, 3, 3), 1, 1),
    "8->16ch 33x33 s2 d2": ((1, 8, 33, 33), (16, 8, 3, 3), 2, 2),
    "3->64ch 64x64 (Fig.2 layer 2)": ((1, 3, 64, 64), (64, 3, 3, 3), 1, 1),
}
RTOL = 1e-10


def _arrays(case: str):
    x_shape, w_shape, stride, dilation = CASES[case]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    grad_out = rng.standard_normal(F.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                            stride=stride, dilation=dilation).shape)
    return x, w, grad_out, stride, dilation


def _ops(x, w, g, s, d):
    """op name -> (reference call, torch call), each taking no arguments."""
    xt, wt, gt = map(torch.from_numpy, (x, w, g))
    return {
        "forward (Eq. 1)": (lambda: conv.forward(x, w, stride=s, dilation=d),
                            lambda: F.conv2d(xt, wt, stride=s, dilation=d)),
        "weight_grad (Eq. 5)": (lambda: conv.weight_grad(x, g, w.shape, stride=s, dilation=d),
                                lambda: torch.nn.grad.conv2d_weight(xt, w.shape, gt, stride=s, dilation=d)),
        "input_grad (Eq. 7)": (lambda: conv.input_grad(g, w, x.shape, stride=s, dilation=d),
                               lambda: torch.nn.grad.conv2d_input(x.shape, wt, gt, stride=s, dilation=d)),
    }


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("op", ["forward (Eq. 1)", "weight_grad (Eq. 5)", "input_grad (Eq. 7)"])
@pytest.mark.parametrize("case", list(CASES))
def test_micro(benchmark, case, op, impl):
    ref_call, torch_call = _ops(*_arrays(case))[op]
    np.testing.assert_allclose(np.asarray(ref_call()), torch_call().numpy(), rtol=RTOL, atol=RTOL)
    benchmark.group = f"{op} | {case}"
    benchmark.extra_info.update(case=case, op=op, impl=impl)
    benchmark(ref_call if impl == "reference" else torch_call)
