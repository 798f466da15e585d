"""docs/residual.md and its figure show the reference's numbers (demo/residual.py).

The page's numbers are the reference's own (Algorithm 2, receptive fields), so the
oracle here is the reference; the independent checks of those functions are in
test_reference_graph.py and test_reference_overlap.py. Probe values are thirds and
ninths, compared exactly as fractions.
"""

import pathlib
import re
from fractions import Fraction

import numpy as np
import pytest

from demo import residual
from reference import overlap
from reference.graph import Residual

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "residual.md"


@pytest.fixture(scope="module")
def data():
    return residual.compute()


def expected_doc_numbers(data):
    return {
        "probe_identity": data.identity, "probe_conv1": data.conv1, "probe_conv2": data.conv2,
        "probe_block": data.block, "band_identity": data.band_identity, "band_conv1": data.band_conv1,
        "band_conv_path": data.band_conv_path, "band_block": data.band_block, "grad_band_block": data.grad_band_block,
        "overlap_algorithm2": [data.algorithm2_overlap], "overlap_block": [data.overlap],
        "field_identity": data.field_identity, "field_conv_path": data.field_conv_path, "field_block": data.field_block,
    }


def test_docs_print_the_reference_numbers(data):
    """Every `name = [...]` line of docs/residual.md equals the reference's value, and none is missing."""
    found = {}
    for name, body in re.findall(r"^(\w+)\s*=\s*\[([^\]]*)\]\s*$", DOC.read_text(), flags=re.MULTILINE):
        found[name] = [Fraction(v.strip()) for v in body.split(",")]
    expected = expected_doc_numbers(data)
    assert set(found) == set(expected), set(found) ^ set(expected)
    for name, values in found.items():
        assert values == [Fraction(float(e)).limit_denominator(1000) for e in np.asarray(expected[name]).tolist()], name


def test_docs_table_is_the_reference_table(data):
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in residual.TABLE:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(residual.TABLE)
    for name, cells in rows.items():
        row = data.table[name]
        assert cells == [str(tuple(row.field_a)), str(tuple(row.field_b)), str(tuple(row.field)),
                         str(row.rf_minus_stride), str(row.algorithm2_overlap)], name


def test_the_block_band_is_the_wider_path_band(data):
    """What the page teaches: the sum is contaminated where either path is, so each side takes the wider band."""
    assert data.band_block == tuple(max(a, b) for a, b in zip(data.band_identity, data.band_conv_path))
    np.testing.assert_array_equal(data.block, data.identity + data.conv2)
    assert data.band_conv_path == (2, 2) and data.band_block == (2, 2)
    lo, hi = data.band_block
    assert residual.TILE - (residual.TILE - lo - hi) == data.algorithm2_overlap == data.overlap == 4


def test_on_one_grid_the_hull_is_the_wider_path(data):
    """Paths with one stride and one 2*offset - size: the hull is one path's own field (the page's claim)."""
    for name, row in data.table.items():
        a, b = row.field_a, row.field_b
        assert a.stride == b.stride and 2 * a.offset - a.size == 2 * b.offset - b.size, name
        assert row.field == max(a, b, key=lambda f: f.size), name
    assert data.field_block == data.field_conv_path


def test_probe_values_are_algorithm2s(data):
    """The hand-run probe (constant kernels on ones) is what algorithm2 compares: its bands match the values."""
    path = residual.conv_path()
    for values, interior, band in ((data.conv2, 1, data.band_conv_path), (data.block, 2, data.band_block)):
        invalid = ~np.isclose(values, interior)
        lo, hi = band
        assert invalid[:lo].all() and invalid[len(values) - hi:].all() and not invalid[lo:len(values) - hi].any()
    assert overlap.algorithm2([Residual(path, [])], residual.TILE).forward[-1] == ((2, 2),)


def test_figure_renders(tmp_path):
    residual.main(tmp_path)
    png = tmp_path / "residual_overlap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
