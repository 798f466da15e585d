"""Synthetic "find the sharp ring" images: a task that only the full resolution solves.

In the spirit of metastasis detection in a gigapixel slide (Pinckaers et al.), an image is a large field of
cell-like background texture with a dozen small bright rings, about seven pixels across. In a *negative*
image every ring is soft: its pixels are averaged within the 2 x 2 blocks of the pixel grid. A *positive*
image has four to eight sharp rings, one pixel wide, among the soft ones (16 to 24 rings in all, on
4 million pixels). The image-level label only says whether a sharp ring is present.

Why no downsampled image can solve it: area-averaging by 2 (and so by 4, 8, ...) maps a sharp ring and its
soft version to exactly the same pixels, and the number of rings does not depend on the label. So at half
resolution or lower, positive and negative images come from the same distribution, bit for bit the same
construction (``verify/test_demo_synthetic.py`` checks this). At full resolution the difference is plain
to see: one-pixel-wide lines at the full ring intensity instead of two-pixel-wide ones at about half of it.

Everything is drawn from ``numpy.random.default_rng`` seeded by (seed, size): the same seed gives the same
image, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

RING_RADIUS = 3.0                 # pixels; a ring is about 2 * RING_RADIUS + 1 = 7 pixels across
RINGS_PER_IMAGE = (16, 24)        # inclusive range of rings (sharp + soft) in every image
SHARP_PER_POSITIVE = (4, 8)       # inclusive range of sharp rings in a positive image
AMPLITUDE = (0.35, 0.6)           # ring pixel intensity above the background
CELLS_PER_PIXEL = 1 / 900         # density of the blurred "nuclei" in the background texture
SOFT_BLOCK = 2                    # soft rings are averaged in blocks of this many pixels


@dataclass(frozen=True)
class Scene:
    """Where everything in one synthetic image is; ``render`` turns it into pixels.

    ``sharp`` and ``soft`` are float arrays of shape (k, 3) with rows (y, x, amplitude) of the sharp and
    the soft rings. ``label`` is 1 iff ``sharp`` is not empty.
    """

    seed: int
    size: int
    label: int
    sharp: np.ndarray
    soft: np.ndarray


def ring_mask(dy: float, dx: float, radius: float = RING_RADIUS) -> np.ndarray:
    """Pixels within half a pixel of a circle, on a (2r+3)^2 patch whose centre is shifted by (dy, dx)."""
    half = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    return np.abs(np.hypot(yy - dy, xx - dx) - radius) < 0.5


def make_scene(seed: int, size: int, positive: bool) -> Scene:
    """Draw the positions and intensities of all structures of one image (no pixels yet)."""
    if size < 64 or size % SOFT_BLOCK:
        raise ValueError(f"image size must be an even number of at least 64 pixels, got {size}")
    rng = np.random.default_rng([seed, size, int(positive)])
    n_rings = rng.integers(RINGS_PER_IMAGE[0], RINGS_PER_IMAGE[1] + 1)
    n_sharp = rng.integers(SHARP_PER_POSITIVE[0], SHARP_PER_POSITIVE[1] + 1) if positive else 0
    margin = 8
    rings = np.hstack([rng.uniform(margin, size - margin, size=(n_rings, 2)),
                       rng.uniform(*AMPLITUDE, size=(n_rings, 1))])
    return Scene(seed=seed, size=size, label=int(positive), sharp=rings[:n_sharp], soft=rings[n_sharp:])


def render_background(scene: Scene) -> np.ndarray:
    """Cell-like texture: smooth tissue density, dark small and bright larger nuclei, and pixel noise."""
    rng = np.random.default_rng([scene.seed, scene.size, 7])
    size = scene.size
    coarse = ndimage.gaussian_filter(rng.standard_normal((size // 16, size // 16)), 2.0)
    coarse = (0.06 / coarse.std()) * coarse.astype(np.float32)
    image = 0.5 + ndimage.zoom(coarse, size / coarse.shape[0], order=1, grid_mode=True, mode="grid-constant")
    n_cells = int(size * size * CELLS_PER_PIXEL)
    for sigma, strength in ((2.5, -12.0), (4.0, 10.0)):
        flat = rng.integers(0, size * size, size=n_cells)
        impulses = np.bincount(flat, weights=rng.uniform(0.5, 1.0, n_cells), minlength=size * size)
        impulses = (strength * impulses).astype(np.float32).reshape(size, size)
        image += ndimage.gaussian_filter(impulses, sigma, truncate=3.0)
    image += 0.04 * rng.standard_normal((size, size), dtype=np.float32)
    return image


def draw_rings(size: int, rows: np.ndarray) -> np.ndarray:
    """Sharp rings at rows (y, x, amplitude) on a zero image."""
    out = np.zeros((size, size))
    for y, x, amp in rows:
        iy, ix = int(round(y)), int(round(x))
        patch = amp * ring_mask(y - iy, x - ix)
        h = patch.shape[0] // 2
        out[iy - h:iy + h + 1, ix - h:ix + h + 1] += patch
    return out


def soften(image: np.ndarray, block: int = SOFT_BLOCK) -> np.ndarray:
    """Replace every pixel by the mean of its ``block`` x ``block`` grid block (same shape)."""
    return np.repeat(np.repeat(downsample(image, block), block, axis=0), block, axis=1)


def render_structures(scene: Scene) -> np.ndarray:
    """Only the sharp and the soft rings of the scene, on a zero background."""
    return draw_rings(scene.size, scene.sharp) + soften(draw_rings(scene.size, scene.soft))


def render(scene: Scene) -> np.ndarray:
    """The image of a scene as float32, shape (size, size)."""
    return (render_background(scene) + render_structures(scene)).astype(np.float32)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling of the last two axes by an integer factor (a lower scanner magnification)."""
    if factor < 1 or image.shape[-1] % factor or image.shape[-2] % factor:
        raise ValueError(f"downsample factor {factor} must be a positive divisor of the image size "
                         f"{image.shape[-2:]}")
    if factor == 1:
        return image
    h, w = image.shape[-2] // factor, image.shape[-1] // factor
    blocks = image.reshape(*image.shape[:-2], h, factor, w, factor)
    return blocks.mean(axis=(-3, -1), dtype=np.float64).astype(image.dtype)


def make_dataset(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """``n_images`` images (alternately negative and positive), float32 (n, size, size), labels, scenes."""
    scenes = [make_scene(seed * 100_003 + i, size, positive=bool(i % 2)) for i in range(n_images)]
    images = np.stack([render(s) for s in scenes])
    labels = np.array([s.label for s in scenes], dtype=np.int64)
    return images, labels, scenes
