"""The one closeness check the equivalence proofs share."""
import numpy as np


def assert_rel(actual, expected, rtol, what="values"):
    """Max |actual - expected| <= rtol * max |expected|, with equal shapes.

    Relative to the largest expected magnitude, so entries that cancel to near zero
    are judged on the scale of the computation that produced them.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    err = np.abs(actual - expected).max(initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"
