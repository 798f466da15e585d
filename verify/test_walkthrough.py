"""The 1D walk-through (demo/walkthrough.py, docs/walkthrough.md) shows the reference's numbers.

The example is integer-valued, so streaming and the whole-vector equations must
agree exactly, and the numbers printed in the docs are compared as exact
fractions.
"""

import pathlib
import re
from fractions import Fraction

import numpy as np
import pytest

from demo import walkthrough
from reference import conv, overlap, tiling
from reference.layers import Conv

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"


@pytest.fixture(scope="module")
def data():
    return walkthrough.compute()


def test_whole_vector_numbers_are_eqs_1_5_7(data):
    x, w, r = (a.reshape(1, 1, -1) for a in (data.x, data.w, data.r))
    assert data.x.shape == (14,) and data.w.shape == (3,)
    np.testing.assert_array_equal(data.output, conv.forward(x, w).reshape(-1))
    np.testing.assert_array_equal(data.weight_grad, conv.weight_grad(x, r, w.shape).reshape(-1))
    np.testing.assert_array_equal(data.input_grad, conv.input_grad(r, w, x.shape).reshape(-1))


def test_three_tiles_overlap_by_n_minus_1_and_stitch_to_the_output(data):
    assert [t.out for t in data.tiles] == [(0, 4), (4, 8), (8, 12)]
    assert [t.forward_crop for t in data.tiles] == [(0, 6), (4, 10), (8, 14)]
    w = data.w.reshape(1, 1, 3)
    for t in data.tiles:
        lo, hi = t.forward_crop
        np.testing.assert_array_equal(t.output, conv.forward(data.x[lo:hi].reshape(1, 1, -1), w).reshape(-1))
        np.testing.assert_array_equal(t.output, data.output[slice(*t.out)])
    np.testing.assert_array_equal(tiling.concat([t.output for t in data.tiles]), data.output)
    np.testing.assert_array_equal(data.streamed_output, data.output)


def test_kernel_gradient_accumulates_to_the_unstreamed_one(data):
    x, r = data.x.reshape(1, 1, -1), data.r.reshape(1, 1, -1)
    terms = tiling.tile_weight_grads(x, r, (1, 1, 3), [(t.out,) for t in data.tiles])
    running = np.zeros(3)
    for t, term in zip(data.tiles, terms):
        np.testing.assert_array_equal(t.weight_grad, term.reshape(-1))
        running = running + term.reshape(-1)
        np.testing.assert_array_equal(t.weight_grad_so_far, running)
    np.testing.assert_array_equal(data.tiles[-1].weight_grad_so_far, data.weight_grad)
    np.testing.assert_array_equal(data.streamed_weight_grad, data.weight_grad)
    assert not np.array_equal(data.tiles[0].weight_grad_so_far, data.weight_grad), "one tile alone is not enough"


def test_input_gradient_is_assembled_from_complete_pieces(data):
    owned = []
    for t in data.tiles:
        lo, hi = t.backward_crop
        dx_tile = dict(zip(range(lo, hi), t.tile_input_grad))
        for i in range(*t.owned):
            assert dx_tile[i] == data.input_grad[i]
            owned.append(i)
        incomplete = [i for i in dx_tile if dx_tile[i] != data.input_grad[i]]
        assert all(not t.owned[0] <= i < t.owned[1] for i in incomplete)
    assert owned == list(range(14))
    assert any(t.tile_input_grad.size > t.owned[1] - t.owned[0] for t in data.tiles)
    np.testing.assert_array_equal(data.streamed_input_grad, data.input_grad)


def expected_doc_numbers(data):
    numbers = {"x": data.x, "w": data.w, "R": data.r, "p": data.output, "dw": data.weight_grad,
               "dx": data.input_grad, "a": data.output[:6], "b": data.output[6:]}
    for k, t in enumerate(data.tiles, start=1):
        numbers[f"tile{k}_x"] = data.x[slice(*t.forward_crop)]
        numbers[f"tile{k}_p"] = t.output
        numbers[f"tile{k}_dp"] = data.r[slice(*t.grad_fed)]
        numbers[f"tile{k}_dx"] = t.tile_input_grad
        numbers[f"tile{k}_dw"] = t.weight_grad
        numbers[f"dw_after_tile{k}"] = t.weight_grad_so_far
    numbers["dw_eq5_as_printed"] = walkthrough.eq5_as_printed(data.x, data.r, 3)
    numbers.update(walkthrough.probe_example())
    return numbers


def test_docs_print_the_reference_numbers(data):
    """Every `name = [...]` line of docs/walkthrough.md equals the reference's value, and none is missing."""
    found = {}
    for name, body in re.findall(r"^(\w+)\s*=\s*\[([^\]]*)\]\s*$", DOC.read_text(), flags=re.MULTILINE):
        found.setdefault(name, []).append([Fraction(v.strip()) for v in body.split(",")])
    expected = expected_doc_numbers(data)
    assert set(found) == set(expected), set(found) ^ set(expected)
    for name, occurrences in found.items():
        for values in occurrences:
            # exact: the example is integers, the probe values are thirds
            assert len(values) == len(expected[name]), name
            assert all(abs(float(v) - e) < 1e-12 for v, e in zip(values, expected[name])), name


def test_eq5_as_printed_is_not_the_kernel_gradient(data):
    """The paper's case distinction in Eq. 5 drops dp_i x_{i+j} for i < j; without it, Eq. 5 is the gradient."""
    as_printed = walkthrough.eq5_as_printed(data.x, data.r, 3)
    assert as_printed.tolist() == [-5, -22, 29] and data.weight_grad.tolist() == [-5, -22, 9]
    dropped = [sum(data.r[i] * data.x[i + j] for i in range(j)) for j in range(3)]
    np.testing.assert_array_equal(as_printed + dropped, data.weight_grad)


def test_probe_matches_algorithm2(data):
    """The probe numbers in the docs are what Algorithm 2 counts: 2 incomplete gradients per side, overlap 2."""
    valid, same = Conv(np.ones((1, 1, 3))), Conv(np.ones((1, 1, 3)), padding=1)
    assert overlap.algorithm2([valid], 6).backward[0] == ((2, 2),)
    assert overlap.algorithm2([valid], 6).forward_overlap == (2,)
    assert overlap.algorithm2([same], 6).forward[1] == ((1, 1),)
    assert overlap.algorithm2([same], 6).forward_overlap == (2,)


def test_figure_renders(tmp_path):
    walkthrough.main(tmp_path)
    png = tmp_path / "fig1_1d_walkthrough.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
