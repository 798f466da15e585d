"""streamcnn.plan() and the geometry behind it.

Oracles: torch autograd for the receptive field (which input pixels an output's
gradient reaches), and torch run directly on a tile for which of its outputs
equal the whole image's; hand-derived numbers for the paper's Fig. 2 network.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn.memory import StepMemory, graph_peak
from streamcnn.trace import analyse


NETS = {
    "fig2": lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 64, 3, padding=1),
                                  nn.Conv2d(64, 3, 3, padding=1)),
    "strided": lambda: nn.Sequential(nn.Conv2d(3, 4, 5, stride=2, padding=1), nn.Tanh(),
                                     nn.AvgPool2d(3, 2, padding=1), nn.Conv2d(4, 2, 3, dilation=2)),
    "asymmetric": lambda: nn.Sequential(nn.Conv2d(3, 2, (3, 1), padding=(0, 2)),
                                        nn.AvgPool2d((2, 3), stride=(2, 1)),
                                        nn.Conv2d(2, 2, (1, 4), stride=(1, 3), padding=(3, 0))),
}


def fig2():
    torch.manual_seed(0)
    return NETS["fig2"]()


@pytest.mark.parametrize("name", sorted(NETS))
def test_receptive_field_matches_autograd(name):
    """An interior output's gradient is non-zero exactly on its receptive field
    (convolutions/average pooling with random positive weights: no cancellation)."""
    torch.manual_seed(0)
    net = NETS[name]().double()
    for p in net.parameters():  # small, so tanh does not saturate to a zero derivative
        p.data.uniform_(0.01, 0.02)
    x = torch.rand(1, 3, 90, 90, dtype=torch.float64, requires_grad=True)
    y = net(x)
    j = (y.shape[2] // 2, y.shape[3] // 2)
    (g,) = torch.autograd.grad(y[0, 0, j[0], j[1]], x)
    for a, rf in enumerate(streamcnn.receptive_field(net, 2)):
        hit = g[0].abs().sum(dim=(0, 2 - a)).nonzero().flatten()  # positions along axis a
        assert hit.min().item() == j[a] * rf.stride - rf.offset
        assert hit.max().item() - hit.min().item() + 1 == rf.size


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("tile", [24, 37])
def test_interior_tile_invalid_borders_match_torch(name, tile):
    """Run the net on an interior tile directly: outputs inside the reported
    invalid borders are wrong (tile-border padding), all others are right."""
    torch.manual_seed(0)
    net = NETS[name]().double()
    rfs = streamcnn.receptive_field(net, 2, tile)
    x = torch.randn(1, 3, 4 * tile + 40, 4 * tile + 40, dtype=torch.float64)
    full = net(x).detach()
    starts = [rf.stride * 3 for rf in rfs]  # interior, on the stride grid
    out = net(x[:, :, starts[0]:starts[0] + tile, starts[1]:starts[1] + tile]).detach()
    assert tuple(out.shape[2:]) == tuple(rf.tile_output_size for rf in rfs)
    o = [s // rf.stride for s, rf in zip(starts, rfs)]
    ref = full[:, :, o[0]:o[0] + out.shape[2], o[1]:o[1] + out.shape[3]]
    (l0, r0), (l1, r1) = [(rf.invalid_left, rf.invalid_right) for rf in rfs]
    inner = (slice(None), slice(None), slice(l0, out.shape[2] - r0), slice(l1, out.shape[3] - r1))
    # equal up to rounding (GEMM blocking differs between input sizes)
    if out[inner].numel():
        assert (out[inner] - ref[inner]).abs().max().item() <= 1e-12
    wrong = (out - ref).abs() > 1e-9
    if l0 or r0:  # every row in the invalid border has wrong values
        rows = wrong.any(dim=3)[0, 0]
        assert rows[:l0].all() and rows[out.shape[2] - r0:].all()


def test_per_layer_geometry_of_fig2():
    rf = streamcnn.receptive_field(fig2(), 2, 32)[0]
    assert (rf.size, rf.stride, rf.offset, rf.min_tile_size) == (7, 1, 3, 7)
    assert [(g.rf.size, g.tile_length, g.invalid_left, g.invalid_right) for g in rf.layers] == [
        (3, 32, 1, 1), (5, 32, 2, 2), (7, 32, 3, 3)]


def test_plan_fields_fig2():
    p = streamcnn.plan(fig2(), (2, 3, 100, 77), 32)
    assert p.input_shape == (2, 3, 100, 77)
    assert p.tile_size == (32, 32)
    # step = tile - (receptive field - 1) = 26; the last tile ends at the edge
    assert p.tile_starts == ([0, 26, 52, 78], [0, 26, 52])
    assert p.tile_stops == ([32, 58, 84, 100], [32, 58, 77])
    assert p.tiles_per_axis == (4, 3) and p.num_tiles == 12
    assert p.overlap == (6, 6)
    assert p.output_stride == (1, 1) and p.receptive_field == (7, 7)
    assert p.output_shape == (2, 3, 100, 77)
    assert p.min_tile_size == (7, 7)
    assert p.coverage == (3 * 32 + 22) * (2 * 32 + 25) / (100 * 77)
    assert p.dtype == torch.float32
    assert 0 < p.streaming_peak_bytes < p.conventional_peak_bytes
    assert streamcnn.Streaming(fig2(), 32).plan((2, 3, 100, 77)) == p


def test_plan_output_shape_matches_torch():
    torch.manual_seed(0)
    net = NETS["strided"]()
    for shape in ((1, 3, 90, 61), (3, 3, 19, 200)):
        assert streamcnn.plan(net, shape, 40).output_shape == tuple(net(torch.zeros(shape)).shape)


def test_conventional_estimate_hand_derived_for_fig2():
    """Conv layers save their input; the peak is during the last conv's backward:
    the 3- and 64-channel activations, the output, its gradient and the 64-channel
    input gradient: (3 + 64 + 3 + 3 + 64) planes, plus input, params and grads."""
    net = fig2()
    p = streamcnn.plan(net, (1, 3, 256, 256), 64)
    plane = 256 * 256 * 4
    params = sum(q.numel() for q in net.parameters()) * 4
    assert p.conventional_peak_bytes == 3 * plane + 2 * params + (3 + 64 + 3 + 3 + 64) * plane


def test_streaming_estimate_hand_derived_for_fig2():
    """Input, output and output gradient of the whole image; per tile (64x64 here):
    the copy of the tile input the module gets and the same five tensors as above."""
    net = fig2()
    p = streamcnn.plan(net, (1, 3, 256, 256), 64)
    plane, tile = 256 * 256 * 4, 64 * 64 * 4
    params = sum(q.numel() for q in net.parameters()) * 4
    expect = 3 * plane + params + 3 * plane + 3 * plane + 2 * params + 3 * tile + 137 * tile
    assert p.streaming_peak_bytes == expect
    assert p.input_bytes == 3 * plane and p.tile_working_bytes == 3 * tile + 137 * tile
    with_input_grad = streamcnn.plan(net, (1, 3, 256, 256), 64, requires_input_grad=True)
    # + the whole input gradient, + the tile's 3-channel input gradient in the last step
    # (which is not the peak step: the 64-channel gradient of layer 2 is freed by then)
    assert with_input_grad.streaming_peak_bytes == expect + 3 * plane


def test_graph_peak_frees_what_no_step_saved():
    """ReLU after conv (not in place): ReLU saves its output, the next conv saves the
    same tensor; the conv's output is freed after the ReLU consumed it."""
    graph = analyse(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1)), 2, 1)
    memory = [StepMemory(1, 0, (), 0), StepMemory(1, 1, (0,), 0), StepMemory(1, 2, (2,), 0),
              StepMemory(1, 3, (2,), 0)]
    fwd, peak = graph_peak(graph, memory, [1, 10, 10, 2], input_grad=False)
    # forward: conv out 10 + relu out 10 alive together -> 20; then conv out freed; +2
    assert fwd == 20
    # backward of the ReLU: its saved output 10, the chain's output 2, the ReLU's
    # output gradient 10 and input gradient 10 -> 32
    assert peak == 32


def test_plan_text():
    text = str(streamcnn.plan(fig2(), (2, 3, 100, 77), 32))
    assert "input (2, 3, 100, 77) float32 -> output (2, 3, 100, 77)" in text
    assert "receptive field 7×7 px, output stride 1×1, minimum tile 7×7 px" in text
    assert "tile 32×32 px: 4×3 = 12 tiles, overlap 6×6 px, covering 1.36× the input's pixels" in text
    assert "height tile starts [0, 26, 52, 78]" in text
    assert "width  tile starts [0, 26, 52]" in text
    assert "streaming needs" in text and "× less memory" in text


def test_plan_text_says_plainly_when_streaming_saves_nothing():
    p = streamcnn.plan(fig2(), (1, 3, 40, 40), 64)  # one tile: only overhead
    assert p.num_tiles == 1 and p.streaming_peak_bytes >= p.conventional_peak_bytes
    text = str(p)
    assert "streaming saves no memory here" in text and "less memory" not in text
    assert not re.search(r"-\s*\d", text)  # no negative numbers
    assert "one tile covers the image" in text


def test_plan_text_when_the_network_keeps_little():
    """A 1x1 convolution saves only its input: streaming's image-sized tensors cost more."""
    p = streamcnn.plan(nn.Sequential(nn.Conv2d(3, 3, 1)), (1, 3, 64, 64), 16)
    assert p.num_tiles == 16 and p.streaming_peak_bytes >= p.conventional_peak_bytes
    assert "streaming saves no memory here: the image-sized tensors" in str(p)


def test_plan_text_shortens_long_tile_lists():
    text = str(streamcnn.plan(fig2(), (1, 3, 2048, 2048), 128))
    assert "(17 tiles)" in text and "..." in text


def test_plan_does_not_run_user_hooks():
    net = fig2()
    calls = []
    for m in net:
        m.register_forward_hook(lambda *a: calls.append(1))
    streamcnn.plan(net, (1, 3, 64, 64), 32)
    assert calls == []


def test_plan_lists_the_traced_graph():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    p = streamcnn.plan(net, (2, 3, 101, 64), 40)
    assert [(s.kind, s.shape, s.receptive_field, s.stride) for s in p.steps] == [
        ("input", (2, 3, 101, 64), (1, 1), (1, 1)),
        ("window", (2, 4, 51, 32), (3, 3), (2, 2)),
        ("pointwise", (2, 4, 51, 32), (3, 3), (2, 2)),
        ("window", (2, 4, 25, 16), (5, 5), (4, 4))]
    table = p.step_table().splitlines()
    assert "layer '2' (MaxPool2d) <- 2" in table[-1] and "(2, 4, 25, 16)" in table[-1]


def test_plan_1d():
    net = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.MaxPool1d(2))
    p = streamcnn.plan(net, (1, 2, 1000), 100)
    assert p.tile_size == (100,) and p.output_shape == (1, 4, 500)
    assert p.tile_starts[0][0] == 0 and p.tile_stops[0][-1] == 1000
    assert "length tile starts" in str(p)


@pytest.mark.parametrize("shape,message", [
    ((1, 3, -5, 32), r"input_shape \(1, 3, -5, 32\) has height -5; a streamed image needs at least "
                     r"one pixel along each spatial axis"),
    ((1, 3, 0, 32), r"input_shape \(1, 3, 0, 32\) has height 0; a streamed image needs"),
    ((1, 3, 32, 0), r"input_shape \(1, 3, 32, 0\) has width 0;"),
    ((-1, 3, 32, 32), r"input_shape \(-1, 3, 32, 32\) has batch size -1; sizes cannot be negative"),
])
def test_plan_refuses_sizes_without_pixels(shape, message):
    """Once torch's "negative dimension" or kernel-size errors from inside the probe."""
    with pytest.raises(ValueError, match=message):
        streamcnn.plan(fig2(), shape, 16)


@pytest.mark.parametrize("shape,message", [
    ((1, 3, 32.5, 32), r"input_shape must be a tuple of ints such as \(1, 3, 4096, 4096\), got "
                       r"\(1, 3, 32.5, 32\)"),  # was silently truncated to 32
    ("1, 3, 32, 32", r"input_shape must be a tuple of ints"),
    (torch.zeros(1, 3, 32, 32), r"input_shape must be a shape such as \(1, 3, 4096, 4096\), got a "
                                r"Tensor of shape \(1, 3, 32, 32\); pass its .shape"),
])
def test_plan_input_shape_must_be_ints(shape, message):
    with pytest.raises(TypeError, match=message):
        streamcnn.plan(fig2(), shape, 16)


def test_plan_tile_size_any_integer_or_a_clear_error():
    """numpy and torch integers are integers; anything else says what a tile_size is."""
    ref = streamcnn.plan(fig2(), (1, 3, 64, 64), 16)
    assert streamcnn.plan(fig2(), torch.Size([1, 3, 64, 64]), np.int64(16)) == ref
    assert streamcnn.plan(fig2(), np.array([1, 3, 64, 64]), (np.int32(16), 16)) == ref
    for tile, error, message in [(0, ValueError, r"tile_size must be positive, got 0"),
                                 ((16, -1), ValueError, r"tile_size must be positive, got \(16, -1\)"),
                                 ((16,), ValueError, r"tile_size \(16,\) has 1 entries but the "
                                                     r"input has 2 spatial axes"),
                                 (16.0, TypeError, r"tile_size must be an int or a tuple of ints"),
                                 (np.True_, TypeError, r"tile_size must be an int or a tuple of ints")]:
        with pytest.raises(error, match=message):
            streamcnn.plan(fig2(), (1, 3, 64, 64), tile)
