"""The synthetic "sharp ring" task of demo/resolution.py: deterministic, labels match, and by construction
no information about the label survives a 2x (or coarser) area downsample."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import block_reduce

from demo import synthetic

SIZE = 128


def test_same_seed_gives_identical_images():
    a = synthetic.render(synthetic.make_scene(5, SIZE, positive=True))
    b = synthetic.render(synthetic.make_scene(5, SIZE, positive=True))
    assert a.dtype == np.float32 and a.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(a, b)


def test_different_seed_gives_different_images():
    a = synthetic.render(synthetic.make_scene(5, SIZE, positive=True))
    b = synthetic.render(synthetic.make_scene(6, SIZE, positive=True))
    assert np.abs(a - b).max() > 0.1


def test_dataset_is_deterministic_and_balanced():
    x1, y1, _ = synthetic.make_dataset(4, SIZE, seed=3)
    x2, y2, _ = synthetic.make_dataset(4, SIZE, seed=3)
    x3, _, _ = synthetic.make_dataset(4, SIZE, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert y1.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_labels_match_the_planted_sharp_rings(seed):
    for positive in (False, True):
        scene = synthetic.make_scene(seed, 256, positive)
        lo, hi = synthetic.SHARP_PER_POSITIVE
        assert scene.label == int(positive)
        assert (lo <= len(scene.sharp) <= hi) if positive else len(scene.sharp) == 0
        total = len(scene.sharp) + len(scene.soft)
        assert synthetic.RINGS_PER_IMAGE[0] <= total <= synthetic.RINGS_PER_IMAGE[1]


def test_a_sharp_ring_is_drawn_where_the_scene_says():
    scene = synthetic.make_scene(1, 256, positive=True)
    pixels = synthetic.draw_rings(256, scene.sharp[:1])
    y, x, amp = scene.sharp[0]
    iy, ix = int(round(y)), int(round(x))
    mask = synthetic.ring_mask(y - iy, x - ix)
    h = mask.shape[0] // 2
    patch = pixels[iy - h:iy + h + 1, ix - h:ix + h + 1]
    np.testing.assert_allclose(patch[mask], amp)
    assert patch[h, h] == 0  # hollow: the centre pixel is background
    assert pixels.sum() == pytest.approx(amp * mask.sum())  # nothing drawn elsewhere


def test_ring_mask_is_a_one_pixel_circle():
    mask = synthetic.ring_mask(0.0, 0.0)
    yy, xx = np.nonzero(mask)
    h = mask.shape[0] // 2
    dist = np.hypot(yy - h, xx - h)
    assert np.all(np.abs(dist - synthetic.RING_RADIUS) < 0.5)
    assert mask.sum() >= 12


def test_downsample_matches_skimage_block_mean():
    image = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    for factor in (2, 4, 8):
        expected = block_reduce(image.astype(np.float64), (factor, factor), np.mean)
        np.testing.assert_allclose(synthetic.downsample(image, factor), expected, rtol=1e-6, atol=1e-6)


def test_downsample_rejects_a_factor_that_does_not_divide():
    with pytest.raises(ValueError, match="divisor"):
        synthetic.downsample(np.zeros((10, 10)), 4)


def test_make_scene_rejects_odd_or_tiny_sizes():
    with pytest.raises(ValueError, match="even"):
        synthetic.make_scene(0, 63, True)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_sharp_and_soft_rings_are_identical_after_downsampling(factor):
    """The design claim: at half resolution or coarser, a sharp ring and its soft version are the same
    pixels, so a positive image is indistinguishable from the negative image with its rings softened.
    Tolerance: float64 block means of the same numbers in a different grouping (~1e-16 relative)."""
    scene = synthetic.make_scene(2, 256, positive=True)
    as_negative = synthetic.Scene(scene.seed, scene.size, 0, scene.sharp[:0],
                                  np.vstack([scene.sharp, scene.soft]))
    pos = synthetic.render_structures(scene)
    neg = synthetic.render_structures(as_negative)
    assert np.abs(pos - neg).max() > 0.1  # different at full resolution ...
    np.testing.assert_allclose(synthetic.downsample(pos, factor), synthetic.downsample(neg, factor),
                               rtol=0, atol=1e-12)  # ... identical at every coarser one
