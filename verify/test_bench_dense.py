"""bench.dense, the U-Net per-pixel-loss study: its quick run end to end (each point in a fresh
process, on a 160² image), its memory guard, and its BENCH.md section from made-up records."""
import json

import pytest

from bench import dense, guard
from bench.models import unet

GIB = 2**30


def test_the_unet_keeps_the_image_size_and_gives_two_classes():
    import torch

    net = unet(0)
    assert net(torch.randn(1, 3, 40, 48)).shape == (1, 2, 40, 48)
    assert [m.out_channels for m in net.downs.modules() if isinstance(m, torch.nn.Conv2d)][1::2] == [16, 32, 64, 128]


def test_quick_run_measures_every_mode_and_renders_its_section(tmp_path):
    out = tmp_path / "dense.json"
    assert dense.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert sorted(stored) == ["160-conventional", "160-pixel_loss-128", "160-pixel_loss-160", "160-stitched-128"]
    assert all(r["status"] == "measured" and r["step_s"] > 0 and r["peak_bytes"] > 0 for r in stored.values())
    conventional = stored["160-conventional"]["loss"]
    assert all(r["loss"] == pytest.approx(conventional, rel=1e-5) for r in stored.values())  # one loss, three ways
    tiled = stored["160-pixel_loss-128"]
    assert (tiled["tiles"], tiled["r"]) == (4, pytest.approx(2.56)) and stored["160-pixel_loss-160"]["r"] == 1.0
    assert stored["160-stitched-128"]["recomputed"] == 4 and tiled["recomputed"] == 0
    text = dense.render(stored)
    assert "### 160×160" in text and "bound 1.15·r·conventional" in text
    assert text.count("| pixel_loss |") == 2 and "pixel_loss points measured beside conventional" in text


def test_conventional_is_skipped_where_the_guard_says_it_would_not_fit(monkeypatch):
    monkeypatch.setattr(guard, "available_bytes", lambda device: 16 * GIB)
    skipped = dense.measure({"side": 8192, "mode": "conventional", "tile": 0}, 1, (1, 1))
    assert skipped["status"] == "skipped" and "GiB are available" in skipped["reason"]
    assert dense.fit_reason({"side": 8192, "mode": "pixel_loss", "tile": 1024}) is None


def _record(mode, step, peak, tile=0, side=2048, r=1.0, disturbance=""):
    rec = {"status": "measured", "side": side, "mode": mode, "tile": tile, "tiles": 25 if tile else 1, "r": r,
           "step_s": step, "peak_bytes": peak, "loss": 0.69, "disturbance": disturbance, "recomputed": 0,
           "plan_conventional_bytes": 4 * GIB}
    return dense.key(rec), rec


def test_section_judges_the_target_and_shows_skipped_points():
    stored = dict([_record("conventional", 10.0, 5 * GIB),
                   _record("pixel_loss", 15.0, GIB // 2, 512, r=1.41),       # 1.50x <= 1.62x, 1/10: met
                   _record("pixel_loss", 14.0, GIB, 768, r=1.2),             # 1.40x > 1.38x, 1/5: not met
                   _record("stitched", 30.0, GIB // 2, 512, r=1.41),
                   _record("pixel_loss", 60.0, GIB // 2, 1024, side=4096, r=1.2)])
    stored["4096-conventional"] = {"side": 4096, "mode": "conventional", "tile": 0, "status": "skipped",
                                   "reason": "needs ~29.1 GiB but only 20.0 GiB are available"}
    judged = dense.verdicts(stored)
    assert sorted(judged) == ["2048-pixel_loss-512", "2048-pixel_loss-768"]
    assert judged["2048-pixel_loss-512"]["time_met"] and judged["2048-pixel_loss-512"]["memory_met"]
    assert not judged["2048-pixel_loss-768"]["time_met"] and not judged["2048-pixel_loss-768"]["memory_met"]
    text = dense.render(stored)
    assert "met at 1 of 2 pixel_loss points measured beside conventional training (2048-pixel_loss-512)" in text
    row = "| pixel_loss | 512 | 25 | 1.41 | **15.00 s** | 1.50× | 16.21 s | met | **512 MiB** | 0.10× | met |"
    assert row in text
    assert "| conventional | – |  |  | skipped: needs ~29.1 GiB" in text
    assert "0.12× of plan()'s" in text and "### 4096×4096" in text
    assert "Not measured yet" in dense.render({})
