"""Upsampling streamed exactly: encoder-decoders (U-Nets), transposed convolutions,
interpolation, pixel shuffle and size reads, against conventional autograd (the oracle).

Tolerances: float64 1e-10 relative to the largest magnitude (``testing.rel_err``): the
tiles compute the same values, and the gradients' sums over tiles run in another order
(~1e-16 per operation). float32 1e-4 for the same reason at float32's rounding.

The geometry (``streamcnn.geometry``: ``Upsample``, ``Transposed``, fractional strides,
the grid a tile starts on) is checked against torch itself: output lengths against
torch's layers for every parameter drawn, and receptive fields against the dependency
region autograd finds.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_graph_refusals import Functional
from test_streaming_properties import SETTINGS

import streamcnn
from streamcnn import Streaming, StreamingError
from streamcnn.geometry import Transposed, Upsample, Window, grid, tile_axis
from streamcnn.testing import ALL_PATHS, compare, rel_err

F64, F32 = 1e-10, 1e-4


def rand(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- decoders

def up_layer(kind: str, c: int, rank: int = 2) -> nn.Module:
    """One upsampling by 2 of a ``c``-channel map, keeping ``c`` channels."""
    conv_t = nn.ConvTranspose1d if rank == 1 else nn.ConvTranspose2d
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    linear = "linear" if rank == 1 else "bilinear"
    return {
        "nearest": lambda: nn.Upsample(scale_factor=2),
        "nearest-exact": lambda: nn.Upsample(scale_factor=2, mode="nearest-exact"),
        "linear": lambda: nn.Upsample(scale_factor=2, mode=linear),
        "transposed 2/2": lambda: conv_t(c, c, 2, 2),
        "transposed 3/2 pad 1 out 1": lambda: conv_t(c, c, 3, 2, padding=1, output_padding=1),
        "transposed 4/2 pad 1": lambda: conv_t(c, c, 4, 2, padding=1),
        "transposed dilated": lambda: conv_t(c, c, 3, 2, padding=2, output_padding=1, dilation=2),
        "transposed grouped": lambda: conv_t(c, c, 2, 2, groups=c // 2, bias=False),
        "pixel shuffle": lambda: nn.Sequential(conv(c, 4 * c, 1), nn.PixelShuffle(2)),
    }[kind]()


UP_KINDS = ["nearest", "nearest-exact", "linear", "transposed 2/2", "transposed 3/2 pad 1 out 1",
            "transposed 4/2 pad 1", "transposed dilated", "transposed grouped", "pixel shuffle"]


class UNet(nn.Module):
    """A U-Net of ``depth`` levels: 3x3 convolutions with padding, 2x2 max-pool down,
    ``up`` back, the skip concatenated (or added)."""

    def __init__(self, up: str, depth: int = 2, c: int = 4, rank: int = 2, skip: str = "cat",
                 down: str = "pool"):
        super().__init__()
        conv = nn.Conv1d if rank == 1 else nn.Conv2d
        self.skip = skip
        self.stem = conv(3, c, 3, padding=1)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool1d(2) if rank == 1 else nn.MaxPool2d(2),
                          conv(c, c, 3, padding=1), nn.ReLU()) if down == "pool" else
            nn.Sequential(nn.PixelUnshuffle(2), conv(4 * c, c, 1), nn.ReLU())
            for _ in range(depth))
        self.ups = nn.ModuleList(up_layer(up, c, rank) for _ in range(depth))
        self.fuse = nn.ModuleList(conv(2 * c if skip == "cat" else c, c, 3, padding=1)
                                  for _ in range(depth))
        self.head = conv(c, 2, 1)

    def encode(self, x):
        """The stem and the way down: the deepest map, and the skips finest first."""
        x = torch.relu(self.stem(x))
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        return x, skips

    def forward(self, x):
        x, skips = self.encode(x)
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = up(x)
            x = torch.cat([skip, x], 1) if self.skip == "cat" else x + skip
            x = torch.tanh(fuse(x))
        return self.head(x)


def unet(up, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    return UNet(up, **kwargs).to(dtype)


@pytest.mark.parametrize("up", UP_KINDS)
def test_unet_2d(up):
    """Several tiles per axis, an image that is no multiple of the tile."""
    cmp = compare(unet(up), rand(1, 3, 92, 76), 40)
    assert cmp.worst <= F64, cmp


@pytest.mark.parametrize("up", ["nearest", "linear", "transposed 3/2 pad 1 out 1",
                                "transposed 4/2 pad 1", "transposed dilated"])
def test_unet_1d(up):
    cmp = compare(unet(up, rank=1), rand(2, 3, 124), 44)
    assert cmp.worst <= F64, cmp


def test_every_entry_path():
    cmp = compare(unet("transposed 4/2 pad 1", skip="add"), rand(2, 3, 80, 72), 40,
                  paths=ALL_PATHS)
    assert len(cmp.paths) == len(ALL_PATHS) and cmp.worst <= F64, cmp


def test_pixel_unshuffle_encoder_and_pixel_shuffle_decoder():
    """Space-to-depth down (input lengths must be multiples of 2 at every level, tiles too)."""
    cmp = compare(unet("pixel shuffle", down="unshuffle"), rand(1, 3, 48, 40), 20)
    assert cmp.worst <= F64, cmp


def test_float32():
    cmp = compare(unet("linear", dtype=torch.float32), rand(1, 3, 88, 72, dtype=torch.float32),
                  40, channels_last=False)
    assert cmp.worst <= F32, cmp


def test_tiles_at_the_minimum():
    """The smallest tile plan() gives streams, each axis cut into many tiles."""
    net = unet("transposed 3/2 pad 1 out 1")
    least = streamcnn.plan(net, (1, 3, 64, 64), 64).min_tile_size
    cmp = compare(net, rand(1, 3, 64, 64), least)
    assert cmp.worst <= F64, cmp


class SuperResolution(nn.Module):
    """ESPCN-like: the output is twice as fine as the input (output stride 1/2)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.Tanh(),
                                  nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x) + F.interpolate(x, scale_factor=2, mode="bilinear")


def test_output_finer_than_the_input():
    torch.manual_seed(0)
    net = SuperResolution().double()
    cmp = compare(net, rand(1, 3, 30, 26), 12)
    assert cmp.worst <= F64, cmp
    assert streamcnn.plan(net, (1, 3, 30, 26), 12).output_shape == (1, 3, 60, 52)


class SizeReads(nn.Module):
    """torchvision's FPN top-down step (``F.interpolate(top, size=lateral.shape[-2:])``) and
    an FCN head interpolated back to the input's size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.c2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.lateral = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        top = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        y = self.lateral(a) + top
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_size_reads_that_match_maps():
    torch.manual_seed(0)
    cmp = compare(SizeReads().double(), rand(1, 3, 48, 40), 24)
    assert cmp.worst <= F64, cmp


def test_size_read_by_axis():
    """``size=(y.size(2), y.size(3))`` and ``y.size()[2:]`` read the same sizes."""
    class Net(SizeReads):
        def forward(self, x):
            a = F.relu(self.c1(x))
            top = F.interpolate(F.relu(self.c2(a)), size=(a.size(2), a.size(3)))
            return F.interpolate(self.lateral(a) + top, size=x.size()[2:], mode="bilinear")
    torch.manual_seed(0)
    cmp = compare(Net().double(), rand(1, 3, 40, 40), 24)
    assert cmp.worst <= F64, cmp


def test_an_image_whose_maps_do_not_match_fails_as_conventional():
    """An odd size: the decoder's map is one short of the skip's; torch raises, and so does
    Streaming, naming the merge."""
    net = unet("nearest", depth=1)
    x = rand(1, 3, 41, 40)
    with pytest.raises(RuntimeError):
        net(x)
    with pytest.raises(ValueError, match=r"cannot run on 41 pixels along height.*different "
                                         r"lengths \[41, 40\]"):
        Streaming(net, 24)(x)


# ---------------------------------------------------------------- crops and pads from sizes

class OriginalUNet(nn.Module):
    """Ronneberger et al.'s U-Net in small: unpadded 3x3 convolutions, so each skip is larger
    than the decoder's map and is centre-cropped to it by sizes read at run time."""

    def __init__(self, depth: int = 2, c: int = 4):
        super().__init__()
        def twice(cin):
            return nn.Sequential(nn.Conv2d(cin, c, 3), nn.ReLU(), nn.Conv2d(c, c, 3), nn.ReLU())
        self.stem = twice(3)
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), twice(c)) for _ in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, 2) for _ in range(depth))
        self.fuse = nn.ModuleList(twice(2 * c) for _ in range(depth))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for up, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = up(x)
            dy, dx = (skip.size(2) - x.size(2)) // 2, (skip.size(3) - x.size(3)) // 2
            skip = skip[:, :, dy:dy + x.size(2), dx:dx + x.size(3)]
            x = fuse(torch.cat([skip, x], 1))
        return self.head(x)


class PadToSkip(nn.Module):
    """milesial/Pytorch-UNet's ``Up``: the upsampled map padded to the skip's size."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, 2, 1)
        self.up = nn.ConvTranspose2d(4, 4, 2, 2)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        x2 = self.a(x).relu()
        x1 = self.up(self.down(x2).relu())
        dy, dx = x2.size()[2] - x1.size()[2], x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.out(torch.cat([x2, x1], 1))


def test_original_unet_with_centre_crops():
    """Sizes that pool evenly at every level (124 = 4 + 4k after the stem) and an image of
    several tiles per axis."""
    torch.manual_seed(0)
    net = OriginalUNet().double()
    cmp = compare(net, rand(1, 3, 124, 140), 80)
    assert cmp.worst <= F64, cmp


def test_original_unet_refuses_an_image_its_crops_shift_on():
    """On 122 pixels a pooling halves an odd length, and the crop starts a pixel later than
    on the grid's lengths: conventional torch runs it, streaming says why it cannot."""
    torch.manual_seed(0)
    net = OriginalUNet().double()
    net(rand(1, 3, 122, 124))
    with pytest.raises(ValueError, match=r"along height: .*crops or pads by amounts it computes "
                                         r"from map sizes"):
        Streaming(net, 80)(rand(1, 3, 122, 124))


def test_pad_to_the_skips_size():
    torch.manual_seed(0)
    cmp = compare(PadToSkip().double(), rand(1, 3, 40, 44), 20)
    assert cmp.worst <= F64, cmp


def test_constant_crop():
    """``x[..., 2:-2]`` after valid convolutions: a crop by constants."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Functional(lambda x: x[:, :, 2:-2, 1:]),
                        nn.Conv2d(4, 2, 3)).double()
    cmp = compare(net, rand(1, 3, 40, 36), 16)
    assert cmp.worst <= F64, cmp


# ---------------------------------------------------------------- refusals

REFUSED = {
    "align corners": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                              align_corners=True), r"align_corners=True"),
    "bilinear module": (nn.UpsamplingBilinear2d(scale_factor=2), r"align_corners=True"),
    "fractional factor": (nn.Upsample(scale_factor=1.5), r"resamples by scale_factor=1.5"),
    "factor 3 bilinear": (nn.Upsample(scale_factor=3, mode="bilinear"),
                          r"resamples by 3: torch computes the source positions in floating point"),
    "factor 3 nearest": (nn.Upsample(scale_factor=3), r"resamples by 3"),
    "fixed size": (lambda x: F.interpolate(x, size=(50, 50)), r"resamples to size=\(50, 50\)"),
    "bicubic": (nn.Upsample(scale_factor=2, mode="bicubic"), r"mode='bicubic'"),
    "antialias": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", antialias=True),
                  r"antialias=True"),
    "downsampling": (lambda x: F.interpolate(x, scale_factor=0.5), r"scale_factor=0.5"),
    "size as a number": (lambda x: x * x.shape[-1], r"reads the feature map's spatial size"),
    "size of a coarser map": (lambda x: F.interpolate(x, size=F.max_pool2d(x, 2).shape[-2:]),
                              r"a map whose grid is 1/2 times as fine"),
    "crop to a fixed stop": (lambda x: x[:, :, :30], r"indexes spatial positions"),
    "crop by a size of another axis": (lambda x: x[:, :, x.size(3) // 4:], r"pads or crops by sizes "
                                                                           r"of other axes"),
    "crop that grows with the image": (lambda x: x[:, :, x.size(2) // 4:],
                                       r"crops its start by an amount it computes from map sizes "
                                       r"that differs"),
    "channels-last layout": (lambda x: F.interpolate(x.permute(0, 2, 3, 1), scale_factor=2),
                             r"windows need the channels-first layout"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_reason(name):
    layer, message = REFUSED[name]
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                        layer if isinstance(layer, nn.Module) else Functional(layer),
                        nn.Conv2d(4 if name != "channels-last layout" else 40, 2, 1)).double()
    with pytest.raises(StreamingError, match=message):
        Streaming(net, 16)(rand(1, 3, 40, 40))


# ---------------------------------------------------------------- geometry against torch

@settings(max_examples=200, **SETTINGS)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 3), st.integers(0, 2),
       st.integers(1, 2), st.integers(1, 30))
def test_transposed_length_is_torchs(kernel, stride, padding, output_padding, dilation, n):
    if output_padding >= max(stride, dilation):
        return  # torch refuses the layer
    rule = Transposed(kernel, stride, padding, output_padding, dilation)
    layer = nn.ConvTranspose1d(1, 1, kernel, stride, padding, output_padding, dilation=dilation)
    try:
        out = layer(torch.zeros(1, 1, n)).shape[-1]
    except RuntimeError:
        out = 0
    assert max(rule.out_length(n), 0) == out


def dependency(net, n: int, j: int) -> tuple[int, int]:
    """The input pixels output ``j`` depends on (first, last), by autograd, weights positive."""
    x = torch.zeros(1, 1, n, dtype=torch.float64, requires_grad=True)
    net(x)[0, 0, j].backward()
    nz = x.grad[0, 0].nonzero()
    return int(nz.min()), int(nz.max())


DECODERS = {
    "transposed 3/2": lambda: nn.Sequential(nn.Conv1d(1, 1, 3, 2, 1), nn.ConvTranspose1d(1, 1, 3, 2, 1, 1)),
    "transposed dilated": lambda: nn.ConvTranspose1d(1, 1, 3, 3, 2, 1, dilation=2),
    "nearest 4": lambda: nn.Sequential(nn.Conv1d(1, 1, 5, 4, 2), nn.Upsample(scale_factor=4)),
    "linear 2 twice": lambda: nn.Sequential(nn.Conv1d(1, 1, 3, padding=1), nn.Upsample(scale_factor=2,
                                                                                       mode="linear"),
                                            nn.Upsample(scale_factor=2, mode="linear")),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_receptive_field_holds_the_dependency(name):
    """Every output's true dependency (autograd, positive weights so nothing cancels) lies
    inside the field ``receptive_field`` reports, away from the border."""
    torch.manual_seed(0)
    net = DECODERS[name]().double()
    for p in net.parameters():
        p.data = p.data.abs() + 0.1
    rf = streamcnn.receptive_field(net, 1)[0]
    n = 64
    out = net(torch.zeros(1, 1, n, dtype=torch.float64)).shape[-1]
    for j in range(out // 4, 3 * out // 4):
        first, last = dependency(net, n, j)
        lo = j * rf.stride - rf.offset
        assert lo <= first and last < lo + rf.size, (j, first, last, rf)


def test_grid_is_the_deepest_stride():
    """A U-Net's output has stride 1, but tiles start on its encoder's deepest grid."""
    steps = streamcnn.trace.analyse(unet("nearest", depth=3), 2, 3).axis(0)
    assert grid(steps) == 8
    tiling = tile_axis(steps, 200, 80)
    assert len(tiling.starts) > 2 and all(a % 8 == 0 for a in tiling.starts)


def test_upsample_rule_spans():
    """A tile's span through a nearest upsampling by 2: twice the positions, valid where the
    input was (borders stay the image's)."""
    from streamcnn.geometry import Span
    span = Upsample(2).map_span(Span(20, 4, 12, 5, 10))
    assert (span.length, span.start, span.stop, span.valid_start, span.valid_stop) == (40, 8, 24, 10, 20)
    span = Upsample(2, "linear").map_span(Span(20, 4, 12, 5, 10))
    # output j reads floor((2j - 1) / 4) and the next: j = 11 reads 5, 6; j = 18 reads 8, 9
    assert (span.valid_start, span.valid_stop) == (11, 19)
    assert Window(2, 2, divides=True).fits(4) and not Window(2, 2, divides=True).fits(5)


# ---------------------------------------------------------------- random encoder-decoders

@st.composite
def encoder_decoders(draw):
    """A random U-Net: 1D or 2D, 1-3 levels, per level a random way down and up, skips
    concatenated or added, an image of a fitting size and a tile from the minimum up."""
    rank = draw(st.sampled_from([1, 2]))
    depth = draw(st.integers(1, 2 if rank == 2 else 3))
    up = draw(st.sampled_from(UP_KINDS if rank == 2 else
                              [k for k in UP_KINDS if k not in ("pixel shuffle",)]))
    down = draw(st.sampled_from(["pool", "unshuffle"])) if rank == 2 else "pool"
    skip = draw(st.sampled_from(["cat", "add"]))
    unit = 2 ** depth
    n = unit * draw(st.integers(2, (48 if rank == 2 else 160) // unit))
    seed = draw(st.integers(0, 2 ** 16))
    net = unet(up, seed=seed, depth=depth, rank=rank, skip=skip, down=down)
    least = streamcnn.plan(net, (1, 3) + (n,) * rank, n).min_tile_size[0]
    tile = draw(st.integers(least, max(least, n)))
    return net, rand(1, 3, *(n,) * rank, seed=seed), tile


@settings(max_examples=40, **SETTINGS)
@given(encoder_decoders(), st.sampled_from(ALL_PATHS))
def test_random_encoder_decoders_match_conventional(case, path):
    net, x, tile = case
    cmp = compare(net, x, tile, paths=path)
    assert cmp.worst <= F64, cmp


# ---------------------------------------------------------------- plan and pixel_loss

def test_plan_reports_the_grid_and_each_kind_of_step():
    net = unet("nearest")
    p = streamcnn.plan(net, (1, 3, 512, 512), 128)
    assert p.tile_grid == (4, 4) and p.output_stride == (1, 1)
    assert "tiles start on a 4×4 px grid" in str(p)
    assert p.pixel_loss_peak_bytes < p.streaming_peak_bytes  # no stitched output nor its gradient
    assert p.inference_peak_bytes - p.out_bytes < p.pixel_loss_peak_bytes
    assert [s.kind for s in p.steps].count("upsample") == 2
    torch.manual_seed(0)
    fine = streamcnn.plan(SuperResolution().double(), (1, 3, 64, 64), 32)
    assert fine.output_stride == (Fraction(1, 2),) * 2 and fine.output_shape == (1, 3, 128, 128)


@pytest.mark.parametrize("up", ["transposed 3/2 pad 1 out 1", "linear", "pixel shuffle"])
def test_pixel_loss_on_a_unet(up):
    """One forward and one backward per tile, the loss and gradients conventional's."""
    net, x = unet(up), rand(1, 3, 92, 76)
    target = torch.randint(0, 2, (1, 92, 76), generator=torch.Generator().manual_seed(2))
    loss_fn = functools.partial(F.cross_entropy, reduction="none")
    expected = loss_fn(net(x), target).mean()
    grads = torch.autograd.grad(expected, list(net.parameters()))
    streamed = Streaming(net, 40)
    loss = streamed.pixel_loss(x, target, loss_fn)
    got = torch.autograd.grad(loss, list(net.parameters()))
    assert abs(loss.item() - expected.item()) <= F64 * abs(expected.item())
    assert max(rel_err(g, e) for g, e in zip(got, grads)) <= F64
    assert streamed.last_stats.forward.computed == streamed.plan(x.shape).num_tiles > 4


def test_the_decoders_page_table():
    """docs/decoders.md's 1D U-Net on 32 pixels, tiles of 16: tiles, the pool's and the
    upsampling's spans and valid parts, and the owned outputs."""
    from streamcnn.geometry import Merge, Span, Step, spans
    graph = [Step(None), Step(Window(3, 1, 1, 1), (0,)), Step(Window(2, 2), (1,)),
             Step(Window(3, 1, 1, 1), (2,)), Step(Upsample(2), (3,)), Step(Merge(), (1, 4)),
             Step(Window(3, 1, 1, 1), (5,))]
    tiling = tile_axis(graph, 32, 16)
    assert list(zip(tiling.starts, tiling.stops)) == [(0, 16), (6, 22), (12, 28), (18, 32)]
    assert list(zip(tiling.own_starts, tiling.own_stops)) == [(0, 11), (11, 17), (17, 23), (23, 32)]
    at = [spans(graph, Span(32, a, b, a, b)) for a, b in zip(tiling.starts, tiling.stops)]
    assert [(s[2].start, s[2].stop, s[2].valid_start, s[2].valid_stop) for s in at] == [
        (0, 8, 0, 7), (3, 11, 4, 10), (6, 14, 7, 13), (9, 16, 10, 16)]
    assert [(s[4].start, s[4].stop, s[4].valid_start, s[4].valid_stop) for s in at] == [
        (0, 16, 0, 12), (6, 22, 10, 18), (12, 28, 16, 24), (18, 32, 22, 32)]


def test_identical_tiles_are_computed_once():
    """A background of one colour: tiles on the same phase of the grid with the same pixels
    share their computation (dedup), forward and backward, and the result is still exact."""
    net = unet("transposed 4/2 pad 1", depth=2)
    x = torch.full((1, 3, 160, 160), 0.25, dtype=torch.float64)
    x[:, :, 20:50, 30:60] = rand(1, 3, 30, 30)
    streamed = Streaming(net, 40)
    cmp = compare(net, x, 40)
    assert cmp.worst <= F64, cmp
    streamed(x)
    stats = streamed.last_stats.forward
    assert stats.computed < stats.tiles


class SqueezeExciteUNet(UNet):
    """A U-Net whose decoder blocks end in squeeze-and-excitation (global steps, issue #31):
    both frontiers at once."""

    def __init__(self):
        super().__init__("transposed 2/2", depth=2)
        self.squeeze = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1),
                                                   nn.ReLU(), nn.Conv2d(2, 4, 1), nn.Sigmoid())
                                     for _ in self.fuse)

    def forward(self, x):
        x, skips = self.encode(x)
        for up, fuse, se, skip in zip(self.ups, self.fuse, self.squeeze, reversed(skips)):
            x = torch.tanh(fuse(torch.cat([skip, up(x)], 1)))
            x = x * se(x)
        return self.head(x)


def test_unet_with_squeeze_and_excitation():
    torch.manual_seed(0)
    net = SqueezeExciteUNet().double()
    cmp = compare(net, rand(2, 3, 92, 76), 40)
    assert cmp.worst <= F64, cmp
    target = torch.randint(0, 2, (2, 92, 76), generator=torch.Generator().manual_seed(3))
    loss_fn = functools.partial(F.cross_entropy, reduction="none")
    x = rand(2, 3, 92, 76)
    expected = torch.autograd.grad(loss_fn(net(x), target).mean(), list(net.parameters()))
    got = torch.autograd.grad(Streaming(net, 40).pixel_loss(x, target, loss_fn), list(net.parameters()))
    assert max(rel_err(g, e) for g, e in zip(got, expected)) <= F64
