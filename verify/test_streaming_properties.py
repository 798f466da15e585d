"""Property-based tests (hypothesis): random stacks of every supported layer.

Each example draws a 1D or 2D stack of convolutions (kernel, stride, padding,
dilation, groups, bias, 'same'), max/avg pooling (padding, dilation, ceil_mode,
count_include_pad), activations (in-place or not), eval-mode BatchNorm/Dropout
and Identity, some nested; an image size from the smallest the stack accepts
up to several tiles (so often not a multiple of the stride, and sometimes
smaller than one tile); and a tile size from the minimum upwards. The streamed
output, input gradient and every parameter gradient must match conventional
autograd within 1e-10 (float64; see test_streaming_equivalence for why), and
the tiling must satisfy its invariants. Examples are derandomized so CI is
reproducible; sizes and channels are small to keep the file fast.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import streamcnn
from streamcnn.geometry import fits, interior_spans, lengths, tile_axis
from streamcnn.trace import analyse_structure
from streamcnn.testing import ALL_PATHS, compare

F64 = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")



SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
ACTIVATIONS = [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, lambda: nn.PReLU(1)]
IN_PLACE = [lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.1, inplace=True),
            lambda: nn.ELU(inplace=True)]


def per_axis(draw, ndim, values):
    v = [draw(values) for _ in range(ndim)]
    return v[0] if ndim == 1 else tuple(v)


@st.composite
def conv(draw, ndim, cin):
    cout = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and cout * g <= 6]))
    cout *= groups
    kernel = per_axis(draw, ndim, st.integers(1, 5))
    if draw(st.integers(0, 5)) == 0:  # padding='same' needs stride 1
        return CONV[ndim], dict(
            in_channels=cin, out_channels=cout, kernel_size=kernel, padding="same",
            dilation=per_axis(draw, ndim, st.integers(1, 2)), groups=groups,
            bias=draw(st.booleans()))
    return CONV[ndim], dict(
        in_channels=cin, out_channels=cout, kernel_size=kernel,
        stride=per_axis(draw, ndim, st.integers(1, 3)),
        padding=per_axis(draw, ndim, st.integers(0, 3)),
        dilation=per_axis(draw, ndim, st.integers(1, 3)), groups=groups,
        bias=draw(st.booleans()))


@st.composite
def pool(draw, ndim):
    kernel = [draw(st.integers(1, 4)) for _ in range(ndim)]
    padding = [draw(st.integers(0, k // 2)) for k in kernel]  # torch: pad <= kernel / 2
    args = dict(kernel_size=kernel[0] if ndim == 1 else tuple(kernel),
                stride=per_axis(draw, ndim, st.integers(1, 3)),
                padding=padding[0] if ndim == 1 else tuple(padding),
                ceil_mode=draw(st.booleans()))
    if draw(st.booleans()):
        return MAXPOOL[ndim], dict(args, dilation=per_axis(draw, ndim, st.integers(1, 2)))
    return AVGPOOL[ndim], dict(args, count_include_pad=draw(st.booleans()))


@st.composite
def stacks(draw):
    """(ndim, in_channels, list of (nested-level, layer factory))."""
    ndim = draw(st.sampled_from([1, 2]))
    cin = c = draw(st.integers(1, 3))
    layers = []
    # torch itself rejects an in-place layer that overwrites a tensor an earlier layer
    # saved for backward, so in-place activations only follow layers that do not
    # save their output (and the input, which streaming and the oracle both copy)
    may_in_place = True
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "pool", "act", "bn", "other"]))
        if kind == "act" and may_in_place and draw(st.booleans()):
            layers.append(draw(st.sampled_from(IN_PLACE)))
            may_in_place = False
            continue
        may_in_place = kind in ("conv", "pool", "bn")
        if kind == "conv":
            cls, kw = draw(conv(ndim, c))
            c = kw["out_channels"]
            layers.append(lambda cls=cls, kw=kw: cls(**kw))
        elif kind == "pool":
            cls, kw = draw(pool(ndim))
            layers.append(lambda cls=cls, kw=kw: cls(**kw))
        elif kind == "act":
            layers.append(draw(st.sampled_from(ACTIVATIONS)))
        elif kind == "bn":
            layers.append(lambda c=c: BATCHNORM[ndim](c))
        else:
            layers.append(draw(st.sampled_from([nn.Identity, lambda: nn.Dropout(0.3)])))
    nest = draw(st.integers(0, max(len(layers) - 1, 0)))  # group layers [nest:] in a Sequential
    return ndim, cin, layers, nest


def build(layers, nest, seed):
    torch.manual_seed(seed)
    mods = [make() for make in layers]
    if 0 < nest < len(mods):
        mods = mods[:nest] + [nn.Sequential(*mods[nest:])]
    net = nn.Sequential(*mods).double().eval()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return net


def axis_graphs(net, ndim):
    graph = analyse_structure(net, ndim)
    return [graph.axis(a) for a in range(ndim)]


def smallest_image(nodes, dilated_max_pool):
    """Smallest input length with an output. With a dilated max-pool, also long
    enough that no pooling window has all its taps in padding: torch itself
    returns -inf there and its backward writes outside the input (a torch bug,
    not a streaming one), so conventional autograd is no oracle for it."""
    n = 1
    while lengths(nodes, n)[-1] <= 0 or (dilated_max_pool and not fits(nodes, n)):
        n += 1
    return n


@st.composite
def cases(draw):
    ndim, cin, layers, nest = draw(stacks())
    net = build(layers, nest, draw(st.integers(0, 2**16)))
    rfs = streamcnn.receptive_field(net, ndim)
    per_axis_layers = axis_graphs(net, ndim)
    tiles, sizes = [], []
    limit = 90 if ndim == 1 else 40  # pixels per axis, to keep examples fast
    dilated = any(isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) and m.dilation not in (1, (1, 1))
                  for m in net.modules())
    for a in range(ndim):
        lo = smallest_image(per_axis_layers[a], dilated)
        tile = rfs[a].min_tile_size + draw(st.integers(0, 12))
        size = draw(st.integers(lo, max(lo, min(limit, 3 * tile + 5))))
        tiles.append(tile)
        sizes.append(size)
    for a in range(ndim):  # rare, tested in test_streaming_errors: tiles that cannot end on the
        try:               # stride grid (layers padded beyond their kernel); not this test's topic
            tile_axis(per_axis_layers[a], sizes[a], tiles[a])
        except streamcnn.TileTooSmallError:
            assume(False)
    batch = draw(st.integers(1, 2))
    channels_last = ndim == 2 and draw(st.booleans())  # both tile layouts
    return net, (batch, cin, *sizes), tiles[0] if ndim == 1 else tuple(tiles), channels_last


def check_tiling(t, tile_size, unread, nodes):
    """Invariants of one axis' tiling; ``unread(stop)``: whether the pixels from
    ``stop`` to the image edge leave the output unchanged."""
    assert t.starts[0] == 0
    # no tile is so short that a window could have all its taps in padding (see
    # smallest_image), unless the whole image already is
    if fits(nodes, t.length):
        assert all(fits(nodes, b - a) for a, b in zip(t.starts, t.stops))
    # the last tile ends at the image edge, unless the pixels after it affect no output
    assert t.stops[-1] == t.length or unread(t.stops[-1])
    assert all(a % t.stride == 0 for a in t.starts)
    assert all(0 < b - a <= tile_size for a, b in zip(t.starts, t.stops))
    assert list(t.starts) == sorted(set(t.starts))
    # owned outputs partition the output and are non-empty
    assert t.own_starts[0] == 0 and t.own_stops[-1] == t.out_length
    assert all(b > a for a, b in zip(t.own_starts, t.own_stops))
    assert list(t.own_starts[1:]) == list(t.own_stops[:-1])
    assert all(o0 <= a and b <= o1 for a, b, o0, o1 in
               zip(t.own_starts, t.own_stops, t.out_starts, t.out_stops))


@settings(max_examples=800, **SETTINGS)
@given(cases(), st.sampled_from(ALL_PATHS))
def test_random_stacks_match_conventional(case, path):
    """Each example along one entry path (input leaf or not, backward or autograd.grad, sum or
    random loss), drawn: together the examples cross every path with every kind of stack."""
    net, shape, tile, channels_last = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cmp = compare(net, x, tile, channels_last=channels_last, paths=path)
    assert cmp.worst <= F64, cmp
    ndim = len(shape) - 2
    tiles = (tile,) * ndim if isinstance(tile, int) else tile
    nodes = axis_graphs(net, ndim)
    for a in range(ndim):
        def unread(stop, a=a):
            x2 = x.clone()
            x2.narrow(2 + a, stop, shape[2 + a] - stop).add_(1.0)
            with torch.no_grad():
                return torch.equal(net(x2.clone()), net(x.clone()))
        check_tiling(tile_axis(nodes[a], shape[2 + a], tiles[a]), tiles[a], unread, nodes[a])


@settings(max_examples=300, **SETTINGS)
@given(stacks(), st.integers(0, 2**16))
def test_min_tile_size_is_the_smallest_with_a_valid_output(stack, seed):
    """The analytic minimum (from the receptive field) equals a brute-force search
    with the interval maps (or the stride, if larger), and each extra stride of
    tile gives one more valid output."""
    ndim, _, layers, nest = stack
    net = build(layers, nest, seed)
    for a, rf in enumerate(streamcnn.receptive_field(net, ndim)):
        nodes = axis_graphs(net, ndim)[a]

        def valid(tile):
            span = interior_spans(nodes, tile)[-1]
            return span.valid_stop - span.valid_start

        assert valid(rf.min_tile_size) >= 1
        if rf.min_tile_size > rf.stride:
            assert valid(rf.min_tile_size - 1) == 0
        # every extra stride of tile adds exactly one valid output
        assert valid(rf.min_tile_size + 3 * rf.stride) == valid(rf.min_tile_size) + 3
