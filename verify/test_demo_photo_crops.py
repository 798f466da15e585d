"""The photo-crop dataset of demo/training_equivalence.py: deterministic, balanced, honest train/val split."""
from __future__ import annotations

import numpy as np
import pytest

from demo import photo_crops


def test_ten_bundled_colour_photographs_load_offline():
    photos = photo_crops.load_photographs()
    assert len(photos) == len(photo_crops.CLASSES) == 10
    for p in photos:
        assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 300


def test_build_split_is_deterministic_and_interleaved():
    x1, y1 = photo_crops.build_split(2, 32, seed=1, split="train")
    x2, y2 = photo_crops.build_split(2, 32, seed=1, split="train")
    x3, _ = photo_crops.build_split(2, 32, seed=2, split="train")
    assert x1.shape == (20, 3, 32, 32) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert y1.tolist() == list(range(10)) * 2
    assert 0.0 <= x1.min() and x1.max() <= 1.0


def test_crops_stay_inside_their_column_range():
    """A photograph whose red channel encodes the column: every crop's values must come from its range."""
    width, cut = 400, 280
    columns = np.broadcast_to(np.arange(width, dtype=np.float64)[None, :], (300, width))
    photo = np.stack([columns / width] * 3, axis=-1)
    rng = np.random.default_rng(0)
    for lo, hi in ((0, cut), (cut, width)):
        for _ in range(20):
            crop = photo_crops.random_crop(photo, rng, (lo, hi), 16)
            assert lo / width - 1e-6 <= crop.min() and crop.max() <= (hi - 1) / width + 1e-6


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        photo_crops.build_split(1, 32, seed=0, split="test")


def test_normalise_uses_training_statistics():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (8, 3, 4, 4)).astype(np.float32)
    val = rng.normal(3.0, 2.0, (4, 3, 4, 4)).astype(np.float32)
    tr, va = photo_crops.normalise(train, val)
    np.testing.assert_allclose(tr.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(tr.std(axis=(0, 2, 3)), 1, atol=1e-5)
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(va, (val - mean) / std, rtol=1e-5)
