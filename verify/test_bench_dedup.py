"""``bench/dedup.py`` at a size that runs in seconds: the synthetic slide (its coverage, its
pyramid, its pixels as TiffSlide reads them), one configuration's record from the worker, and
BENCH.md's section rendered from those records. No timing is judged here."""

import numpy as np
import pytest

from bench import dedup, dedup_plot, slide, study


@pytest.fixture
def small(tmp_path, monkeypatch):
    """A 1536² slide (three TIFF tiles a side, levels 1536 and 768) in a scratch folder."""
    pytest.importorskip("tifffile")
    monkeypatch.setattr(dedup, "RAW", tmp_path)
    return dedup.make_slide(1536)


def test_the_islands_cover_about_thirty_percent():
    grid = (np.arange(1024) + 0.5) / 1024
    covered = dedup.inside(dedup.islands(), grid, grid).mean()
    assert 0.30 <= covered <= 0.34
    assert dedup.islands() == dedup.islands()  # seeded


def test_the_slide_is_a_pyramid_of_glass_and_tissue(small):
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(small) as reader:
        assert reader.level_dimensions == ((1536, 1536), (768, 768))
        level0 = np.asarray(reader.read_region((0, 0), 0, (1536, 1536), as_array=True))
    ellipses = dedup.islands()
    for r, c in [(0, 0), (1, 2), (2, 1)]:
        expected = dedup.tiff_tile(ellipses, 1536, r, c, 0)
        assert np.array_equal(level0[512 * r:512 * (r + 1), 512 * c:512 * (c + 1)], expected)
    glass = (level0 == dedup.GLASS).all(axis=-1).mean()
    assert 0.64 <= glass <= 0.71  # the rest of the ~30 % tissue; a few tissue pixels are glass-coloured


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The worker's record of each configuration on a 1024² slide with tiles of 256."""
    pytest.importorskip("tiffslide")
    raw, dedup.RAW = dedup.RAW, tmp_path_factory.mktemp("dedup")
    try:
        dedup.make_slide(1024)
        found = {}
        for prefetch, shared in dedup.CONFIGS:
            r = {"status": "measured", **dedup.worker(1024, 1, prefetch, shared, tile=256)}
            found[dedup.key(r)] = r
        return found
    finally:
        dedup.RAW = raw


def test_each_configuration_gives_the_same_loss_and_dedup_computes_fewer_tiles(records):
    rows = {(r["prefetch"], r["dedup"]): r for r in records.values()}
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0])
    for (prefetch, shared), r in rows.items():
        f, b = r["passes"]["forward"], r["passes"]["backward"]
        assert f["tiles"] == b["tiles"] > 4
        assert (f["computed"] < f["tiles"]) is shared  # (the backward skips tiles without gradient)
        assert b["computed"] + b["skipped"] == f["computed"] and b["skipped"] > 0
        assert r["prefetch"] is prefetch and r["peak_rss_bytes"] > 0
        assert 0 <= f["wait_s"] <= f["wall_s"] and f["read_s"] > 0


def test_the_section_renders_from_the_records(records):
    assert "Not measured yet." in dedup.render({})
    failed = {"side": 32768, "tile": 4096, "prefetch": False, "dedup": True, "status": "failed",
              "reason": "timed out after 14400 s"}
    text = dedup.render({**records, dedup.key(failed): failed})
    assert text.startswith(f"## {dedup.SECTION}")
    assert text.count("| 1024² (tile 256) |") == 4 and "| failed | timed out after 14400 s" in text
    assert "the step time of *no prefetch, no dedup* over that of prefetch, dedup" in text


def test_the_memmap_slide_section_shows_read_and_compute_where_measured(records):
    one = next(iter(records.values()))
    measured = {"side": 4096, "status": "measured", "file_bytes": 1, "float32_bytes": 4, "peak_rss_bytes": 2,
                "plan_device_bytes": 3, "step_s": 3.0, "forward_s": 1.0, "backward_s": 2.0, "threads": 2,
                "date": "2026-12-03", "cpu_window": {}}
    text = slide.render({"4096": {**measured, "passes": one["passes"]}, "8192": {**measured, "side": 8192}})
    assert study.time_split(one) in text and "| – |" in text


def test_the_figure_is_drawn_once_every_configuration_is_measured(records, tmp_path):
    path = tmp_path / "dedup.png"
    some = dict(list(records.items())[:3])
    assert not dedup_plot.figure(some, path) and not path.exists()
    assert dedup_plot.figure(records, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_section_shows_the_figure_only_where_it_was_drawn(records, tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "FIGURE", tmp_path / "dedup.png")
    assert "](dedup.png)" not in dedup.render(records)
    dedup_plot.figure(records, dedup.FIGURE)
    assert "![identical tiles once, reads ahead](dedup.png)" in dedup.render(records)
