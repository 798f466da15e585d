"""Inputs that are not a float tensor on the module's device: integer images with a
per-tile transform, numpy arrays and memmaps (channels-first or channels-last), any
array-like with .shape/.dtype/slicing, and tensors on another device.

Oracle: the in-memory float tensor path - the same module streamed over
``transform(image)`` as one float64 tensor - which test_streaming_equivalence proves
equal to conventional autograd. The transform is elementwise and the tiles are the
same, so every tile computes the same numbers in the same order: outputs and
gradients must be *identical* (float64, bit for bit), not merely close.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn import ImageArray, Streaming, StreamingError

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


def normalise(t):
    """uint8 tile -> float64, normalised per channel (what a slide loader does)."""
    return (t.double() / 255 - MEAN) / STD


def front():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1)).double()


def image(shape=(2, 3, 75, 61), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def run(net, x, transform=None, tile=23):
    """Output and parameter gradients of one streamed step (fixed output gradient)."""
    net.zero_grad(set_to_none=True)
    y = Streaming(net, tile, transform=transform)(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    y.backward(g)
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def reference(net, img, tile=23):
    return run(net, normalise(torch.from_numpy(img)), tile=tile)


def assert_identical(got, ref):
    (y, grads), (y_ref, grads_ref) = got, ref
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


class CountingArray:
    """The minimal array-like: ``.shape``, ``.dtype`` and ``__getitem__`` only, recording
    every read (a zarr array or an h5py dataset is read the same way)."""

    def __init__(self, data):
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(index)
        return self._data[index]


def test_uint8_tensor_with_transform():
    net, img = front(), image()
    assert_identical(run(net, torch.from_numpy(img), normalise), reference(net, img))


def test_numpy_array_channels_first():
    net, img = front(), image()
    assert_identical(run(net, img, normalise), reference(net, img))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_memmap_on_disk(tmp_path, layout):
    net, img = front(), image()
    stored = img if layout == "NCHW" else img.transpose(0, 2, 3, 1)
    mm = np.memmap(tmp_path / "slide.raw", dtype=np.uint8, mode="w+", shape=stored.shape)
    mm[:] = stored
    mm.flush()
    ro = np.memmap(tmp_path / "slide.raw", dtype=np.uint8, mode="r", shape=stored.shape)
    assert_identical(run(net, ImageArray(ro, layout), normalise), reference(net, img))


def test_one_slide_without_batch_dimension():
    net, img = front(), image((1, 3, 70, 66))
    hwc = img[0].transpose(1, 2, 0).copy()
    assert_identical(run(net, ImageArray(hwc, "HWC"), normalise), reference(net, img))


def test_float_memmap_without_transform(tmp_path):
    net = front()
    data = np.random.default_rng(1).standard_normal((1, 3, 64, 50))
    mm = np.memmap(tmp_path / "x.raw", dtype=np.float64, mode="w+", shape=data.shape)
    mm[:] = data
    assert_identical(run(net, mm), run(net, torch.from_numpy(data)))


def test_each_tile_is_read_once_per_pass_and_no_read_spans_two_tiles():
    net, img = front(), image()
    arr = CountingArray(img)
    tile = 23
    plan = streamcnn.plan(net, img.shape, tile, input_dtype=torch.uint8, input_device="array",
                          transform=normalise)
    boxes = [tuple(slice(a, b) for a, b in zip(starts, stops))
             for starts, stops in zip(
                 [(h, w) for h in plan.tile_starts[0] for w in plan.tile_starts[1]],
                 [(h, w) for h in plan.tile_stops[0] for w in plan.tile_stops[1]])]
    y = Streaming(net, tile, transform=normalise)(arr)
    forward = [r[2:] for r in arr.reads]
    assert forward == boxes  # row-major, one read per tile
    y.sum().backward()
    assert [r[2:] for r in arr.reads[len(boxes):]] == boxes  # again once each in the backward
    assert all(r[:2] == (slice(None), slice(None)) for r in arr.reads)


def test_nothing_is_written_into_the_input():
    """The first layer works in place; the image (tensor or array) stays as it was."""
    net = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 3, 3, padding=1)).double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    Streaming(net, 16)(x).sum().backward()
    assert torch.equal(x.detach(), before)
    arr = np.random.default_rng(0).standard_normal((1, 3, 40, 40))
    copy = arr.copy()
    Streaming(net, 16)(arr).sum().backward()
    assert np.array_equal(arr, copy)


def test_input_gradient_of_a_float_tensor_through_the_transform():
    """A float image that requires grad gets its gradient through the transform."""
    net = front()
    x = torch.rand(1, 3, 50, 44, dtype=torch.float64, requires_grad=True)
    scale = lambda t: (t - 0.5) * 4  # noqa: E731
    y = Streaming(net, 23, transform=scale)(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(net(scale(x2)).pow(2).sum(), x2)
    assert streamcnn.testing.rel_err(gx, ref) <= 1e-10


def test_module_on_the_input_device_is_the_same_path():
    """On this CPU machine 'another device' is the same device; on a GPU the tiles of a
    host tensor are copied to the module's device (verify/ runs this there too)."""
    net, img = front(), image()
    x = torch.from_numpy(img)
    if torch.cuda.is_available():
        y, _ = run(front().cuda(), x, lambda t: (t.cuda().double() / 255 - MEAN.cuda()) / STD.cuda())
        assert y.device.type == "cuda"
    assert_identical(run(net, x, normalise), reference(net, img))


@pytest.mark.parametrize("kind", ["numpy", "memmap", "zarr"])
def test_image_array_says_its_shape_dtype_and_source(kind, tmp_path):
    """``shape``/``dtype`` are what the tile loop reads (channels first, a batch of one
    added), so ``plan(net, x.shape, tile, input_dtype=x.dtype)`` plans exactly this input."""
    hwc = image((1, 3, 40, 56))[0].transpose(1, 2, 0).copy()  # height 40, width 56, RGB
    if kind == "memmap":
        array = np.memmap(tmp_path / "slide.raw", np.uint8, "w+", shape=hwc.shape)
        array[:] = hwc
        source = f"numpy.memmap of {str(tmp_path / 'slide.raw')!r}"
    elif kind == "zarr":
        zarr = pytest.importorskip("zarr")
        array = zarr.create_array(tmp_path / "slide.zarr", shape=hwc.shape, dtype=np.uint8,
                                  chunks=(16, 16, 3))
        array[:] = hwc
        source = "zarr.Array"
    else:
        array, source = hwc, "numpy.ndarray"
    x = ImageArray(array, "HWC")
    assert x.shape == (1, 3, 40, 56) and x.ndim == 4 and x.dtype == torch.uint8
    assert repr(x) == f"ImageArray(shape=(1, 3, 40, 56), dtype=uint8, layout='HWC', source={source})"
    p = streamcnn.plan(front(), x.shape, 23, input_dtype=x.dtype, input_device="array",
                       transform=normalise)
    assert p.output_shape == tuple(Streaming(front(), 23, transform=normalise)(x).shape)
    line = ImageArray(np.zeros((5, 9, 2), np.float32), "LNC")  # 1D, channels last
    assert line.shape == (9, 2, 5) and line.ndim == 3 and line.dtype == torch.float32


# ------------------------------------------------------------- bad input: clear errors, before any work

class Failing(CountingArray):
    def __getitem__(self, index):
        if index[2].start and index[3].start:
            raise OSError("disk read error")
        return super().__getitem__(index)


def test_a_failed_read_names_the_tile():
    starts = streamcnn.plan(front(), (2, 3, 75, 61), 23, input_dtype=torch.uint8,
                            transform=normalise).tile_starts
    where = rf"\({starts[0][1]}, {starts[1][1]}\)"  # the first tile off both borders fails
    with pytest.raises(OSError, match=rf"reading the input tile at {where} \(pixel offsets per "
                                      rf"spatial axis\) failed: OSError: disk read error"):
        Streaming(front(), 23, transform=normalise)(Failing(image()))


class Lying(CountingArray):
    """Claims more rows than it holds, like a truncated file behind a shape from its header."""

    def __init__(self, data):
        super().__init__(data)
        self.shape = (data.shape[0], data.shape[1], data.shape[2] + 30, data.shape[3])


def test_an_array_whose_shape_lies_names_the_tile():
    p = streamcnn.plan(front(), (2, 3, 105, 61), 23, input_dtype=torch.uint8, transform=normalise)
    row = next(k for k, stop in enumerate(p.tile_stops[0]) if stop > 75)  # first past the data
    start, stop = p.tile_starts[0][row], p.tile_stops[0][row]
    with pytest.raises(ValueError, match=rf"the input array gave a piece of shape \(2, 3, {75 - start}, "
                                         rf"23\) for the tile at \({start}, 0\), expected \(2, 3, "
                                         rf"{stop - start}, 23\).*its .shape \(2, 3, 105, 61\) does "
                                         rf"not describe its data"):
        Streaming(front(), 23, transform=normalise)(Lying(image()))


def test_wrong_channels_or_rank_fail_before_any_read():
    arr = CountingArray(image((2, 4, 40, 40)))
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) expects 3 channels but the input has 4"):
        Streaming(front(), 23, transform=lambda t: t.double())(arr)
    flat = CountingArray(image((2, 3, 40)))
    with pytest.raises(ValueError, match=r"the streamed layers are 2-d and expect input of shape "
                                         r"\(N, C, H, W\), got shape \(2, 3, 40\)"):
        Streaming(front(), 23, transform=lambda t: t.double())(flat)
    assert arr.reads == [] and flat.reads == []


@pytest.mark.parametrize("transform,message", [
    (lambda t: t, r"the transform turned a tile of shape .* \(torch.uint8\) into one of shape .* "
                  r"\(torch.uint8\); it must return a floating-point tile of the same spatial shape"),
    (lambda t: t.double()[:, :, :20], r"operation 'getitem' in the transform cannot be streamed: it "
                                     r"indexes spatial positions"),
    (lambda t: torch.nn.functional.interpolate(t.double(), scale_factor=2.0),
     r"the transform turned a tile of shape \(2, 3, 23, 23\) \(torch.uint8\) into one of shape "
     r"\(2, 3, 46, 46\) \(torch.float64\); it must return a floating-point tile of the same spatial"),
])
def test_bad_transform(transform, message):
    with pytest.raises(StreamingError, match=message):
        Streaming(front(), 23, transform=transform)(image())


class ToDouble(nn.Module):
    def forward(self, t):
        return t.double() / 255


@pytest.mark.parametrize("transform,name", [(normalise, "'normalise'"), (ToDouble(), r"\(ToDouble\)"),
                                            (lambda t: t.double(), r"\(a lambda\)")])
def test_a_transform_in_another_dtype_than_the_module(transform, name):
    """A float64 transform before a float32 network: torch said "Input type (double) and bias
    type (float) should be the same"; Streaming and plan name the transform, both dtypes and
    the layer, and the fix."""
    net = front().float()
    message = (rf"the transform {name} returned a torch.float64 tile but layer '0' \(Conv2d\) has "
               rf"weight of dtype torch.float32: make the transform return torch.float32, e.g. end "
               rf"it with \.float\(\) \(or convert the module with \.to\(torch.float64\)\)")
    with pytest.raises(StreamingError, match=message):
        Streaming(net, 23, transform=transform)(image())
    with pytest.raises(StreamingError, match=message):
        streamcnn.plan(net, (2, 3, 75, 61), 23, input_dtype=torch.uint8, transform=transform)
    fixed = Streaming(net, 23, transform=lambda t: t.double().float() / 255)(image())
    assert fixed.dtype == torch.float32


def test_integer_input_needs_a_transform_and_cannot_require_grad():
    with pytest.raises(TypeError, match=r"the input is torch.uint8: give Streaming a transform"):
        Streaming(front(), 23)(image())
    with pytest.raises(ValueError, match=r"an input of dtype torch.uint8 cannot require a gradient"):
        streamcnn.plan(front(), (1, 3, 64, 64), 23, input_dtype=torch.uint8,
                       requires_input_grad=True, transform=normalise)
    with pytest.raises(TypeError, match="transform must be callable"):
        Streaming(front(), 23, transform="normalise")


def test_not_an_array():
    with pytest.raises(TypeError, match=r"expects a torch.Tensor or an array with .shape, .dtype and "
                                        r"numpy-style slicing.*list has no shape"):
        Streaming(front(), 23)([[1, 2], [3, 4]])


@pytest.mark.parametrize("layout", ["NCH", "NHCC", "NCHX", "HWC"])
def test_layout_must_name_each_dimension_once(layout):
    with pytest.raises(ValueError, match=rf"layout '{layout}' does not describe an array of shape "
                                         rf"\(2, 3, 75, 61\)"):
        ImageArray(image(), layout)


def test_plan_reports_where_the_memory_is():
    net = front()
    shape = (1, 3, 4096, 4096)
    on_device = streamcnn.plan(net, shape, 1024)
    host = streamcnn.plan(net, shape, 1024, input_device="meta")
    array = streamcnn.plan(net, shape, 1024, input_dtype=torch.uint8, input_device="array",
                           transform=normalise)
    pixels = 3 * 4096 * 4096
    assert on_device.input_location == "device" and on_device.host_bytes == 0
    assert host.input_location == "host" and host.host_bytes == pixels * 8
    assert host.device_peak_bytes == on_device.device_peak_bytes - pixels * 8 + 3 * 1024 * 1024 * 8
    assert array.input_location == "array" and array.input_bytes == 0
    assert array.streaming_peak_bytes == array.device_peak_bytes
    assert "read tile by tile from its array" in str(array) and "input (1, 3, 4096, 4096) uint8" in str(array)
    assert "in host memory (the input)" in str(host)
