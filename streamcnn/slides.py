"""Whole-slide images through OpenSlide's interface, read one tile-sized region at a time.

A *slide* is any object with OpenSlide's reading interface (``openslide.OpenSlide``,
``tiffslide.TiffSlide``, or an adapter, see below):

* ``level_dimensions``: ``(width, height)`` of each pyramid level, level 0 the largest;
* ``level_downsamples``: each level's downsample factor against level 0;
* ``read_region(location, level, size)``: the region of ``size = (width, height)``
  level pixels whose top-left pixel is at ``location = (x, y)`` *in level-0 pixels*,
  as a PIL image (RGBA for OpenSlide, RGB for TiffSlide) or an array ``(h, w, 3 or 4)``.

:class:`SlideArray` turns one level into a read-only ``(height, width, 3)`` uint8 array
whose every slicing is exactly one ``read_region`` call of that slice's size, so
``ImageArray.from_slide(slide, level)`` (in :mod:`streamcnn.sources`) streams it one
tile at a time. This module is NumPy only: it never imports a slide library.

Coordinates. OpenSlide maps a level-0 location to level pixel ``location / downsample``
(``openslide.c``: ``paint_region(x / downsample, ...)``), TiffSlide to
``int(location / downsample)``. Level pixel ``p`` is therefore read at level-0
coordinate :func:`level0_location` ``(p, downsample)`` = ``p * downsample`` when that is
an integer (every level of a power-of-two pyramid whose level-0 size divides evenly)
and ``ceil(p * downsample)`` otherwise, the one integer both readers map back to ``p``
where they can. With a non-integer downsample (level sizes that do not divide evenly,
as in many SVS files) OpenSlide places its tiles at sub-pixel offsets and resamples,
so the level it renders shifts by a fraction of a pixel from one region to the next;
for pixel-exact reads of such a level, use TiffSlide or tifffile's zarr store of it.

Transparency. openslide-python returns *non-premultiplied* RGBA, with ``(0, 0, 0, 0)``
outside the scanned area (missing tiles, the gaps between a MIRAX slide's regions).
Each pixel is composited over the ``background`` colour with the "over" operator,
``rgb * alpha/255 + background * (1 - alpha/255)`` rounded to the nearest integer
(:func:`composite`): opaque pixels are unchanged, fully transparent ones become the
background.

Tissue masks. :func:`tissue_mask` thresholds a low-resolution level (Otsu's threshold
of the saturation); given to :class:`SlideArray` as ``tissue``, every pixel outside the
tissue is read as the background colour, and a region with no tissue at all is not
read from the slide. This *changes the image* the network sees (see :func:`tissue_mask`).

cuCIM. ``cucim.CuImage.read_region(location, size, level)`` takes its arguments in
another order (``location`` also in level-0 pixels), returns an array-like, and keeps
the pyramid in ``resolutions``; a five-line adapter gives it OpenSlide's interface::

    class CuCIMSlide:
        def __init__(self, image):                  # image = cucim.CuImage(path)
            self.image = image
            self.level_dimensions = image.resolutions["level_dimensions"]
            self.level_downsamples = image.resolutions["level_downsamples"]

        def read_region(self, location, level, size):
            return np.asarray(self.image.read_region(location=location, size=size, level=level))

    x = ImageArray.from_slide(CuCIMSlide(cucim.CuImage("biopsy.svs")), level=1)
"""

from __future__ import annotations

import math

import numpy as np

#: the attributes a slide needs, in OpenSlide's spelling
INTERFACE = ("level_dimensions", "level_downsamples", "read_region")
WHITE = (255, 255, 255)


class SlideArray:
    """One level of a slide as a read-only ``(height, width, 3)`` uint8 array.

    ``slide_array[y0:y1, x0:x1]`` is one ``slide.read_region`` call of size
    ``(x1 - x0, y1 - y0)`` at level-0 location :func:`level0_location` of
    ``(x0, y0)``, composited over ``background`` (:func:`composite`), with the pixels
    outside ``tissue`` (a boolean mask over the whole slide, True where there is
    tissue, e.g. from :func:`tissue_mask`) set to ``background``. A region without
    tissue is the background colour and is not read. Slices must have step 1.
    """

    def __init__(self, slide, level: int = 0, *, background=WHITE, tissue=None):
        check_slide(slide)
        self.slide = slide
        self.level = check_level(slide, level)
        self.background = check_background(background)
        width, height = (int(n) for n in slide.level_dimensions[self.level])
        self.shape = (height, width, 3)
        self.ndim = 3
        self.dtype = np.dtype(np.uint8)
        self.downsample = float(slide.level_downsamples[self.level])
        self.tissue = None if tissue is None else check_tissue(tissue, self.shape[:2])
        self.calls = 0  # read_region calls so far (a region without tissue makes none)

    def __repr__(self) -> str:
        masked = ", tissue-masked" if self.tissue is not None else ""
        return (f"SlideArray({type(self.slide).__name__}, level={self.level}, "
                f"shape={self.shape}{masked})")

    def __getitem__(self, index) -> np.ndarray:
        rows, cols, channels = _region(index, self.shape)
        return self.read(rows, cols)[:, :, channels]

    def read(self, rows: range, cols: range) -> np.ndarray:
        """The level's pixels ``rows x cols`` (ranges of step 1), ``(h, w, 3)`` uint8."""
        keep = None if self.tissue is None else self.tissue_in(rows, cols)
        if not rows or not cols or (keep is not None and not keep.any()):
            return np.broadcast_to(np.asarray(self.background, np.uint8),
                                   (len(rows), len(cols), 3)).copy()
        location = (level0_location(cols.start, self.downsample),
                    level0_location(rows.start, self.downsample))
        size = (len(cols), len(rows))
        call = f"{type(self.slide).__name__}.read_region({location}, {self.level}, {size})"
        self.calls += 1
        try:
            image = self.slide.read_region(location, self.level, size)
        except Exception as err:
            raise OSError(f"{call} failed: {type(err).__name__}: {err}") from err
        rgb = composite(np.asarray(image), self.background)
        if rgb.shape[:2] != (size[1], size[0]):
            raise ValueError(f"{call} returned an image of {rgb.shape[1]}x{rgb.shape[0]} "
                             f"pixels (width x height), expected {size[0]}x{size[1]}")
        if keep is not None:
            rgb[~keep] = self.background
        return rgb

    def tissue_in(self, rows: range, cols: range) -> np.ndarray:
        """The tissue mask at this level's pixels ``rows x cols``: each pixel takes the
        mask pixel under its centre (the mask covers the whole slide)."""
        (mask_h, mask_w), (height, width) = self.tissue.shape, self.shape[:2]
        mask_rows = (2 * np.asarray(rows) + 1) * mask_h // (2 * height)
        mask_cols = (2 * np.asarray(cols) + 1) * mask_w // (2 * width)
        return self.tissue[np.ix_(mask_rows, mask_cols)]


def level0_location(pixel: int, downsample: float) -> int:
    """The level-0 coordinate at which ``read_region`` reads level pixel ``pixel`` of a
    level with this downsample: ``pixel * downsample`` when that is an integer (up to
    float rounding), else ``ceil(pixel * downsample)``, the smallest level-0 location
    at or after the pixel, which TiffSlide's ``int(location / downsample)`` maps back
    to ``pixel`` (OpenSlide then resamples at an offset below one level pixel)."""
    exact = pixel * downsample
    nearest = round(exact)
    return int(nearest) if abs(exact - nearest) <= 1e-6 else math.ceil(exact)


def composite(pixels: np.ndarray, background=WHITE) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of an ``(h, w, 3)`` RGB or ``(h, w, 4)`` non-premultiplied
    RGBA uint8 image: each pixel over the background, ``round((rgb * alpha +
    background * (255 - alpha)) / 255)`` in integers, so alpha 255 keeps ``rgb`` and
    alpha 0 gives ``background`` exactly."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"a slide's read_region must return an RGB or RGBA uint8 image "
                         f"(a PIL image, or an array of shape (height, width, 3 or 4)); got "
                         f"an array of shape {pixels.shape} and dtype {pixels.dtype}")
    rgb = np.array(pixels[:, :, :3])
    if pixels.shape[2] == 3:
        return rgb
    alpha = pixels[:, :, 3:].astype(np.uint16)
    if (alpha == 255).all():
        return rgb
    bg = np.asarray(background, np.uint16)
    over = (rgb.astype(np.uint16) * alpha + bg * (255 - alpha) + 127) // 255
    return over.astype(np.uint8)


def tissue_mask(slide, level: int | None = None, *, background=WHITE) -> np.ndarray:
    """A boolean tissue mask (True: tissue) of the whole slide at a low-resolution level.

    The level (default: the slide's smallest) is read whole in one ``read_region``,
    composited over ``background``, and thresholded at Otsu's threshold of its
    saturation ``(max - min) / max`` of R, G, B (0..255): stained tissue is coloured,
    glass and the unscanned area (transparent, hence ``background``) are grey or white.
    The mask has that level's ``(height, width)``.

    Given to ``ImageArray.from_slide(slide, level, tissue=mask)`` (or
    :class:`SlideArray`), every pixel outside the mask is read as ``background``: this
    **changes the input** - the network no longer sees the glass, the pen marks or the
    dust outside the tissue, and tissue that the threshold misses (faint, unstained or
    fatty) is blanked too. Check the mask (e.g. ``plt.imshow(mask)``) and widen it if
    needed (``scipy.ndimage.binary_dilation(mask, iterations=2)``); any boolean array
    over the whole slide works as a mask. In exchange, tiles without tissue are all
    one colour and are not read.
    """
    check_slide(slide)
    level = len(slide.level_dimensions) - 1 if level is None else check_level(slide, level)
    thumbnail = SlideArray(slide, level, background=background)
    sat = saturation(thumbnail[:, :])
    if sat.min() == sat.max():
        raise ValueError(f"level {level} of the slide has one saturation value everywhere "
                         f"({sat.min()}): tissue cannot be told from background; pass a mask "
                         f"of your own (a boolean array, True for tissue)")
    return sat > otsu_threshold(sat)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of uint8 RGB pixels, as integers 0..255 (0 for black)."""
    high = rgb.max(axis=-1).astype(np.int64)
    low = rgb.min(axis=-1).astype(np.int64)
    return (high - low) * 255 // np.maximum(high, 1)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of integers in 0..255: the ``t`` that maximises the between-class
    variance ``w0 * w1 * (mean0 - mean1)**2`` of the classes ``<= t`` and ``> t`` (the
    smallest such ``t``; scikit-image's ``threshold_otsu`` agrees)."""
    counts = np.bincount(np.asarray(values).ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    sum0 = np.cumsum(counts * np.arange(counts.size))
    mean0 = sum0 / np.maximum(w0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(w1, 1)
    return int(np.argmax(w0 * w1 * (mean0 - mean1) ** 2))


# ------------------------------------------------------------------ checks, with what would work

def check_slide(slide) -> None:
    missing = [name for name in INTERFACE if not hasattr(slide, name)]
    if missing:
        raise TypeError(
            f"a slide needs OpenSlide's interface - level_dimensions, level_downsamples and "
            f"read_region(location, level, size) - as openslide.OpenSlide(path) and "
            f"tiffslide.TiffSlide(path) have (for cuCIM, see the adapter in streamcnn.slides); "
            f"{type(slide).__name__} has no {', '.join(missing)}. An array (zarr, h5py, "
            f"tifffile's zarr store) goes through ImageArray(array, 'HWC') instead")


def check_level(slide, level) -> int:
    levels = len(slide.level_dimensions)
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) \
            or not 0 <= level < levels:
        sizes = ", ".join(f"{k}: {w}x{h}" for k, (w, h) in enumerate(slide.level_dimensions))
        raise ValueError(f"level {level!r} is not a level of this slide: it has levels 0 to "
                         f"{levels - 1} (width x height: {sizes})")
    return int(level)


def check_background(background) -> tuple[int, int, int]:
    try:
        values = tuple(background)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                   and 0 <= v <= 255 for v in values):
        raise ValueError(f"background must be an RGB colour, 3 integers in 0..255 such as "
                         f"(255, 255, 255) for white, got {background!r}")
    return tuple(int(v) for v in values)


def check_tissue(tissue, level_shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(tissue)
    if mask.dtype != np.bool_ or mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"tissue must be a 2-D boolean array over the whole slide (True where "
                         f"there is tissue), such as streamcnn.slides.tissue_mask(slide) "
                         f"gives; got an array of shape {mask.shape} and dtype {mask.dtype}")
    if not covers(mask.shape, level_shape):
        (h, w), (height, width) = mask.shape, level_shape
        hint = ("is the mask transposed?" if covers(mask.shape[::-1], level_shape) else
                f"a mask {h} pixels high would be about {round(h * width / height)} wide")
        raise ValueError(
            f"the tissue mask has shape {mask.shape} (height, width), aspect ratio {w / h:.4g} "
            f"(width / height), but the slide level is {height}x{width} (height x width), aspect "
            f"ratio {width / height:.4g}: the mask must cover the whole slide, as a mask of one "
            f"of its levels does (tissue_mask(slide) gives the smallest level's); {hint}")
    return mask


def covers(mask_shape, level_shape) -> bool:
    """Whether a mask of ``mask_shape`` can be a resampling of the whole level: one scale
    (level pixels per mask pixel) fits both axes up to rounding - each length may be one
    pixel off at the mask's resolution or at the level's, as the levels of a pyramid are
    (OpenSlide's and TiffSlide's level sizes are level 0's divided and rounded)."""
    lows, highs = zip(*(_scales(length, n) for length, n in zip(level_shape, mask_shape)))
    return max(lows) <= min(highs)


def _scales(length: int, n: int) -> tuple[float, float]:
    """The scales for which ``n`` mask pixels span ``length`` level pixels, up to a pixel."""
    low = min(length / (n + 1), (length - 1) / n)
    high = max(length / (n - 1) if n > 1 else math.inf, (length + 1) / n)
    return low, high


def _region(index, shape) -> tuple[range, range, slice]:
    """The rows and columns (step 1) and the channel slice of a slicing of a slide."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 3 or not all(isinstance(s, slice) for s in index):
        raise TypeError(f"a slide level is sliced with up to three slices, e.g. "
                        f"slide[0:256, 512:768]; got {index!r}")
    index = index + (slice(None),) * (3 - len(index))
    rows, cols = (range(*s.indices(n)) for s, n in zip(index[:2], shape))
    if rows.step != 1 or cols.step != 1:
        raise ValueError(f"a slide level is read with slices of step 1 (one read_region each); "
                         f"got {index[:2]!r}")
    return rows, cols, index[2]
