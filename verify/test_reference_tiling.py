"""Eqs. 2-4 and 6 (reference.tiling): splitting, concatenating, summing tile kernel gradients.

Oracle: our own unsplit computation (Eq. 1 and Eq. 5 on the whole input), itself
checked against scipy and torch in test_reference_conv.py; for the tile layout
(plan_axis), our closed-form overlap (reference.overlap.analytic_overlap) and
counting. float64; tile results
must match to 1e-10 relative (the tile kernel gradients are summed in a
different order than the whole one), tile outputs exactly (same products, same
order).
"""

import numpy as np
import pytest

import checks
from reference import conv, tiling
from reference.layers import Conv, MaxPool, ReLU
from reference.tiling import Window

RTOL = 1e-10



def assert_rel(actual, expected, rtol=RTOL):
    checks.assert_rel(actual, expected, rtol)


def test_paper_example_eqs_2_to_4():
    """Sec. 3.1 with N = 14, n = 3: f = 11, a = outputs 0..f//2, b = f//2+1..f, o = n - 1 = 2."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 14)), rng.standard_normal((1, 1, 3))
    N, n = 14, 3
    f, o = N - n, n - 1
    chain = [Window(3, 1, 0)]
    (a_out, b_out) = tiling.output_split(f + 1, 2)
    assert a_out == (0, f // 2 + 1) and b_out == (f // 2 + 1, f + 1)  # Eqs. 2 and 3
    # "The values {x_0..x_{f//2+o}} are required to calculate a" -- exactly our range for a.
    assert tiling.input_range(chain, a_out, N) == (0, f // 2 + o + 1)
    # The paper gives {x_{f//2+1-o}..x_N} for b, but b's first output (x*w)_{f//2+1} reads
    # x_{f//2+1}..x_{f//2+n}, so b needs only x_{f//2+1}.. x_{N-1}: the paper's range is a superset
    # (it would make the tiles overlap by 2o). With the exact range, a and b overlap by o = n - 1.
    assert tiling.input_range(chain, b_out, N) == (f // 2 + 1, N)
    (a_lo, a_hi), (b_lo, b_hi) = tiling.input_range(chain, a_out, N), tiling.input_range(chain, b_out, N)
    assert a_hi - b_lo == o
    x_a, x_b = tiling.split(x, [(a_lo, a_hi), (b_lo, b_hi)])
    a, b = conv.forward(x_a, w), conv.forward(x_b, w)
    full = conv.forward(x, w)
    np.testing.assert_array_equal(a, full[..., : f // 2 + 1])  # Eq. 2
    np.testing.assert_array_equal(b, full[..., f // 2 + 1:])  # Eq. 3
    # the paper's wider range for b gives o extra outputs in front, which are a's last ones
    b_paper = conv.forward(x[..., f // 2 + 1 - o:], w)
    np.testing.assert_array_equal(b_paper[..., o:], b)
    np.testing.assert_array_equal(tiling.concat([a, b]), full)  # Eq. 4


def test_paper_example_eq_6():
    """dw_j = sum_i da_i x_{i+j} + sum_i db_i x_{i+j+f//2+1}: the two tiles' kernel gradients add up."""
    rng = np.random.default_rng(1)
    x, dp = rng.standard_normal(14), rng.standard_normal(12)
    f = 11
    da, db = dp[: f // 2 + 1], dp[f // 2 + 1:]
    written_out = [sum(da[i] * x[i + j] for i in range(len(da))) + sum(db[i] * x[i + j + f // 2 + 1] for i in range(len(db)))
                   for j in range(3)]
    boxes = [((0, f // 2 + 1),), ((f // 2 + 1, f + 1),)]
    got = tiling.summed_weight_grad(x.reshape(1, 1, 14), dp.reshape(1, 1, 12), (1, 1, 3), boxes)
    assert_rel(got[0, 0], written_out)
    assert_rel(got, conv.weight_grad(x.reshape(1, 1, 14), dp.reshape(1, 1, 12), (1, 1, 3)))


@pytest.mark.parametrize("n_out", [1, 2, 7, 12, 13, 40])
def test_output_split_is_a_contiguous_near_even_partition(n_out):
    for n_tiles in range(1, n_out + 1):
        ranges = tiling.output_split(n_out, n_tiles)
        assert len(ranges) == n_tiles and ranges[0][0] == 0 and ranges[-1][1] == n_out
        assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def random_conv(rng, ndim):
    kernel = tuple(int(k) for k in rng.integers(1, 5, ndim))
    dilation = tuple(int(d) for d in rng.integers(1, 3, ndim))
    stride = tuple(int(s) for s in rng.integers(1, 4, ndim))
    spatial = tuple(int(d * (k - 1) + 1 + rng.integers(3, 20)) for k, d in zip(kernel, dilation))
    x = rng.standard_normal((2, 2) + spatial)
    w = rng.standard_normal((3, 2) + kernel)
    return x, w, stride, dilation


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("seed", range(10))
def test_random_splits_eqs_2_to_4_and_6(seed, ndim):
    """Any split of the output, each tile computed from its input range, concatenates to the whole (Eqs. 2-4)
    and its kernel gradients sum to the whole one (Eq. 6)."""
    rng = np.random.default_rng(seed)
    x, w, stride, dilation = random_conv(rng, ndim)
    full = conv.forward(x, w, stride, dilation)
    grad_out = rng.standard_normal(full.shape)
    per_axis = []
    for axis in range(ndim):
        n_out = full.shape[2 + axis]
        ranges = tiling.output_split(n_out, int(rng.integers(1, n_out + 1)))
        chain = [Window(dilation[axis] * (w.shape[2 + axis] - 1) + 1, stride[axis], 0)]
        inputs = [tiling.input_range(chain, r, x.shape[2 + axis]) for r in ranges]
        per_axis.append((ranges, inputs))
    # Eqs. 2-4: tile by tile along each axis, stitched back together
    rows = []
    for r_in in per_axis[0][1]:
        strip = tiling.split(x, [r_in], axis=2)[0]
        if ndim == 1:
            rows.append(conv.forward(strip, w, stride, dilation))
        else:
            cols = [conv.forward(t, w, stride, dilation) for t in tiling.split(strip, per_axis[1][1], axis=3)]
            rows.append(tiling.concat(cols, axis=3))
    np.testing.assert_array_equal(tiling.concat(rows, axis=2), full)
    # Eq. 6
    boxes = tiling.boxes(*(ranges for ranges, _ in per_axis))
    terms = tiling.tile_weight_grads(x, grad_out, w.shape, boxes, stride, dilation)
    assert len(terms) == len(boxes)
    assert_rel(tiling.summed_weight_grad(x, grad_out, w.shape, boxes, stride, dilation),
               conv.weight_grad(x, grad_out, w.shape, stride, dilation))


def chain_of(layers, ndim=1):
    return [layer.window(ndim)[0] for layer in layers]


CHAINS = {
    "valid": [Conv(np.ones((1, 1, 3))), ReLU(), Conv(np.ones((1, 1, 3)))],
    "same+pool": [Conv(np.ones((1, 1, 3)), padding=1), ReLU(), MaxPool(2), Conv(np.ones((1, 1, 3)), padding=1)],
    "strided": [Conv(np.ones((1, 1, 5)), stride=2, padding=2), MaxPool(3, 2, 1), Conv(np.ones((1, 1, 3)), dilation=2, padding=2)],
}


@pytest.mark.parametrize("name", CHAINS)
def test_chain_ranges_pad_only_at_image_borders(name):
    chain, n_in = chain_of(CHAINS[name]), 50
    sizes = tiling.level_sizes(chain, n_in)
    for n_tiles in (1, 2, 3, 5):
        for out in tiling.output_split(sizes[-1], n_tiles):
            ranges, pads = tiling.chain_ranges(chain, out, n_in)
            assert ranges[-1] == out
            for level, (window, (lo, hi)) in enumerate(zip(chain, pads)):
                start, stop = ranges[level]
                assert 0 <= start < stop <= sizes[level]
                assert lo <= window.padding and hi <= window.padding
                assert lo == 0 or start == 0, "padding on a side inside the image"
                assert hi == 0 or stop == sizes[level], "padding on a side inside the image"


@pytest.mark.parametrize("name", CHAINS)
def test_footprint_inverts_chain_ranges(name):
    """The outputs that read a position are exactly those whose input range contains it (hull)."""
    chain, n_in = chain_of(CHAINS[name]), 40
    sizes = tiling.level_sizes(chain, n_in)
    for level in range(len(sizes)):
        for pos in range(sizes[level]):
            readers = [k for k in range(sizes[-1])
                       if tiling.chain_ranges(chain, (k, k + 1), n_in)[0][level][0] <= pos
                       < tiling.chain_ranges(chain, (k, k + 1), n_in)[0][level][1]]
            start, stop = tiling.footprint(chain, level, (pos, pos + 1), n_in)
            if readers:
                assert (start, stop) == (readers[0], readers[-1] + 1)
            else:
                assert start >= stop


def smallest_tile(chain):
    """The smallest tile_size plan_axis can work with, from analytic_overlap (not from plan_axis).

    An interior tile that owns one output must recompute, for its backward pass, every
    output that reads the inputs it owns: its crop is the backward overlap plus one
    step of the total stride, rf + stride * ((rf - 1) // stride).
    """
    f = tiling.chain_field(chain)
    return f.size + f.stride * ((f.size - 1) // f.stride)


# per chain: an input length, and tile sizes from the smallest one up, each giving several tiles
PLAN_CASES = {"valid": (61, [9, 10, 13, 30]), "same+pool": (61, [14, 15, 20, 40]),
              "strided": (200, [49, 50, 60, 120])}


@pytest.mark.parametrize("name", CHAINS)
def test_plan_axis_refuses_exactly_the_tiles_that_are_too_small(name):
    """One position below the smallest tile raises the error naming it; the smallest tile itself works."""
    chain, (n_in, sizes) = chain_of(CHAINS[name]), PLAN_CASES[name]
    least = smallest_tile(chain)
    assert least == sizes[0]  # 9, 14 and 49, worked out from rf and stride
    with pytest.raises(ValueError, match=rf"tile_size {least - 1} on axis 0 is too small .* use tile_size >= {least}$"):
        tiling.plan_axis(chain, n_in, least - 1)
    assert max(t.size for t in tiling.plan_axis(chain, n_in, least)) <= least


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("which", range(4))
def test_plan_axis_tiles_fit_and_partition(name, which):
    """Several tiles, each within tile_size, whose outputs partition the output and whose owned positions
    (``unique``) partition every level: each position that an output reads is owned by exactly one tile.

    "Reads" is the range the whole output needs at that level (chain_ranges): these
    chains read every position in it (no layer's stride exceeds its extent).
    """
    chain, (n_in, sizes) = chain_of(CHAINS[name]), PLAN_CASES[name]
    tile_size = sizes[which]
    tiles = tiling.plan_axis(chain, n_in, tile_size)
    assert len(tiles) >= 2, "the case must stream"
    assert all(t.size <= tile_size for t in tiles)
    level_sizes = tiling.level_sizes(chain, n_in)
    needed, _ = tiling.chain_ranges(chain, (0, level_sizes[-1]), n_in)
    assert needed[-1] == (0, level_sizes[-1])
    for level, (start, stop) in enumerate(needed):
        owned = sorted(p for t in tiles for p in range(*t.unique[level]))
        assert owned == list(range(start, stop)), f"level {level}: owned by none or by two tiles"
        for t in tiles:  # a tile owns only what its backward pass recomputes
            u_start, u_stop = t.unique[level]
            assert u_start >= u_stop or t.backward[level][0] <= u_start < u_stop <= t.backward[level][1]
    assert [t.unique[-1] for t in tiles] == [t.out for t in tiles]
    assert tiling.concat([np.arange(*t.out) for t in tiles]).tolist() == list(range(level_sizes[-1]))
