"""Algorithm 2 (reference.overlap.algorithm2) agrees with the analytic formulas.

algorithm2 measures: it pushes an all-ones tile through constant kernels and
compares every level with a large image. analytic_invalid and analytic_overlap
only do integer arithmetic on the layer hyper-parameters. They share no code
beyond the layers' (extent, stride, padding), so agreement on many chains and
tile shapes -- aligned to the stride grid and not, padded and valid, 1D and 2D --
is evidence for both. The comparisons are exact integers.
"""

import numpy as np
import pytest

from reference import overlap
from reference.layers import Conv, MaxPool, ReLU


def conv(kernel, c_in=2, c_out=2, **kw):
    return Conv(np.random.default_rng(0).standard_normal((c_out, c_in) + kernel), **kw)


CHAINS = {
    "paper 1D, one conv of 3": [conv((3,))],
    "two valid convs": [conv((3,)), ReLU(), conv((3,))],
    "valid, strided": [conv((3,), stride=2), conv((3,)), MaxPool(2)],
    "same convs and pooling": [conv((3,), padding=1), ReLU(), MaxPool(2), conv((3,), padding=1)],
    "stride, dilation, pool padding": [conv((5,), stride=2, padding=2), ReLU(), conv((3,), dilation=2, padding=1),
                                       MaxPool(3, stride=2, padding=1)],
    "2D mixed": [conv((3, 3), padding=1), ReLU(), MaxPool(2), conv((3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 0)),
                 MaxPool((2, 3), stride=(2, 1), padding=(1, 1))],
    "2D Table 1 style": [conv((3, 3), 3, 4, padding=1), ReLU(), MaxPool(2), conv((3, 3), 4, 4, padding=1), ReLU(),
                         MaxPool(2), conv((3, 3), 4, 4, padding=1), ReLU(), MaxPool(2)],
}


def tile_shapes(layers):
    ndim = 2 if any(getattr(layer, "ndim", None) == 2 for layer in layers) else 1
    sizes = [2 * (f.size + f.offset) + extra for f in overlap.receptive_field(layers) for extra in (0, 1, 3, 6)]
    sizes = sorted(set(sizes))
    return [(t,) for t in sizes] if ndim == 1 else [(t, u) for t, u in zip(sizes, sizes[2:] + sizes[:2])]


@pytest.mark.parametrize("name", CHAINS)
def test_algorithm2_equals_analytic_bands(name):
    """Per level, per axis, per side: the measured invalid bands equal the closed form."""
    layers = CHAINS[name]
    for shape in tile_shapes(layers):
        assert overlap.algorithm2(layers, shape) == overlap.analytic_invalid(layers, shape), shape


@pytest.mark.parametrize("name", CHAINS)
def test_algorithm2_overlap_equals_analytic_overlap(name):
    """On tiles aligned to the stride grid, the overlap Algorithm 2 implies is the analytic one.

    forward: rf - stride whenever padding sits on the stride grid (offset % stride == 0),
    and never less otherwise (a tile starting on the grid then wastes the misaligned rest);
    backward: forward + stride * ((rf - 1) // stride) for valid (unpadded) chains, where
    Algorithm 2's tile and Algorithm 1's tile are the same thing; less with padding (see the
    reference.overlap docstring: Algorithm 1 does not rely on what the padded probe lets through).
    """
    layers = CHAINS[name]
    required = overlap.analytic_overlap(layers)
    fields = overlap.receptive_field(layers)
    for extra in range(4):
        shape = tuple(f.size + f.stride * (-(-(f.size + f.offset) // f.stride) + 1 + extra) for f in fields)  # (T - rf) % stride == 0
        found = overlap.algorithm2(layers, shape)
        assert found.output_stride == tuple(f.stride for f in fields)
        for axis, (f, req) in enumerate(zip(fields, required)):
            assert (req.receptive_field, req.stride, req.offset) == tuple(f)
            if f.offset % f.stride == 0:
                assert found.forward_overlap[axis] == req.forward
            else:
                assert found.forward_overlap[axis] > req.forward
            if f.offset == 0:
                assert found.backward_overlap[axis] == req.backward
            else:  # padding at inner tile sides lends the linear probe extra (real-gradient) outputs
                assert found.backward_overlap[axis] < req.backward


def test_paper_numbers():
    """One conv of n = 3: overlap o = n - 1 = 2 (Sec. 3.1), and n - 1 incomplete input gradients per side (Fig. 1)."""
    layers = CHAINS["paper 1D, one conv of 3"]
    assert overlap.analytic_overlap(layers)[0].forward == 2
    found = overlap.algorithm2(layers, 6)
    assert found.forward_overlap == (2,)
    assert found.forward == (((0, 0),),) * 2  # no padding: every output of a valid conv is valid
    assert found.backward[0] == ((2, 2),)
    # two chained convs of 3 need four values of overlap, not two (Fig. 1 caption)
    assert overlap.analytic_overlap(CHAINS["two valid convs"])[0].forward == 4


def test_receptive_field_of_a_known_chain():
    """conv3 s2 p2 -> conv3 d2 p1 -> pool3 s2 p1: rf = 1 + 4*1 + 4*2 + 2*2 = 17... computed by hand."""
    layers = [conv((5,), stride=2, padding=2), conv((3,), dilation=2, padding=1), MaxPool(3, stride=2, padding=1)]
    # extents 5, 5, 3; strides 2, 1, 2; rf = 1 + 4*1 + 4*2 + 2*2 = 17; offset = 2*1 + 1*2 + 1*2 = 6
    assert tuple(overlap.receptive_field(layers)[0]) == (17, 4, 6)


def test_algorithm2_does_not_change_the_layers():
    layers = CHAINS["same convs and pooling"]
    before = [layer.w.copy() for layer in layers if isinstance(layer, Conv)]
    overlap.algorithm2(layers, 40)
    after = [layer.w for layer in layers if isinstance(layer, Conv)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_maxpool_padding_is_found():
    """A max over ones hides -inf padding; the mean-pool probe must still see it."""
    found = overlap.algorithm2([MaxPool(3, stride=1, padding=1)], 10)
    assert found.forward[1] == ((1, 1),)
    assert found.forward_overlap == (2,)
