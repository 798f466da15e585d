"""Algorithm 2 (reference.overlap.algorithm2) agrees with the analytic formulas.

algorithm2 measures: it pushes an all-ones tile through constant kernels and
compares every level with a large image. analytic_invalid and analytic_overlap
only do integer arithmetic on the layer hyper-parameters. They share no code
beyond the layers' (extent, stride, padding), so agreement on many chains and
tile shapes -- aligned to the stride grid and not, padded and valid, 1D and 2D --
is evidence for both. Neither is an outside oracle: the closed form is ours, as
is Algorithm 2's code. The comparisons are exact integers.

Graphs (reference.graph blocks, drawn at random by verify/graph_twins.py): the
closed form takes the wider path's band at each block; it must equal Algorithm 2
where every layer reads all of its input, and never be narrower anywhere (see the
reference.overlap docstring). The hull receptive field of a graph is checked
against what torch autograd says an output reads in test_reference_graph.py.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graph_twins as twins
from reference import overlap
from reference.graph import Concat, Residual
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


# ---------------------------------------------------------------- graphs (reference.graph blocks)
GRAPHS = {
    "residual, identity beside conv-ReLU-conv": [conv((3,), padding=1), ReLU(),
                                                 Residual([conv((3,), padding=1), ReLU(), conv((3,), padding=1)], [])],
    "residual, downsampling (1x1 stride-2 shortcut)": [Residual([conv((3,), stride=2, padding=1), ReLU(), conv((3,), padding=1)],
                                                                [conv((1,), stride=2)])],
    "residual of valid convs": [Residual([conv((3,)), conv((3,), dilation=2)], [conv((7,))]), MaxPool(2)],
    "concatenations, inception style": [Concat([conv((1,))], [conv((3,), padding=1)]), ReLU(),
                                        Concat([MaxPool(3, stride=1, padding=1)], [conv((5,), 4, 2, padding=2)])],
    "nested blocks": [Residual([Concat([conv((3,), padding=1)], []), conv((1,), 4, 2)], [MaxPool(3, stride=1, padding=1)]),
                      conv((3,), stride=2)],
    "2D residual and concatenation": [conv((3, 3), padding=1),
                                      Residual([conv((3, 3), stride=2, padding=1), ReLU(), conv((3, 1), padding=(1, 0))],
                                               [conv((1, 1), stride=2)]),
                                      Concat([MaxPool(3, stride=1, padding=1)], [conv((3, 3), padding=(2, 1), dilation=(2, 1))])],
}


@pytest.mark.parametrize("name", GRAPHS)
def test_algorithm2_equals_analytic_bands_on_graphs(name):
    """As test_algorithm2_equals_analytic_bands, on graphs whose every layer reads all of its input."""
    layers = GRAPHS[name]
    for shape in tile_shapes(layers):
        assert overlap.algorithm2(layers, shape) == overlap.analytic_invalid(layers, shape), shape


def test_residual_block_band_is_the_wider_path():
    """Identity beside conv-conv ("same" convs of 3): the paths' output bands are 0 and 2 per side; the sum's is 2."""
    path = [Conv(np.ones((1, 1, 3)), padding=1), ReLU(), Conv(np.ones((1, 1, 3)), padding=1)]
    assert overlap.algorithm2(path, 16).forward[-1] == ((2, 2),)
    found = overlap.algorithm2([Residual(path, [])], 16)
    assert found.forward[-1] == ((2, 2),) and found.backward[0] == ((2, 2),)
    assert tuple(overlap.receptive_field([Residual(path, [])])[0]) == (5, 1, 2)


def test_paths_on_one_grid_only_for_even_inputs():
    """conv 3 stride 2 padding 1 beside max-pool 2 (a ResNet-D shortcut): same length only for even inputs.

    Algorithm 2 and the closed form agree on even tiles, and both refuse odd ones.
    """
    layers = [Residual([conv((3,), stride=2, padding=1)], [MaxPool(2), conv((1,))]), conv((3,))]
    for tile in (10, 12, 20):
        assert overlap.algorithm2(layers, tile) == overlap.analytic_invalid(layers, tile), tile
    for find in (overlap.algorithm2, overlap.analytic_invalid):
        with pytest.raises(ValueError, match="the two branches|land on one grid"):
            find(layers, 11)


def test_2d_bands_equal_1d_bands_with_a_sparsely_reading_layer():
    """A kernel of 2, dilation 2, stride 2 reads only odd positions: every other line of its input gradient is
    exactly 0 (valid) even inside the band. Probed per axis, 2D finds the 1D bands on each axis."""
    one_d = overlap.algorithm2([Conv(np.ones((1, 1, 2)), stride=2, dilation=2, padding=1)], 8)
    two_d = overlap.algorithm2([Conv(np.ones((1, 1, 2, 2)), stride=2, dilation=2, padding=1)], (8, 8))
    assert one_d.backward[0] == ((0, 1),)
    assert two_d.backward[0] == ((0, 1), (0, 1)) and two_d.forward == tuple(f * 2 for f in one_d.forward)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), ndim=st.sampled_from([1, 2]))
def test_algorithm2_equals_analytic_bands_on_random_graphs(data, ndim):
    """Random residual / concatenation graphs whose every layer reads all of its input: bands equal exactly."""
    spec, c_in = data.draw(twins.graphs(dense=True))
    layers = twins.build(spec, c_in, ndim, np.random.default_rng(0))[1]
    fields = overlap.receptive_field(layers, ndim)
    for extra in (0, data.draw(st.integers(1, 5))):
        shape = tuple(2 * (f.size + f.offset) + extra for f in fields)
        assert overlap.algorithm2(layers, shape) == overlap.analytic_invalid(layers, shape), shape


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_analytic_bands_never_miss_what_algorithm2_finds(data):
    """Any random graph: forward bands equal; gradient bands of the closed form are never narrower.

    Where a layer reads its input sparsely (a 1x1 conv with stride 2), a gradient the
    tile misses can be exactly 0 in the full image too; Algorithm 2 sees that, the
    closed form (which assumes every missed contribution counts) does not.
    """
    spec, c_in = data.draw(twins.graphs())
    layers = twins.build(spec, c_in, 1, np.random.default_rng(0))[1]
    f = overlap.receptive_field(layers, 1)[0]
    tile = 2 * (f.size + f.offset) + data.draw(st.integers(0, 5))
    found, closed = overlap.algorithm2(layers, tile), overlap.analytic_invalid(layers, tile)
    assert (found.sizes, found.forward) == (closed.sizes, closed.forward)
    for level, (mine, bound) in enumerate(zip(found.backward, closed.backward)):
        assert mine[0][0] <= bound[0][0] and mine[0][1] <= bound[0][1], level


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_algorithm2_overlap_equals_analytic_overlap_on_random_graphs(data):
    """On stride-aligned tiles, as for chains: forward overlap rf - stride when the (hull) offset is on the
    stride grid, never less otherwise; backward overlap as analytic_overlap for valid graphs."""
    spec, c_in = data.draw(twins.graphs(dense=True))
    layers = twins.build(spec, c_in, 1, np.random.default_rng(0))[1]
    (f,), (required,) = overlap.receptive_field(layers, 1), overlap.analytic_overlap(layers, 1)
    found = overlap.algorithm2(layers, f.size + f.stride * (-(-(f.size + f.offset) // f.stride) + 1 + data.draw(st.integers(0, 2))))
    if f.offset % f.stride == 0:
        assert found.forward_overlap[0] == required.forward
    else:
        assert found.forward_overlap[0] > required.forward
    if f.offset == 0:
        assert found.backward_overlap[0] == required.backward
