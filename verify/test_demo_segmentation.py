"""demo/segmentation.py: its quick mode runs and reports, its task is what DEMO.md says, and its claims hold.

Oracles: conventional autograd on the whole image (the demo's own first-step check, tolerances float64 1e-10
and float32 1e-4 relative, as verify/test_pixel_loss.py: summation order only); brute-force distances for
the labels; ``streamcnn.plan`` for the geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("streamcnn")

import streamcnn  # noqa: E402
from demo import report, segmentation as sg  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmentation")
    sg.main(folder, quick=True)
    return folder


def test_quick_mode_writes_figure_and_results(quick):
    assert (quick / "segmentation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((quick / "segmentation.json").read_text())
    cfg = sg.Config.quick()
    assert len(res["training"]["loss"]) == cfg.steps and all(np.isfinite(res["training"]["loss"]))
    for dtype, check in res["first_step_check"].items():
        assert check["grad_rel_diff"] <= sg.TOLERANCE[dtype] and check["loss_rel_diff"] <= sg.TOLERANCE[dtype]


def test_each_tile_runs_one_forward_and_one_backward_per_step(quick):
    res = json.loads((quick / "segmentation.json").read_text())
    tiles = res["stream_plan"]["num_tiles"]
    assert tiles > 1
    assert res["training"]["per_step_counts"] == [{
        "tiles": tiles, "tiles_computed": tiles, "backward_recomputed": 0,
        "module_forward_calls": tiles, "module_backward_calls": tiles}]


def test_demo_md_section(quick):
    text = report.write(quick, {}, quick=True).read_text()
    section = text.split("## 5. Segmentation with context wider than a tile")[1].split("## Runtime")[0]
    res = json.loads((quick / "segmentation.json").read_text())
    assert "(not run)" not in section and "segmentation.png" in section
    assert f"{res['stream_plan']['num_tiles']} tiles, {res['stream_plan']['num_tiles']} computed, 0 recomputed" \
        in section
    assert "| float64 |" in section and "| float32 |" in section
    assert f"segmentation {res['seconds']:.0f} s" in text.split("## Runtime")[1]


def test_labels_are_the_pixels_within_distance_of_a_marker():
    cfg = sg.Config.quick()
    scene = sg.make_scene(cfg, sg.TRAIN, 3)
    ys, xs = np.nonzero(scene.markers)
    yy, xx = np.mgrid[:cfg.size, :cfg.size]
    nearest = np.min((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2, axis=-1)
    np.testing.assert_array_equal(scene.label > 0.5, nearest <= cfg.distance ** 2)
    assert cfg.markers[0] <= len(scene.centres) <= cfg.markers[1]
    assert scene.image[scene.markers].mean() > scene.image[~scene.markers].mean() + 3


def test_scenes_are_seeded_and_splits_differ():
    cfg = sg.Config.quick()
    a, b = sg.make_scene(cfg, sg.TRAIN, 0), sg.make_scene(cfg, sg.TRAIN, 0)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, sg.make_scene(cfg, sg.TEST, 0).image)


def test_context_is_wider_than_a_tile_computes_and_narrower_than_the_receptive_field():
    """What DEMO.md claims of the full configuration: 2D + 1 lies between the block a tile owns and the
    U-Net's receptive field, and the tile is as small as streaming allows it near."""
    cfg = sg.Config()
    plan = sg.stream_plan(sg.UNet(cfg.channels), cfg)
    assert plan["owned"] < 2 * cfg.distance + 1 < plan["receptive_field"] <= plan["min_tile"] <= cfg.tile
    assert cfg.size >= 3 * cfg.tile and plan["num_tiles"] >= 9


def test_blind_positives_have_no_marker_within_reach_in_their_patch():
    cfg = sg.Config.quick()
    for index in range(4):
        scene = sg.make_scene(cfg, sg.TEST, index)
        blind = sg.blind_positives(scene, cfg)
        boxes = sg.patch_boxes(cfg.size, cfg.tile)
        for py, px in zip(*np.nonzero(blind)):
            rows = next(b for b in boxes if b.start <= py < b.stop)
            cols = next(b for b in boxes if b.start <= px < b.stop)
            ys, xs = np.nonzero(scene.markers[rows, cols])
            d2 = (ys + rows.start - py) ** 2 + (xs + cols.start - px) ** 2
            assert not (d2 <= cfg.distance ** 2).any()
        assert not (blind & (scene.label < 0.5)).any()


def test_streamed_inference_into_an_array_is_the_conventional_output():
    cfg = sg.Config.quick()
    torch.manual_seed(0)
    net = sg.UNet(cfg.channels).eval()
    image = sg.make_scene(cfg, sg.TEST, 0).image
    logits, blocks = sg.predict(net, image, cfg.tile)
    with torch.no_grad():
        expected = net(torch.from_numpy(image)[None, None])[0, 0].numpy()
    assert streamcnn.testing.rel_err(torch.from_numpy(logits), torch.from_numpy(expected)) < 1e-4
    covered = np.zeros(image.shape, int)
    for rows, cols in blocks:
        covered[rows, cols] += 1
    assert (covered == 1).all() and len(blocks) == streamcnn.plan(net, (1, 1) + image.shape, cfg.tile).num_tiles
