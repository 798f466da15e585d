"""Every bad input gets a clear error: its type, and a message that names the
layer or operation (with its path in the module), says why, and says what to do."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from streamcnn import Streaming, StreamingError, TileTooSmallError



def x2d(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (1, 3, 32, 32)), dtype=dtype)


def conv():
    return nn.Conv2d(3, 4, 3, padding=1)


class Custom(nn.Module):
    """A user module is traced through: an identity forward streams."""

    def forward(self, x):
        return x


class Shifted(nn.ReLU):
    def forward(self, x):
        return super().forward(x.roll(1, -1))


class Reordered(nn.Sequential):
    def forward(self, x):
        return super().forward(x.flip(-1))


NOT_STREAMABLE = [
    (nn.Linear(4, 4), r"layer '1' \(Linear\) cannot be streamed: it connects every position.*"
                      r"move it after the Streaming module"),
    (nn.Flatten(), r"layer '1' \(Flatten\) cannot be streamed: it reshapes"),
    (nn.AdaptiveAvgPool2d(3), r"layer '1' \(AdaptiveAvgPool2d\) cannot be streamed: it pools over the whole"),
    (nn.AdaptiveMaxPool2d(2), r"layer '1' \(AdaptiveMaxPool2d\) cannot be streamed"),
    (nn.Upsample(scale_factor=1.5), r"layer '1' \(Upsample\) cannot be streamed: it resamples by "
                                    r"scale_factor=1.5"),
    (nn.Upsample(size=8), r"layer '1' \(Upsample\) cannot be streamed: it resamples to size=8"),
    (nn.LPPool2d(2, 2), r"layer '1' \(LPPool2d\) cannot be streamed: it is not a layer streamcnn "
                       r"knows how to stream.*move it after the Streaming module"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
     r"layer '1' \(Conv2d\) cannot be streamed: it uses padding_mode='reflect'; only 'zeros'.*"
     r"use padding_mode='zeros'"),
    (nn.MaxPool2d(2, return_indices=True),
     r"layer '1' \(MaxPool2d\) cannot be streamed: it has return_indices=True"),
    (nn.Conv1d(4, 4, 3), r"layer '1' \(Conv1d\) works on 1-d feature maps but the input is 2-d"),
    # subclasses and Sequentials with their own forward are traced: their operations are checked
    (Reordered(nn.ReLU()), r"operation 'flip' in '1' \(Reordered\) cannot be streamed: it is not "
                           r"an operation streamcnn knows.*\(at test_streaming_errors.py:\d+: "
                           r"`return super\(\).forward\(x.flip\(-1\)\)`\)"),
    (Shifted(), r"operation 'roll' in '1' \(Shifted\) cannot be streamed"),
]


@pytest.mark.parametrize("layer,message", NOT_STREAMABLE,
                         ids=[type(layer).__name__ for layer, _ in NOT_STREAMABLE])
def test_layers_that_cannot_be_streamed(layer, message):
    with pytest.raises(StreamingError, match=message):
        Streaming(nn.Sequential(conv(), layer), 16)


def test_user_module_with_a_plain_forward_streams():
    net = nn.Sequential(conv(), Custom(), nn.ReLU()).double()
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    assert streamcnn.testing.compare(net, x, 16).worst <= 1e-10  # float64: summation order


def test_error_names_nested_path():
    net = nn.Sequential(conv(), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(3, 3))))
    with pytest.raises(StreamingError, match=r"layer '1\.1\.0' \(Linear\)"):
        Streaming(net, 16)


def test_streaming_error_is_a_type_error():
    assert issubclass(StreamingError, TypeError)


@pytest.mark.parametrize("layer,message", [
    (nn.Dropout(0.5), r"layer '1' \(Dropout\) cannot be streamed: it is in training mode.*"
                      r"call \.eval\(\) on it"),
    (nn.Dropout2d(0.1), r"layer '1' \(Dropout2d\) cannot be streamed: it is in training mode"),
    (nn.RReLU(), r"layer '1' \(RReLU\) cannot be streamed: it is in training mode"),
])
def test_training_mode_layers(layer, message):
    """Checked when it runs: users switch modes after wrapping (model.train())."""
    model = Streaming(nn.Sequential(conv(), layer), 16)  # construction is fine
    with pytest.raises(StreamingError, match=message):
        model(x2d())
    with pytest.raises(StreamingError, match=message):
        model.plan((1, 3, 32, 32))
    model.eval()
    model(x2d())  # fine in eval mode


def test_tile_too_small_gives_the_minimum():
    net = nn.Sequential(conv(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5, padding=2))
    rf = streamcnn.receptive_field(net, 2)[0]
    # receptive field 12 px at stride 2; output j reads from 2j - 5, so an interior tile
    # starting at 2k has its first valid output at k + 3, reading from 2k + 1: 13 px
    assert (rf.size, rf.stride, rf.offset, rf.min_tile_size) == (12, 2, 5, 13)
    with pytest.raises(TileTooSmallError, match=r"tile_size 12 is too small along height.*"
                                                r"receptive field of 12.*use tile_size >= 13"):
        Streaming(net, 12)(x2d())
    with pytest.raises(ValueError, match=r"tile_size 12 is too small along width"):
        Streaming(net, (40, 12))(x2d())
    with pytest.raises(TileTooSmallError, match="use tile_size >= 13"):
        streamcnn.plan(net, (1, 3, 32, 32), 12)
    Streaming(net, 13)(x2d())
    Streaming(net, 12)(x2d(1, 3, 12, 12))  # a tile as large as the image is always fine


def test_no_last_tile_on_the_stride_grid():
    """Padding beyond a layer's reach: the last output reads only padding, and a last
    tile of <= 18 px starting on the 9-px grid would leave a layer without input."""
    net = nn.Sequential(nn.MaxPool1d(4, 3, padding=1), nn.MaxPool1d(3, 1, dilation=2),
                        nn.Conv1d(1, 1, 1, stride=3, padding=2))
    assert streamcnn.receptive_field(net, 1)[0].min_tile_size == 18
    with pytest.raises(TileTooSmallError, match=r"tile_size 18 cannot tile length \(20 px\).*"
                                                r"use tile_size >= 20"):
        Streaming(net, 18)(torch.randn(1, 1, 20))
    Streaming(net, 18)(torch.randn(1, 1, 27))  # other lengths work


@pytest.mark.parametrize("tile,error,message", [
    (0, ValueError, "tile_size must be positive"),
    ((16, 16, 16), ValueError, r"tile_size \(16, 16, 16\) has 3 entries but the input has 2"),
    ("16", TypeError, "tile_size must be an int or a tuple of ints"),
    (16.0, TypeError, "tile_size must be an int or a tuple of ints"),
    (True, TypeError, "tile_size must be an int or a tuple of ints"),
])
def test_bad_tile_size(tile, error, message):
    with pytest.raises(error, match=message):
        Streaming(nn.Sequential(conv()), tile)


def test_wrong_rank():
    model = Streaming(nn.Sequential(conv()), 16)
    with pytest.raises(ValueError, match=r"the streamed layers are 2-d and expect input of shape "
                                         r"\(N, C, H, W\), got shape \(1, 3, 32\)"):
        model(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match=r"expects an input of shape \(N, C, L\) or \(N, C, H, W\), "
                                         r"got shape \(3, 32, 32, 2, 2\)"):
        model(torch.randn(3, 32, 32, 2, 2))
    with pytest.raises(ValueError, match=r"got shape \(3, 32\)"):
        model(torch.randn(3, 32))
    with pytest.raises(ValueError, match="input_shape must be"):
        streamcnn.plan(nn.Sequential(conv()), (3, 32), 16)


def test_mixed_rank_layers():
    with pytest.raises(StreamingError, match=r"layer '1' \(MaxPool1d\) works on 1-d feature maps"):
        Streaming(nn.Sequential(conv(), nn.MaxPool1d(2)), 16)


def test_dtype_mismatch():
    model = Streaming(nn.Sequential(conv()), 16)
    with pytest.raises(TypeError, match=r"the input is torch.float64 but layer '0' \(Conv2d\) has "
                                        r"weight of dtype torch.float32"):
        model(x2d(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"the input is torch.float64 but layer '0' \(Conv2d\) has "
                                        r"weight of dtype torch.float32"):  # plan: was torch's
        model.plan((1, 3, 32, 32), input_dtype=torch.float64)       # "Input type (double)..."
    with pytest.raises(TypeError, match=r"the input is torch.int64: give Streaming a transform that "
                                        r"makes each tile floating point"):
        model(torch.ones(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        model([[1.0]])


def test_module_on_several_devices():
    """An input on another device is fine (each tile is copied over); a module split
    across devices is not (on a CPU-only machine the second device is meta, which has no
    data: that is said first)."""
    net = nn.Sequential(conv(), nn.Conv2d(4, 4, 3).to("meta"))
    with pytest.raises(ValueError, match=r"the streamed module has no data: '1.weight', '1.bias' "
                                         r"are on the meta device"):
        Streaming(net, 16)(x2d())
    with pytest.raises(ValueError, match=r"the streamed module has no data"):
        streamcnn.plan(net, (1, 3, 32, 32), 16)


def test_a_module_on_the_meta_device_has_no_data():
    """Conventional torch computes meta tensors from it (and fails in backward with "expected
    device meta but got cpu"); streaming says what is missing and how to materialise it.
    Wrapping it is fine (a model built on meta is materialised later), and so is planning."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta"), nn.ReLU())
    model = Streaming(net, 16)
    assert streamcnn.plan(net, (1, 3, 32, 32), 16).output_shape == (1, 4, 30, 30)
    for x in (x2d(), x2d().numpy()):
        with pytest.raises(ValueError, match=r"the streamed module has no data: '0.weight', '0.bias' "
                                             r"are on the meta device \(shapes only, as when built "
                                             r"under torch.device\('meta'\)\). Materialise it first: "
                                             r"module.to_empty\(device=...\) and then initialise its "
                                             r"weights \(reset_parameters\(\) of each layer\)"):
            model(x)
    net.to_empty(device="cpu")
    net[0].reset_parameters()
    x = x2d()
    torch.testing.assert_close(model(x), net(x))  # float32: summation order


def test_channel_mismatch():
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) expects 3 channels but the input has 5"):
        Streaming(nn.Sequential(conv()), 16)(x2d(1, 5, 32, 32))
    net = nn.Sequential(conv(), nn.ReLU(), nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match=r"layer '2' \(BatchNorm2d\) expects 5 channels but "
                                         r"layer '0' \(Conv2d\) gives 4"):
        Streaming(net, 16)(x2d())


def test_image_too_small_for_the_layers():
    net = nn.Sequential(nn.Conv2d(3, 3, 7))
    with pytest.raises(ValueError, match=r"input is too small along width: 5 pixels give no output.*"
                                         r"at least 7 pixels"):
        Streaming(net, 16)(x2d(1, 3, 9, 5))


@pytest.mark.parametrize("x,message", [
    (x2d(1, 3, 0, 0), r"the input has shape \(1, 3, 0, 0\): height 0 and width 0; a streamed image "
                      r"needs at least one pixel along each spatial axis"),
    (x2d(1, 3, 0, 20), r"the input has shape \(1, 3, 0, 20\): height 0;"),
    (torch.zeros(1, 3, 20, 0).numpy(), r"the input has shape \(1, 3, 20, 0\): width 0;"),
])
@pytest.mark.parametrize("net", [lambda: nn.Sequential(conv()), lambda: nn.Sequential(nn.ReLU())],
                         ids=["conv", "relu"])
def test_an_image_without_pixels_is_refused_naming_its_shape(x, message, net):
    """Conventional torch raises a kernel-size error for the convolution (and returns an empty
    map for a ReLU): an image without pixels has no tiles, so streaming refuses both."""
    with pytest.raises(ValueError, match=message):
        Streaming(net(), 16)(x)


def test_an_empty_batch_runs_as_conventionally():
    net = nn.Sequential(conv(), nn.ReLU())
    x = torch.zeros(0, 3, 32, 32, requires_grad=True)
    y = Streaming(net, 16)(x)
    assert y.shape == net(x).shape == (0, 4, 32, 32)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(net[0].weight.grad, torch.zeros_like(net[0].weight))


def test_not_a_module():
    with pytest.raises(TypeError, match="Streaming needs an nn.Module"):
        Streaming(lambda x: x, 16)


def test_empty_module():
    with pytest.raises(ValueError, match="has no layers"):
        Streaming(nn.Sequential(), 16)


def test_double_backward_is_refused():
    """Not silently a constant: a gradient penalty would otherwise get no gradient."""
    x = x2d().requires_grad_()
    y = Streaming(nn.Sequential(conv(), nn.Tanh()), 16)(x)
    with pytest.raises(RuntimeError, match=r"does not support higher-order gradients"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


class _Unpadded(nn.Module):
    """``x + conv(x)`` with an unpadded conv: the branches never have equal lengths."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return x + self.conv(x)


class _Broadcast(nn.Module):
    """A branch pooled to length 1 and broadcast over the other: fine for one image size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + F.max_pool2d(x, (37, 29))


class _BroadcastSameGrid(nn.Module):
    """A kernel the size of the image: its one output is broadcast over the other branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, (37, 29))

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("net, conventional_runs", [(_Unpadded(), False), (_Broadcast(), True),
                                                    (_BroadcastSameGrid(), True)])
def test_merges_that_never_agree_are_errors_not_hangs(net, conventional_runs):
    """Once an endless search for a minimum image size; an alarm turns a regression into a
    failure instead of a hang."""
    import signal
    x = torch.randn(1, 3, 37, 29)
    if conventional_runs:
        net(x)
    else:
        with pytest.raises(RuntimeError, match="must match the size"):
            net(x)
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("hangs"))
    signal.alarm(30)
    try:
        with pytest.raises((ValueError, StreamingError), match=r"operation 'add' .*(gets inputs of "
                                                                r"different lengths \[37, 35\]; conventional|"
                                                                r"different grids|a branch of length 1 "
                                                                r"is broadcast)"):
            Streaming(net, 16)(x)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
