"""Where the image comes from: a tensor on any device, or an array read tile by tile.

Streaming only ever needs one tile of the input at a time, so the input need not be
a float tensor on the module's device. A source hands out one tile (an index box in
channels-first order, ``(N, C, *spatial)``) at a time:

* :class:`TensorSource` - a tensor anywhere (host memory, pinned or not, or the
  module's device); each tile is a view, copied to the module's device when read;
* :class:`ArraySource` - anything with ``.shape``, ``.dtype`` and numpy-style
  slicing (a numpy array or ``numpy.memmap``, a zarr array, an h5py dataset, a TIFF
  opened through tifffile's zarr store), channels-first or channels-last
  (:class:`ImageArray`). A tile is read when it is needed - in the forward pass and
  again in the backward recomputation - with one slicing call per tile, in
  row-major tile order; nothing image-sized is ever built from it. A whole-slide image
  (OpenSlide, TiffSlide, cuCIM) is such an array through :meth:`ImageArray.from_slide`
  (:mod:`streamcnn.slides`): one ``read_region`` call per tile read.

Both are :class:`Source` s, the one interface the tile loop reads an input through.
"""

from __future__ import annotations

import hashlib
import mmap
from typing import Protocol

import numpy as np
import torch

from .slides import INTERFACE, WHITE, SlideArray

_SPATIAL = {1: "L", 2: "HW"}


class Source(Protocol):
    """Where the tile loop (``function.TileRunner``) reads an input from.

    ``shape`` is ``(N, C, *spatial)``; ``dtype`` and ``device`` are those of every read.
    ``read(box, origin)`` returns the tile at ``box`` (one slice per dimension of
    ``shape``, channels-first; ``origin``, the tile's first pixel, is for messages) as a
    tensor on ``device``. ``fresh`` says whether every read is new memory: a source
    whose reads may be views of the caller's tensor sets it False and holds that tensor
    as ``.tensor``, so the loop copies a tile before the module can change it in place.
    ``reads`` counts the reads from the source's storage so far: one per ``read``, except
    for a slide level with a tissue mask, whose regions without tissue are not read (only
    its ``read_region`` calls count). The tile loop reads one tile at a time.
    """

    shape: tuple
    dtype: torch.dtype
    device: torch.device
    fresh: bool
    reads: int

    def read(self, box: tuple, origin: tuple) -> torch.Tensor: ...


class ImageArray:
    """An image that is not a tensor: an array-like plus the order of its dimensions.

    ``layout`` names each dimension: ``N`` (batch), ``C`` (channels) and the spatial
    axes ``H``, ``W`` (2D) or ``L`` (1D), e.g. ``"NHWC"`` for a channels-last batch or
    ``"HWC"`` for one RGB slide (the batch of one is added). Default: channels-first
    with a batch, ``"NCHW"`` for 4 dimensions, ``"NCL"`` for 3.

    ``shape`` is the image as streamed, ``(N, C, *spatial)``, and ``dtype`` the torch dtype
    of its tiles, so ``plan(module, x.shape, tile, input_dtype=x.dtype, ...)`` plans it.

        >>> slide = np.memmap("slide.raw", np.uint8, "r", shape=(65536, 65536, 3))
        >>> out = streaming(ImageArray(slide, "HWC"))
    """

    def __init__(self, array, layout: str | None = None):
        if not hasattr(array, "shape") and all(hasattr(array, a) for a in INTERFACE):
            raise TypeError(f"{type(array).__name__} is a slide (it has read_region and "
                            f"level_dimensions): stream one of its levels with "
                            f"ImageArray.from_slide(slide, level)")
        for attr in ("shape", "dtype", "__getitem__"):
            if not hasattr(array, attr):
                raise TypeError(
                    f"Streaming expects a torch.Tensor or an array with .shape, .dtype and "
                    f"numpy-style slicing (numpy, numpy.memmap, zarr, h5py); "
                    f"{type(array).__name__} has no {attr}")
        rank = len(array.shape)
        layout = layout or {4: "NCHW", 3: "NCL"}.get(rank, "")
        letters = sorted(layout.replace("N", "")) if layout else []
        if len(layout) != rank or len(set(layout)) != rank or letters not in (
                sorted("CHW"), sorted("CL")):
            raise ValueError(
                f"layout {layout!r} does not describe an array of shape {tuple(array.shape)}: "
                f"name each of its {rank} dimensions once with N (batch, optional), C "
                f"(channels) and H, W (2D) or L (1D), e.g. 'NCHW', 'NHWC' or 'HWC'")
        self.array, self.layout = array, layout

    @property
    def shape(self) -> tuple:
        """``(N, C, *spatial)`` as streamed: channels first, a batch of one added where the
        layout has no ``N`` (``(1, 3, height, width)`` for a slide level)."""
        sizes = dict(zip(self.layout, self.array.shape))
        spatial = [d for d in self.layout if d not in "NC"]
        return tuple(int(sizes.get(d, 1)) for d in ("N", "C", *_SPATIAL[len(spatial)]))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of every tile read (the array's, as torch names it): what
        ``plan(..., input_dtype=x.dtype)`` takes, and what a ``transform`` receives."""
        return torch_dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        try:
            dtype = str(self.dtype).replace("torch.", "")
        except TypeError:  # torch has no such dtype: say the array's
            dtype = str(self.array.dtype)
        return (f"ImageArray(shape={self.shape}, dtype={dtype}, layout={self.layout!r}, "
                f"source={_describe(self.array)})")

    @classmethod
    def from_slide(cls, slide, level: int = 0, *, background=WHITE,
                   tissue=None) -> "ImageArray":
        """One level of a whole-slide image, streamed as an RGB uint8 image ``(1, 3, H, W)``.

        ``slide`` has OpenSlide's interface (``openslide.OpenSlide(path)``,
        ``tiffslide.TiffSlide(path)``, or an adapter such as the cuCIM one in
        :mod:`streamcnn.slides`). Each tile read is one ``slide.read_region`` call of the
        tile's size, at the tile's top-left pixel converted to level-0 coordinates
        (:func:`streamcnn.slides.level0_location`). Transparent pixels (outside the
        scanned area) are composited over ``background``, an RGB colour.

        ``tissue``: a boolean mask over the whole slide (True: tissue), e.g.
        :func:`streamcnn.slides.tissue_mask`, at any resolution but with the slide's
        aspect ratio (up to a pixel of rounding; another is refused); pixels outside it
        are read as ``background``, which changes the image the network sees.

            >>> slide = openslide.OpenSlide("biopsy.svs")
            >>> out = streaming(ImageArray.from_slide(slide, level=1))
        """
        return cls(SlideArray(slide, level, background=background, tissue=tissue), "HWC")


def _describe(array) -> str:
    """What an image is read from, for ``repr``: a slide's reader and level, a memmap's
    file, else the array's type (``numpy.ndarray``, ``zarr.Array``, ``h5py.Dataset``)."""
    if isinstance(array, SlideArray):
        masked = ", tissue-masked" if array.tissue is not None else ""
        return f"{type(array.slide).__name__} level {array.level}{masked}"
    if isinstance(array, np.memmap) and getattr(array, "filename", None):
        return f"numpy.memmap of {str(array.filename)!r}"
    kind = type(array)
    return f"{kind.__module__.partition('.')[0]}.{kind.__qualname__}"


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of an array's numpy dtype (a clear error if torch has none)."""
    if isinstance(dtype, torch.dtype):  # an ImageArray of a tensor
        return dtype
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
    except TypeError as err:
        raise TypeError(f"the input array has dtype {dtype}, which torch cannot hold") from err


class TensorSource:
    """Tiles of a tensor: views, on the tensor's own device."""

    def __init__(self, x: torch.Tensor):
        self.tensor = x
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.fresh = False  # reads are views of the caller's tensor
        self.reads = 0

    def read(self, box: tuple, origin) -> torch.Tensor:
        self.reads += 1
        return self.tensor[box]


class ArraySource:
    """Tiles of an array-like, read on demand into fresh host tensors."""

    def __init__(self, image: ImageArray):
        self.array, self.layout = image.array, image.layout
        self.spatial = [d for d in self.layout if d not in "NC"]
        ndim = len(self.spatial)
        self.order = ("N", "C") + tuple(_SPATIAL[ndim])  # channels-first dimension names
        self.shape, self.dtype, self.device = image.shape, image.dtype, torch.device("cpu")
        self.fresh = True
        self.reads = 0
        self.release = _page_releaser(self.array)

    def read(self, box: tuple, origin) -> torch.Tensor:
        by_name = dict(zip(self.order, box))
        index = tuple(by_name[d] for d in self.layout)
        expected = tuple(len(range(*by_name[d].indices(self.shape[k])))
                         for k, d in enumerate(self.order))
        slide = self.array if isinstance(self.array, SlideArray) else None
        calls = slide.calls if slide is not None else 0
        try:
            data = np.array(self.array[index], copy=True)
            self.reads += slide.calls - calls if slide is not None else 1
        except Exception as err:
            raise OSError(f"reading the input tile at {origin} (pixel offsets per spatial axis) "
                          f"failed: {type(err).__name__}: {err}") from err
        finally:
            self.release()
        got = dict(zip(self.layout, data.shape))
        if data.ndim != len(self.layout) or tuple(got.get(d, 1) for d in self.order) != expected:
            raise ValueError(
                f"the input array gave a piece of shape {data.shape} for the tile at {origin}, "
                f"expected {tuple(expected[self.order.index(d)] for d in self.layout)} (layout "
                f"{self.layout}): its .shape {tuple(self.array.shape)} does not describe its data")
        tile = torch.from_numpy(data)
        present = [d for d in self.order if d in self.layout]
        tile = tile.permute([self.layout.index(d) for d in present])
        return tile if "N" in self.layout else tile.unsqueeze(0)


def digest(tile: torch.Tensor) -> bytes:
    """A fingerprint of a host tile's pixels (BLAKE2b, 128 bits), to tell whether a later read
    gives the same pixels."""
    return hashlib.blake2b(np.ascontiguousarray(tile.numpy()).data, digest_size=16).digest()


def _page_releaser(array):
    """After each read of a read-only numpy.memmap, drop its pages from this process's
    resident set: they stay in the kernel's page cache (a re-read is fast) but do not
    count as this process's memory, so reading a slide larger than RAM keeps the
    process at one tile. Other arrays: nothing to do."""
    handle = getattr(array, "_mmap", None)
    if not isinstance(handle, mmap.mmap) or getattr(array, "mode", None) != "r":
        return lambda: None
    return lambda: handle.madvise(mmap.MADV_DONTNEED)


def tensor_of(x):
    """``x`` itself, or for an :class:`ImageArray` of a torch tensor that tensor as a
    channels-first view (autograd and the device stay the tensor's)."""
    if not isinstance(x, ImageArray) or not isinstance(x.array, torch.Tensor):
        return x
    spatial = [d for d in x.layout if d not in "NC"]
    present = [d for d in ("N", "C") if d in x.layout] + spatial
    view = x.array.permute([x.layout.index(d) for d in present])
    return view if "N" in x.layout else view.unsqueeze(0)


def source_of(x) -> Source:
    """The source for an input: a tensor, an :class:`ImageArray`, or a bare array-like
    (channels-first)."""
    if isinstance(x, torch.Tensor):
        return TensorSource(x)
    return ArraySource(x if isinstance(x, ImageArray) else ImageArray(x))
