"""Whole-slide images, read tile by tile through the real libraries: tifffile's zarr store,
TiffSlide and OpenSlide (``ImageArray.from_slide``) at level 0 and at a downsampled level,
an on-disk zarr array and an h5py dataset, all of pyramidal tiled zlib TIFFs (or arrays)
written here.

Oracle: conventional autograd (``net(normalise(image))``, backward) on the pixels this test
wrote, which every reader must decode exactly (zlib is lossless). Each streamed step must
give the same output and parameter gradients to 1e-10 relative in float64: the streamed
step computes the same products as the conventional one and sums them in another order
(tile by tile), so the two agree to float64 rounding (~1e-15); tiles read one level-0
pixel off their place change the output by ~0.2-0.4 relative, far above 1e-10. Every
reader is wrapped to record its reads: one read per tile per pass, each exactly the tile's
box.

The libraries come with the ``slides`` extra; each test skips cleanly without its library.
"""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn import ImageArray, Streaming
from streamcnn.slides import SlideArray, check_tissue, otsu_threshold, saturation, tissue_mask
from verify.checks import assert_rel
from verify.test_inputs import normalise  # uint8 tile -> normalised float64

LEVELS = 3  # level 0 is 384 x 512 (height x width), each level halves it
TIFF_TILE = 256
TILE = {0: 100, 1: 64}  # streaming tile per level: not aligned with the TIFF's 256 tiles


def small_net():
    """A small float64 front end: a 5x5 and a strided 3x3 convolution, overlapping max pool."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 4, 3, padding=1)).double()


# ------------------------------------------------------------------ synthetic slides

def synthetic(height, width, seed=0):
    """RGB uint8 with structure (stripes and rings of different colours) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float64)
    waves = np.stack([np.sin(x / 11 + y / 29), np.cos(np.hypot(x - 200, y - 150) / 9),
                      np.sin(y / 7) * np.cos(x / 13)], axis=-1)
    noisy = 128 + 80 * waves + rng.normal(0, 25, (height, width, 3))
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def pyramid(level0, levels=LEVELS):
    """Each level the 2x2 mean of the one before (sizes divisible by 2**(levels-1))."""
    out = [level0]
    for _ in range(levels - 1):
        a = out[-1].astype(np.float64)
        out.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4)
                   .round().astype(np.uint8))
    return out


def write_tiff(path, levels, missing=()):
    """A generic pyramidal TIFF: one tiled zlib page per level, the later ones marked as
    reduced-resolution images (SubFileType 1), as OpenSlide's generic-TIFF reader needs to
    see them as levels; tifffile (and so TiffSlide) reads them as the series' levels.
    ``missing``: (row, col) TIFF tiles of level 0 left out (byte count 0)."""
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            tif.write(_tiles(level, missing if k == 0 else ()), shape=level.shape,
                      dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), compression="zlib",
                      photometric="rgb", subfiletype=1 if k else 0)
    return path


def _tiles(level, missing):
    height, width = level.shape[:2]
    for i in range(0, height, TIFF_TILE):
        for j in range(0, width, TIFF_TILE):
            piece = level[i:i + TIFF_TILE, j:j + TIFF_TILE]
            full = np.zeros((TIFF_TILE, TIFF_TILE, 3), np.uint8)
            full[:piece.shape[0], :piece.shape[1]] = piece
            yield None if (i // TIFF_TILE, j // TIFF_TILE) in missing else full


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """(path, levels): a 3-level pyramidal TIFF and the pixels of each level."""
    levels = pyramid(synthetic(384, 512))
    return write_tiff(tmp_path_factory.mktemp("slide") / "slide.tif", levels), levels


# ------------------------------------------------------------------ counting readers

class CountingSlide:
    """A real slide object as from_slide sees it, recording each read_region call."""

    def __init__(self, slide):
        self.slide = slide
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples
        self.reads = []

    def read_region(self, location, level, size):
        self.reads.append((tuple(location), level, tuple(size)))
        return self.slide.read_region(location, level, size)


class CountingArray:
    """A real array (zarr, h5py) as ImageArray sees it, recording each slicing."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


# ------------------------------------------------------------------ the step and its oracle

def step(module, forward):
    """Output and parameter gradients of one step: ``forward()``, then backward with a fixed
    random output gradient."""
    module.zero_grad(set_to_none=True)
    y = forward()
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype))
    return y.detach(), [p.grad.clone() for p in module.parameters()]


def run(module, x, tile):
    """One streamed step."""
    return step(module, lambda: Streaming(module, tile, transform=normalise)(x))


def conventional(module, image):
    """The same step without streaming, on the decoded (height, width, 3) image."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    return step(module, lambda: module(normalise(x)))


def assert_same_step(got, ref):
    (y, grads), (y_ref, grads_ref) = got, ref
    assert_rel(y.numpy(), y_ref.numpy(), 1e-10, "output")
    for k, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_rel(g.numpy(), g_ref.numpy(), 1e-10, f"gradient of parameter {k}")


def tile_boxes(net, height, width, tile):
    """(rows, cols) ranges of every streamed tile, row-major, as the plan gives them."""
    p = streamcnn.plan(net, (1, 3, height, width), tile, input_dtype=torch.uint8,
                       input_device="array", transform=normalise)
    return [(range(h0, h1), range(w0, w1))
            for h0, h1 in zip(p.tile_starts[0], p.tile_stops[0])
            for w0, w1 in zip(p.tile_starts[1], p.tile_stops[1])]


def check_array(net, array, image, tile):
    """Stream ``array`` (HWC, recorded): the conventional step, one slicing per tile per pass."""
    counting = CountingArray(array)
    assert_same_step(run(net, ImageArray(counting, "HWC"), tile), conventional(net, image))
    boxes = [(slice(r.start, r.stop), slice(c.start, c.stop), slice(None))
             for r, c in tile_boxes(net, *image.shape[:2], tile)]
    assert counting.reads == boxes + boxes  # forward, then the backward's recomputation


def check_slide(net, reader, level, image, tile):
    """Stream a slide's level (recorded): the conventional step, one read_region per tile per
    pass, of the tile's size, at its top-left pixel in level-0 coordinates (x 2**level here)."""
    counting = CountingSlide(reader)
    assert_same_step(run(net, ImageArray.from_slide(counting, level), tile),
                     conventional(net, image))
    scale = 2 ** level
    reads = [((c.start * scale, r.start * scale), level, (len(c), len(r)))
             for r, c in tile_boxes(net, *image.shape[:2], tile)]
    assert counting.reads == reads + reads
    assert max(max(size) for _, _, size in counting.reads) <= tile


# ------------------------------------------------------------------ one training step per reader

@pytest.mark.parametrize("level", [0, 1])
def test_tifffile_zarr_store(slide, level):
    tifffile, zarr = pytest.importorskip("tifffile"), pytest.importorskip("zarr")
    path, levels = slide
    store = tifffile.imread(path, aszarr=True, level=level)
    try:
        check_array(small_net(), zarr.open(store, mode="r"), levels[level], TILE[level])
    finally:
        store.close()


@pytest.mark.parametrize("level", [0, 1])
def test_tiffslide(slide, level):
    tiffslide = pytest.importorskip("tiffslide")
    path, levels = slide
    with tiffslide.TiffSlide(path) as reader:
        assert reader.level_downsamples[level] == 2 ** level
        check_slide(small_net(), reader, level, levels[level], TILE[level])


@pytest.mark.parametrize("level", [0, 1])
def test_openslide(slide, level):
    openslide = pytest.importorskip("openslide")
    path, levels = slide
    with openslide.OpenSlide(path) as reader:
        assert reader.properties["openslide.vendor"] == "generic-tiff"
        assert reader.level_downsamples[level] == 2 ** level
        check_slide(small_net(), reader, level, levels[level], TILE[level])


def test_zarr_array_on_disk(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = synthetic(384, 512)
    written = zarr.open_array(tmp_path / "slide.zarr", mode="w", shape=image.shape,
                              chunks=(128, 128, 3), dtype=np.uint8)
    written[:] = image
    check_array(small_net(), zarr.open_array(tmp_path / "slide.zarr", mode="r"), image, TILE[0])


def test_h5py_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    image = synthetic(384, 512)
    with h5py.File(tmp_path / "slide.h5", "w") as f:
        f.create_dataset("level0", data=image, chunks=(128, 128, 3), compression="gzip")
    with h5py.File(tmp_path / "slide.h5", "r") as f:
        check_array(small_net(), f["level0"], image, TILE[0])


class CuImageLike:
    """cuCIM's reading interface - ``resolutions``, ``read_region(location, size, level)``
    returning an array - over a real TiffSlide (cuCIM itself needs a GPU build)."""

    def __init__(self, slide):
        self.slide = slide
        self.resolutions = {"level_dimensions": slide.level_dimensions,
                            "level_downsamples": slide.level_downsamples}

    def read_region(self, location=(0, 0), size=None, level=0):
        return self.slide.read_region(location, level, size, as_array=True)


def readme_cucim_adapter():
    """The README's CuCIMSlide class, executed as written there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "class CuCIMSlide" in b)
    namespace = {"np": np}
    exec(block[block.index("class CuCIMSlide"):block.index("\nx = ")], namespace)
    return namespace["CuCIMSlide"]


def test_the_readme_cucim_adapter(slide):
    tiffslide = pytest.importorskip("tiffslide")
    path, levels = slide
    with tiffslide.TiffSlide(path) as reader:
        adapted = readme_cucim_adapter()(CuImageLike(reader))
        check_slide(small_net(), adapted, 1, levels[1], TILE[1])


# ------------------------------------------------------------------ level-0 coordinates

def _wrong_location(pixel, downsample):
    """The classic mistake: pass level coordinates as read_region's location."""
    return pixel


@pytest.mark.parametrize("library", ["openslide", "tiffslide"])
@pytest.mark.parametrize("conversion", ["right", "wrong"])
def test_a_level_is_read_in_level0_coordinates(slide, monkeypatch, library, conversion):
    """Every tile of level 1 read through from_slide is that tile of the decoded level 1;
    with level coordinates passed as location (a deliberate bug) the same check fails."""
    module = pytest.importorskip(library)
    path, levels = slide
    if conversion == "wrong":
        monkeypatch.setattr(streamcnn.slides, "level0_location", _wrong_location)
    reader = module.OpenSlide(path) if library == "openslide" else module.TiffSlide(path)
    with reader:
        array = ImageArray.from_slide(reader, level=1).array
        same = [np.array_equal(array[r.start:r.stop, c.start:c.stop], levels[1][r.start:r.stop,
                                                                                 c.start:c.stop])
                for r, c in tile_boxes(small_net(), *levels[1].shape[:2], TILE[1])]
    assert all(same) if conversion == "right" else not all(same)


@pytest.mark.parametrize("convert", ["ceil", "round"])
def test_a_level_with_a_non_integer_downsample(tmp_path, monkeypatch, convert):
    """Level sizes that do not halve evenly (385 x 513 -> 192 x 256) give a non-integer
    downsample (about 2.0046). TiffSlide reads level pixel int(location / downsample), so
    ceil(pixel * downsample) reads every tile start exactly; rounding instead (a
    plausible alternative) reads some tiles one pixel to the left or above."""
    tiffslide = pytest.importorskip("tiffslide")
    level0 = synthetic(385, 513, seed=1)
    levels = [level0, pyramid(level0[:384, :512], 2)[1]]
    path = write_tiff(tmp_path / "odd.tif", levels)
    if convert == "round":
        monkeypatch.setattr(streamcnn.slides, "level0_location", lambda p, ds: round(p * ds))
    with tiffslide.TiffSlide(path) as reader:
        assert not float(reader.level_downsamples[1]).is_integer()
        array = SlideArray(reader, 1)
        same = [np.array_equal(array[r.start:r.stop, c.start:c.stop],
                               levels[1][r.start:r.stop, c.start:c.stop])
                for r, c in tile_boxes(small_net(), 192, 256, 40)]
    assert all(same) if convert == "ceil" else not all(same)


# ------------------------------------------------------------------ transparency

def test_openslide_missing_tiles_become_the_background(tmp_path):
    """OpenSlide returns transparent pixels (0, 0, 0, 0) for a tile the TIFF leaves out;
    from_slide composites them onto the background colour and keeps every other pixel."""
    openslide = pytest.importorskip("openslide")
    levels = pyramid(synthetic(384, 512, seed=2))
    path = write_tiff(tmp_path / "sparse.tif", levels, missing={(0, 1)})
    background = (10, 200, 30)
    with openslide.OpenSlide(path) as reader:
        got = ImageArray.from_slide(reader, 0, background=background).array[:, :]
    expected = levels[0].copy()
    expected[:256, 256:512] = background
    assert np.array_equal(got, expected)


class TransparentSlide:
    """A fake slide (for this one check): a random RGBA image of every alpha value, as a
    PIL image the way openslide-python returns it (not premultiplied)."""

    level_dimensions = [(64, 48)]
    level_downsamples = [1.0]

    def __init__(self):
        rng = np.random.default_rng(4)
        self.rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
        self.rgba[0, :3, 3] = (0, 255, 128)  # the extremes are always there

    def read_region(self, location, level, size):
        from PIL import Image
        (x, y), (w, h) = location, size
        return Image.fromarray(self.rgba[y:y + h, x:x + w], "RGBA")


def test_partially_transparent_pixels_are_composited_over_the_background():
    pytest.importorskip("PIL")
    fake, background = TransparentSlide(), np.array([40, 250, 120])
    got = ImageArray.from_slide(fake, background=tuple(background)).array[5:40, 3:60]
    rgb, alpha = fake.rgba[5:40, 3:60, :3] / 255, fake.rgba[5:40, 3:60, 3:] / 255
    expected = np.round(255 * (rgb * alpha + background / 255 * (1 - alpha)))
    assert np.array_equal(got, expected.astype(np.uint8))
    whole = ImageArray.from_slide(fake, background=tuple(background)).array[:, :]
    assert np.array_equal(whole[0, 0], background)  # alpha 0: the background exactly
    assert np.array_equal(whole[0, 1], fake.rgba[0, 1, :3])  # alpha 255: the pixel exactly


@pytest.mark.parametrize("library", ["openslide", "tiffslide"])
def test_a_slide_level_says_its_shape_dtype_and_source(slide, library):
    """``from_slide(slide, level)`` is ``(1, 3, height, width)`` uint8, as the README says."""
    module = pytest.importorskip(library)
    reader = module.OpenSlide(slide[0]) if library == "openslide" else module.TiffSlide(slide[0])
    kind = type(reader).__name__
    with reader:
        x = ImageArray.from_slide(reader, 1)
        assert x.shape == (1, 3, 192, 256) and x.ndim == 4 and x.dtype == torch.uint8
        assert repr(x) == (f"ImageArray(shape=(1, 3, 192, 256), dtype=uint8, layout='HWC', "
                           f"source={kind} level 1)")
        masked = ImageArray.from_slide(reader, 0, tissue=np.ones((96, 128), bool))
        assert repr(masked) == (f"ImageArray(shape=(1, 3, 384, 512), dtype=uint8, layout='HWC', "
                                f"source={kind} level 0, tissue-masked)")


# ------------------------------------------------------------------ errors

def test_a_failed_read_names_the_tile_and_the_call(slide, tmp_path):
    """A corrupt zlib tile in the TIFF: OpenSlide's error reaches the user with the streamed
    tile's origin and the read_region call that failed."""
    openslide, tifffile = pytest.importorskip("openslide"), pytest.importorskip("tifffile")
    path = shutil.copy(slide[0], tmp_path / "corrupt.tif")
    with tifffile.TiffFile(path) as tif:  # TIFF tile (0, 1) of level 0: x 256..511, y 0..255
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    rows, cols = next((r, c) for r, c in tile_boxes(small_net(), 384, 512, TILE[0]) if c.stop > 256)
    call = re.escape(f"OpenSlide.read_region(({cols.start}, {rows.start}), 0, "
                     f"({len(cols)}, {len(rows)})) failed: OpenSlideError")
    with openslide.OpenSlide(path) as reader, pytest.raises(
            OSError, match=rf"reading the input tile at \({rows.start}, {cols.start}\) \(pixel "
                           rf"offsets per spatial axis\) failed: OSError: {call}"):
        run(small_net(), ImageArray.from_slide(reader), TILE[0])


def test_bad_arguments_say_what_would_work(slide):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(slide[0]) as reader:
        with pytest.raises(ValueError, match=r"level 3 is not a level of this slide: it has "
                                             r"levels 0 to 2 \(width x height: 0: 512x384, "
                                             r"1: 256x192, 2: 128x96\)"):
            ImageArray.from_slide(reader, 3)
        for background in [(255, 255), (0, 0, 256), "white", (1.0, 2, 3)]:
            with pytest.raises(ValueError, match=r"background must be an RGB colour, 3 integers "
                                                 r"in 0..255 such as \(255, 255, 255\)"):
                ImageArray.from_slide(reader, background=background)
        with pytest.raises(ValueError, match=r"tissue must be a 2-D boolean array"):
            ImageArray.from_slide(reader, tissue=np.ones((24, 32), np.uint8))
        with pytest.raises(ValueError, match=r"is the mask transposed"):
            ImageArray.from_slide(reader, tissue=np.ones((32, 24), bool))
        with pytest.raises(TypeError, match=r"OpenSlide is a slide .*ImageArray.from_slide"):
            run(small_net(), reader, TILE[0])
    with pytest.raises(TypeError, match=r"a slide needs OpenSlide's interface .* ndarray has no "
                                        r"level_dimensions, level_downsamples, read_region"):
        ImageArray.from_slide(np.zeros((8, 8, 3), np.uint8))


# ------------------------------------------------------------------ tissue masks

def test_a_tissue_mask_of_another_aspect_ratio_is_refused(slide):
    """A mask is resampled over the whole level, so one of another shape was once stretched
    silently. A mask of any level of the slide fits, one pixel of rounding either way too
    (level sizes are level 0's divided and rounded, differently by each library)."""
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(slide[0]) as reader:  # level 0: 384 x 512 (height x width)
        for shape in [(384, 512), (192, 256), (96, 128), (97, 128), (96, 127), (3, 4), (768, 1024)]:
            ImageArray.from_slide(reader, 1, tissue=np.ones(shape, bool))
        with pytest.raises(ValueError, match=r"the tissue mask has shape \(24, 40\) \(height, width\), "
                                             r"aspect ratio 1.667 \(width / height\), but the slide "
                                             r"level is 192x256 \(height x width\), aspect ratio "
                                             r"1.333: the mask must cover the whole slide.*a mask 24 "
                                             r"pixels high would be about 32 wide"):
            ImageArray.from_slide(reader, 1, tissue=np.ones((24, 40), bool))
        with pytest.raises(ValueError, match=r"shape \(98, 128\).*about 131 wide"):
            ImageArray.from_slide(reader, 0, tissue=np.ones((98, 128), bool))
    # OpenSlide-like sizes of an odd level 0: each level's size rounded down or up
    height, width = 100001, 75003
    for level, mask in [(1, 32), (4, 64), (16, 128)]:
        for r1 in (math.floor, math.ceil):
            for r2 in (math.floor, math.ceil):
                check_tissue(np.ones((r2(height / mask), r2(width / mask)), bool),
                             (r1(height / level), r1(width / level)))
    with pytest.raises(ValueError, match=r"is the mask transposed"):
        check_tissue(np.ones((width // 32, height // 32), bool), (height, width))


def tissue_slide(seed=5):
    """512 x 512: near-white glass with an ellipse of pink tissue at (200, 300)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:512, :512]
    inside = ((y - 200) / 120) ** 2 + ((x - 300) / 150) ** 2 <= 1
    glass = 238 + rng.integers(-6, 7, (512, 512, 3))
    tissue = np.array([200, 100, 160]) + rng.integers(-40, 41, (512, 512, 3))
    return np.where(inside[..., None], tissue, glass).clip(0, 255).astype(np.uint8), inside


def test_tissue_mask_marks_the_island_and_not_the_glass(tmp_path):
    tiffslide = pytest.importorskip("tiffslide")
    image, inside = tissue_slide()
    with tiffslide.TiffSlide(write_tiff(tmp_path / "tissue.tif", pyramid(image))) as reader:
        mask = tissue_mask(reader)  # the smallest level: 128 x 128
    assert mask.shape == (128, 128) and mask.dtype == np.bool_
    truth = inside[2::4, 2::4]  # the level-0 pixel at each mask pixel's centre
    assert np.mean(mask == truth) > 0.98  # only the ellipse's rim may differ
    assert mask[40:60, 60:90].all() and not mask[:10].any() and not mask[:, -10:].any()


def test_tissue_masked_reads(tmp_path):
    """The masked slide is the slide where the mask says tissue and the background colour
    elsewhere (the mask pixel under each pixel: 4 x 4 level-0 pixels each); a streamed step
    on it is the conventional step on that image; every read is one tile, and tiles without
    tissue are not read at all (they are all one colour)."""
    openslide = pytest.importorskip("openslide")
    image, _ = tissue_slide()
    background = (255, 255, 255)
    with openslide.OpenSlide(write_tiff(tmp_path / "tissue.tif", pyramid(image))) as reader:
        mask = tissue_mask(reader, background=background)
        counting = CountingSlide(reader)
        masked = ImageArray.from_slide(counting, 0, background=background, tissue=mask)
        expected = np.where(np.repeat(np.repeat(mask, 4, 0), 4, 1)[..., None], image,
                            np.array(background, np.uint8))
        assert np.array_equal(masked.array[:, :], expected)
        counting.reads.clear()
        net, tile = small_net(), 128
        assert_same_step(run(net, masked, tile), conventional(net, expected))
    boxes = tile_boxes(net, 512, 512, tile)
    with_tissue = [((c.start, r.start), 0, (len(c), len(r))) for r, c in boxes
                   if np.repeat(np.repeat(mask, 4, 0), 4, 1)[r.start:r.stop, c.start:c.stop].any()]
    assert 0 < len(with_tissue) < len(boxes)
    assert counting.reads == with_tissue + with_tissue


@pytest.mark.parametrize("dedup", [False, True])
def test_stats_count_the_regions_read_not_the_tiles(tmp_path, dedup):
    """``last_stats``' reads are the read_region calls each pass made: tiles without tissue
    are filled with the background colour and not read, so they are not counted (they once
    were: 84 reads counted for 50 calls); without a mask every tile is one call."""
    openslide = pytest.importorskip("openslide")
    image, _ = tissue_slide()
    with openslide.OpenSlide(write_tiff(tmp_path / "tissue.tif", pyramid(image))) as reader:
        for mask in (tissue_mask(reader), None):
            counting = CountingSlide(reader)
            streaming = Streaming(small_net(), 128, transform=normalise, dedup=dedup)
            streaming(ImageArray.from_slide(counting, 0, tissue=mask)).sum().backward()
            stats = streaming.last_stats
            assert stats.forward.reads + stats.backward.reads == len(counting.reads)
            if mask is None:  # every tile read once (dedup: and re-reads to compare)
                assert (stats.forward.reads >= stats.forward.tiles) if dedup else \
                    (stats.forward.reads == stats.forward.tiles)
            else:
                assert 0 < stats.forward.reads < stats.forward.tiles


def test_otsu_threshold_agrees_with_scikit_image():
    """Our few-line Otsu against scikit-image's (an oracle we did not write), on the
    saturation of the tissue slide and on two-peaked random values."""
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(6)
    two_peaks = np.concatenate([rng.normal(60, 15, 3000), rng.normal(170, 25, 1000)])
    for values in [saturation(tissue_slide()[0][::4, ::4]),
                   np.clip(two_peaks, 0, 255).astype(np.int64)]:
        assert otsu_threshold(values) == filters.threshold_otsu(values)
