"""A small ten-class set of real photographs, built offline from images that scikit-image and scikit-learn ship.

The paper trained on ImageNette (ten ImageNet classes). No download is allowed here, so each class is one
of the ten colour photographs bundled with the installed packages, and an example is a random crop of it,
resized to ``size`` x ``size`` and randomly mirrored: "which photograph is this piece of?". To keep the
validation accuracy honest, training crops come from the left ``TRAIN_FRACTION`` of each photograph and
validation crops from the remaining right-hand strip, so no validation pixel was ever seen in training.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

TRAIN_FRACTION = 0.7
CROP_SIDE = (0.25, 0.5)   # crop side as a fraction of the photograph's shorter side
CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "hubble", "immunohistochemistry",
           "retina", "china", "flower", "motorcycle")


@lru_cache(maxsize=1)
def load_photographs() -> tuple[np.ndarray, ...]:
    """The ten bundled colour photographs as uint8 arrays (H, W, 3), in ``CLASSES`` order."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images().images     # china.jpg, flower.jpg
    photos = (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.retina(), sample[0], sample[1], data.stereo_motorcycle()[0])
    return tuple(np.ascontiguousarray(p[..., :3]) for p in photos)


def random_crop(photo: np.ndarray, rng: np.random.Generator, columns: tuple[int, int], size: int) -> np.ndarray:
    """One square crop inside the column range ``columns``, resized to (size, size, 3) float in [0, 1]."""
    from skimage.transform import resize

    height = photo.shape[0]
    lo, hi = columns
    short = min(photo.shape[:2])
    side = int(rng.uniform(*CROP_SIDE) * short)
    side = max(8, min(side, hi - lo, height))
    y = rng.integers(0, height - side + 1)
    x = rng.integers(lo, hi - side + 1)
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize(crop, (size, size), anti_aliasing=True).astype(np.float32)


def build_split(per_class: int, size: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Crops of every photograph: images (n, 3, size, size) float32 in [0, 1] and labels (n,) int64.

    ``split`` is "train" (left part of each photograph) or "val" (the held-out right-hand strip).
    Examples are interleaved by class so any prefix is balanced.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if per_class < 1 or size < 8:
        raise ValueError(f"need per_class >= 1 and size >= 8, got per_class={per_class}, size={size}")
    images, labels = [], []
    photos = load_photographs()
    for label, photo in enumerate(photos):
        rng = np.random.default_rng([seed, label, split == "val"])
        cut = int(photo.shape[1] * TRAIN_FRACTION)
        columns = (0, cut) if split == "train" else (cut, photo.shape[1])
        for _ in range(per_class):
            images.append(random_crop(photo, rng, columns, size))
            labels.append(label)
    order = np.argsort(np.tile(np.arange(per_class), len(photos)), kind="stable")
    stack = np.stack(images).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stack[order]), np.asarray(labels, dtype=np.int64)[order]


def normalise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardise every set with the per-channel mean and standard deviation of the training set."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return [((a - mean) / std).astype(train.dtype) for a in (train, *others)]
