"""Property-based tests (hypothesis): random DAGs of residual and concatenating blocks.

Each example draws a 1D or 2D network: a trunk of plain layers and one to three
blocks. A block is residual (two branches added as ``a + b``, as ResNet's
``out += identity``, or ``torch.add``; optionally an activation after the sum) or
concatenating (two or three branches joined by ``torch.cat(dim=1)``, one of them
possibly the input itself, as DenseNet's). A branch is a random chain of
convolutions (kernel, stride, padding, dilation, groups incl. depthwise, bias,
'same'), max/avg pools, activations (some in place), eval BatchNorm/Dropout,
Identity, and nested blocks.

Same grid. torch adds and concatenates only equal shapes, and a tile is an input
of yet another length, so the branches of a block must give equal lengths for
*every* input length. Every window (no ceil_mode) maps a length ``n`` to
``ceil((n - r) / s)`` with ``r = span - 1 - pad_left - pad_right``; a chain composes
to ``ceil((n - R) / S)`` with ``S`` the product of its strides and ``R`` the sum of
each ``r`` times the strides before it. Equal ``(R, S)`` per axis is the condition,
and the generator meets it as a network designer does: a branch with less total
stride ends with a strided convolution (ResNet's 1x1 downsample), and a branch
with a smaller ``R`` starts with an unstrided window of the missing reach. Paddings
stay within each window's reach (``pad <= (span - 1) / 2``; padding beyond it, which
can leave tiles that cannot end on the stride grid, is covered for chains by
test_streaming_properties and test_streaming_errors).

Properties:
1. streamed output, input gradient and every parameter gradient match
   conventional autograd within 1e-10 (float64; the sums run in another order,
   see test_streaming_equivalence), for image sizes from the smallest the
   network accepts to several tiles (mostly not multiples of the stride, and
   sometimes smaller than one tile) and tiles from the minimum upwards;
2. ``streamcnn.receptive_field`` is the hull over all input-to-output paths of the
   paths' receptive fields, computed here from the spec alone, with the minimum
   tile that follows from it;
3. that hull is the true dependency region: measured with autograd on a copy of
   the network whose weights are all positive (no cancellation), activations the
   identity and pools sums, so every path's window shows up in the gradient.

Examples are derandomized so CI is reproducible; channels and sizes are tiny.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from test_streaming_properties import AVGPOOL, BATCHNORM, CONV, MAXPOOL, SETTINGS

import streamcnn
from bench.models import freeze_batchnorm
from streamcnn.errors import TileTooSmallError
from streamcnn.geometry import ownership, tile_axis
from streamcnn.testing import ALL_PATHS, compare, rel_err
from streamcnn.trace import analyse_structure

F64 = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

POINTWISE = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish, "dropout": lambda: nn.Dropout(0.3), "identity": nn.Identity,
    "relu_": lambda: nn.ReLU(inplace=True), "leaky_": lambda: nn.LeakyReLU(0.1, inplace=True),
}
ACTIVATIONS = ["relu", "gelu", "tanh", "silu", "relu6", "hardswish"]
IN_PLACE = ["relu_", "leaky_"]
MAX_DEPTH = 2  # blocks nest at most this deep
KERNEL = {1: 5, 2: 3}  # largest kernel per dimensionality: keeps receptive fields small
LIMIT = {1: 100, 2: 40}  # largest image edge drawn, to keep examples fast


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Window:
    """A sliding window: per-axis kernel, stride, (symmetric) padding and dilation;
    ``same``: torch's padding='same' (stride 1; an odd total puts the extra on the right)."""

    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple
    same: bool = False

    def span(self, a: int) -> int:
        return self.dilation[a] * (self.kernel[a] - 1) + 1

    def pads(self, a: int) -> tuple[int, int]:
        if self.same:
            total = self.span(a) - 1
            return total // 2, total - total // 2
        return self.pad[a], self.pad[a]

    def reach(self, a: int) -> int:
        """``r``: input length the window consumes beyond its padding (length map
        ``ceil((n - r) / s)``)."""
        left, right = self.pads(a)
        return self.span(a) - 1 - left - right


@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    win: Window
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"
    win: Window
    ceil_mode: bool = False
    count_include_pad: bool = True


@dataclass(frozen=True)
class Pointwise:
    name: str  # a POINTWISE key, or "bn"
    channels: int = 0


@dataclass(frozen=True)
class Block:
    """``how``: "add", "iadd" (``out = a(x); out += b(x)``), "torch.add" or "cat"."""

    how: str
    branches: tuple  # tuple of chains (tuples of elements); () is the identity
    post: Pointwise | None = None


# ---------------------------------------------------------------- geometry of a spec


def compose(outer, inner):
    """Receptive field of ``inner`` (size, stride, offset) applied after ``outer``."""
    size, stride, offset = outer
    return (size + (inner[0] - 1) * stride, stride * inner[1], offset + inner[2] * stride)


def element_rf(e, a: int):
    """(size, stride, offset) of one element on axis ``a``: output ``j`` reads inputs
    ``[j*stride - offset, j*stride - offset + size)``."""
    if isinstance(e, (Conv, Pool)):
        return e.win.span(a), e.win.stride[a], e.win.pads(a)[0]
    if isinstance(e, Block):
        return hull([chain_rf(b, a) for b in e.branches])
    return 1, 1, 0


def chain_rf(chain, a: int):
    rf = (1, 1, 0)
    for e in chain:
        rf = compose(rf, element_rf(e, a))
    return rf


def hull(rfs):
    """The smallest field holding every path's field (all on one output grid)."""
    strides = {s for _, s, _ in rfs}
    assert len(strides) == 1, f"test bug: branches on different grids {rfs}"
    offset = max(o for _, _, o in rfs)
    right = max(size - o for size, _, o in rfs)
    return offset + right, strides.pop(), offset


def min_tile(rf) -> int:
    """Smallest tile with a valid output away from the image border. An interior tile
    ``[k*S, k*S + t)`` computes output ``j`` exactly iff ``j*S - offset >= k*S`` and
    ``j*S - offset + size <= k*S + t``; the first such ``j`` is ``k + ceil(offset / S)``,
    so ``t >= size - offset + S*ceil(offset / S)``; and a tile spans at least one stride."""
    size, stride, offset = rf
    return max(size - offset + stride * -(-offset // stride), stride)


def element_length(e, a: int, n: int) -> int:
    """Output length torch gives for an input of length ``n`` (<= 0: none)."""
    if isinstance(e, (Conv, Pool)):
        left, right = e.win.pads(a)
        room, s = n + left + right - e.win.span(a), e.win.stride[a]
        if isinstance(e, Pool) and e.ceil_mode:
            out = -(-room // s) + 1
            return out - 1 if (out - 1) * s >= n + left else out
        return room // s + 1
    if isinstance(e, Block):
        lengths = {chain_length(b, a, n) for b in e.branches}
        if min(lengths) <= 0:
            return 0
        assert len(lengths) == 1, f"test bug: branch lengths {lengths} for input {n}"
        return lengths.pop()
    return n


def chain_length(chain, a: int, n: int) -> int:
    for e in chain:
        n = element_length(e, a, n) if n > 0 else n
    return n


def length_map(chain, a: int) -> tuple[int, int]:
    """(R, S): the chain maps lengths ``n`` to ``ceil((n - R) / S)`` (no ceil_mode)."""
    total_r, total_s = 0, 1
    for e in chain:
        if isinstance(e, (Conv, Pool)):
            r, s = e.win.reach(a), e.win.stride[a]
        elif isinstance(e, Block):
            r, s = length_map(e.branches[0], a)
        else:
            r, s = 0, 1
        total_r += r * total_s
        total_s *= s
    return total_r, total_s


def smallest_image(chain, a: int) -> int:
    n = 1
    while chain_length(chain, a, n) <= 0:
        n += 1
    return n


# ---------------------------------------------------------------- building modules


class Residual(nn.Module):
    """Two branches added; an empty branch is the identity (ResNet's shortcut)."""

    def __init__(self, how: str, body: nn.Module, shortcut: nn.Module, post: nn.Module):
        super().__init__()
        self.how, self.body, self.shortcut, self.post = how, body, shortcut, post

    def forward(self, x):
        if self.how == "iadd":
            out = self.body(x)
            out += self.shortcut(x)
        elif self.how == "torch.add":
            out = torch.add(self.body(x), self.shortcut(x))
        else:
            out = self.body(x) + self.shortcut(x)
        return self.post(out)


class Concat(nn.Module):
    """Branches concatenated along channels; an empty branch passes the input (DenseNet)."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def module(e, ndim: int, linear: bool = False) -> nn.Module:
    """The torch module for spec element ``e``. ``linear``: the positive linear copy of
    property 3 (weights 1, no bias, pools as per-channel summing windows, pointwise
    layers the identity)."""
    one = (lambda t: t[0]) if ndim == 1 else tuple
    if isinstance(e, Block):
        branches = [build_chain(b, ndim, linear) for b in e.branches]
        if e.how == "cat":
            return Concat(branches)
        post = module(e.post, ndim, linear) if e.post else nn.Identity()
        how = "add" if linear and e.how == "iadd" else e.how  # its Identity may return x
        return Residual(how, branches[0], branches[1], post)
    if isinstance(e, Pointwise):
        if linear:
            return nn.Identity()
        return BATCHNORM[ndim](e.channels) if e.name == "bn" else POINTWISE[e.name]()
    w = e.win
    if isinstance(e, Pool) and linear:
        return PerChannel(module(Conv(1, 1, w, bias=False), ndim, linear))
    if isinstance(e, Pool):
        if e.kind == "max":
            return MAXPOOL[ndim](one(w.kernel), one(w.stride), one(w.pad), one(w.dilation),
                                 ceil_mode=e.ceil_mode)
        return AVGPOOL[ndim](one(w.kernel), one(w.stride), one(w.pad), ceil_mode=e.ceil_mode,
                             count_include_pad=e.count_include_pad)
    conv = CONV[ndim](e.cin, e.cout, one(w.kernel), one(w.stride), "same" if w.same else one(w.pad),
                      one(w.dilation), groups=e.groups, bias=e.bias and not linear)
    if linear:
        conv.weight.data.fill_(1.0)
    return conv


class PerChannel(nn.Module):
    """Applies a one-channel module to every channel."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        n, c = x.shape[:2]
        y = self.inner(x.reshape(n * c, 1, *x.shape[2:]))
        return y.reshape(n, c, *y.shape[2:])


def build_chain(chain, ndim: int, linear: bool = False) -> nn.Sequential:
    return nn.Sequential(*[module(e, ndim, linear) for e in chain])


def build(chain, ndim: int, seed: int, linear: bool = False) -> nn.Module:
    """Float64 network of the spec, seeded, in eval mode with random BatchNorm statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_chain(chain, ndim, linear)
    return freeze_batchnorm(net.double(), seed=seed)


# ---------------------------------------------------------------- generating specs


@lru_cache(maxsize=None)
def ints(lo: int, hi: int):
    """Cached strategies: hypothesis validates each new strategy object on first use,
    which otherwise costs more than building and running the network."""
    return st.integers(lo, hi)


@lru_cache(maxsize=None)
def pick(*values):
    return st.sampled_from(values)


BOOLS = st.booleans()


def per_axis(draw, ndim, values) -> tuple:
    return tuple(draw(values) for _ in range(ndim))


@lru_cache(maxsize=None)
@st.composite
def windows(draw, ndim, strides, dilate=True):
    """A window with padding within its reach, half the time the most ('same'-style)."""
    kernel = per_axis(draw, ndim, ints(1, KERNEL[ndim]))
    dilation = per_axis(draw, ndim, ints(1, 2) if dilate else ints(1, 1))
    stride = per_axis(draw, ndim, pick(*strides))
    reach = [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
    if draw(BOOLS):
        pad = tuple(reach)
    else:
        pad = tuple(draw(ints(0, r)) for r in reach)
    return Window(kernel, stride, pad, dilation)


@lru_cache(maxsize=None)
@st.composite
def convs(draw, ndim, cin, strides):
    cout = draw(ints(1, 4))
    groups = draw(pick(*[g for g in (1, 2, 3, 4) if cin % g == 0 and cout % g == 0]))
    if draw(ints(0, 5)) == 0:  # padding='same' (stride 1)
        kernel = per_axis(draw, ndim, ints(1, KERNEL[ndim]))
        dilation = per_axis(draw, ndim, ints(1, 2))
        win = Window(kernel, (1,) * ndim, (0,) * ndim, dilation, same=True)
    else:
        win = draw(windows(ndim, strides))
    return Conv(cin, cout, win, groups, draw(BOOLS))


@lru_cache(maxsize=None)
@st.composite
def pools(draw, ndim, strides, ceil_mode=False):
    kind = draw(pick("max", "avg"))
    # dilation 1: every window then has a tap inside its input (torch returns -inf for a
    # max-pool window all in padding, and its backward writes outside the input)
    win = draw(windows(ndim, strides, dilate=False))
    return Pool(kind, win, ceil_mode and draw(BOOLS), draw(BOOLS))


def in_place_ok(prev) -> bool:
    """Whether an in-place layer may follow ``prev``: convolutions, pools and BatchNorm
    return a new tensor and do not save it for backward (Identity and eval Dropout return
    their input, activations may save their output, a chain's first layer would write
    into the input other branches read)."""
    return isinstance(prev, (Conv, Pool)) or (isinstance(prev, Pointwise) and prev.name == "bn")


@lru_cache(maxsize=None)
@st.composite
def chains(draw, ndim, c, depth, max_len, strides=(1, 1, 1, 2), ceil_mode=False):
    """A random chain from ``c`` channels: (elements, output channels)."""
    elems: list = []
    for _ in range(draw(ints(1, max_len))):
        kinds = ["conv", "conv", "pool", "act", "other"]
        kinds += ["block", "block"] if depth < MAX_DEPTH else []
        kind = draw(pick(*kinds))
        prev = elems[-1] if elems else None
        if kind == "conv":
            e = draw(convs(ndim, c, strides))
            c = e.cout
        elif kind == "pool":
            e = draw(pools(ndim, strides, ceil_mode))
        elif kind == "act":
            e = Pointwise(draw(pick(*ACTIVATIONS, *(IN_PLACE if in_place_ok(prev) else []))))
        elif kind == "other":
            e = Pointwise(draw(pick("bn", "bn", "dropout", "identity")), c)
        else:
            e, c = draw(blocks(ndim, c, depth + 1))
        elems.append(e)
    return tuple(elems), c


def channels_out(chain, c: int) -> int:
    for e in chain:
        if isinstance(e, Conv):
            c = e.cout
        elif isinstance(e, Block):
            c = sum(channels_out(b, c) for b in e.branches) if e.how == "cat" else \
                channels_out(e.branches[0], c)
    return c


@st.composite
def reach_window(draw, ndim, reach, dilate):
    """An unstrided window with the given per-axis reach ``span - 1 - 2*pad``."""
    kernel, pad, dilation = [], [], []
    for r in reach:
        p = draw(ints(0, 1))
        span = r + 1 + 2 * p
        d = 2 if dilate and (span - 1) % 2 == 0 and span > 1 and draw(BOOLS) else 1
        kernel.append((span - 1) // d + 1)
        pad.append(p)
        dilation.append(d)
    return Window(tuple(kernel), (1,) * ndim, tuple(pad), tuple(dilation))


@st.composite
def same_grid(draw, ndim, branches, cin, cout=None):
    """Make the branches' (R, S) equal per axis (see the module docstring) and, with
    ``cout``, their output channels: a strided/channel-changing convolution of no
    reach at the end of a branch, an unstrided window at its start."""
    fixed = []
    target_s = [max(length_map(b, a)[1] for b in branches) for a in range(ndim)]
    for b in branches:
        c = channels_out(b, cin)
        ratio = tuple(target_s[a] // length_map(b, a)[1] for a in range(ndim))
        if any(r != 1 for r in ratio) or (cout is not None and c != cout):
            k = draw(pick(1, 3))
            win = Window((k,) * ndim, ratio, ((k - 1) // 2,) * ndim, (1,) * ndim)
            b = b + (Conv(c, c if cout is None else cout, win, 1, draw(BOOLS)),)
        fixed.append(b)
    target_r = [max(length_map(b, a)[0] for b in fixed) for a in range(ndim)]
    out = []
    for b in fixed:
        missing = [target_r[a] - length_map(b, a)[0] for a in range(ndim)]
        if any(missing):
            if draw(BOOLS):
                win = draw(reach_window(ndim, missing, dilate=True))
                groups = draw(pick(1, cin))
                b = (Conv(cin, cin, win, groups, draw(BOOLS)),) + b
            else:  # undilated, as pools() (and AvgPool has no dilation)
                win = draw(reach_window(ndim, missing, dilate=False))
                b = (Pool(draw(pick("max", "avg")), win,
                          count_include_pad=draw(BOOLS)),) + b
        out.append(b)
    for a in range(ndim):
        assert len({length_map(b, a) for b in out}) == 1, "test bug: branches not on one grid"
    return tuple(out)


@lru_cache(maxsize=None)
@st.composite
def blocks(draw, ndim, c, depth):
    """A residual or concatenating block from ``c`` channels: (Block, output channels)."""
    how = draw(pick("add", "iadd", "torch.add", "cat", "cat"))
    if how == "cat":
        branches = [draw(chains(ndim, c, depth, 3))[0] for _ in range(draw(ints(2, 3)))]
        if draw(BOOLS):
            branches[0] = ()  # the input itself, as DenseNet concatenates it
        branches = draw(same_grid(ndim, branches, c))
        return Block("cat", branches), sum(channels_out(b, c) for b in branches)
    body, cout = draw(chains(ndim, c, depth, 3))
    shortcut = () if draw(BOOLS) else draw(chains(ndim, c, depth, 2))[0]
    body, shortcut = draw(same_grid(ndim, [body, shortcut], c, cout))
    # ``out += ...`` modifies the body's output: only where no layer saved it for backward
    if how == "iadd" and not in_place_ok(body[-1]):
        how = "add"
    post = draw(pick(None, Pointwise("relu"), Pointwise("relu_"), Pointwise("gelu")))
    return Block(how, (body, shortcut), post), cout


@st.composite
def dags(draw):
    """(ndim, input channels, trunk): plain layers and one to three blocks."""
    ndim = draw(pick(1, 2))
    cin = c = draw(ints(1, 3))
    trunk: list = []
    n_blocks = draw(ints(1, 3 if ndim == 1 else 2))
    for i in range(n_blocks):
        if draw(BOOLS):  # plain layers before the block, ceil_mode pools allowed
            layers, c = draw(chains(ndim, c, MAX_DEPTH, 2, strides=(1, 1, 2, 3), ceil_mode=True))
            trunk += layers
        block, c = draw(blocks(ndim, c, 1))
        trunk.append(block)
    return ndim, cin, tuple(trunk)


@st.composite
def cases(draw):
    """A network, an input shape and a tile size per axis (from the spec's own hull)."""
    ndim, cin, trunk = draw(dags())
    tiles, sizes = [], []
    for a in range(ndim):
        rf = chain_rf(trunk, a)
        tile = min_tile(rf) + draw(ints(0, 8))
        lo = smallest_image(trunk, a)
        # up to three tiles, or two strides past one tile when the tile is large
        hi = max(lo, min(LIMIT[ndim], 3 * tile + 5), min(tile + 2 * rf[1] + 3, 2 * LIMIT[ndim]))
        if hi > tile and draw(ints(0, 3)):  # mostly larger than a tile
            lo = max(lo, tile + 1)
        sizes.append(draw(ints(lo, hi)))
        tiles.append(tile)
    shape = (draw(ints(1, 2)), cin, *sizes)
    return ndim, trunk, shape, tuple(tiles), draw(ints(0, 2**16))


# ---------------------------------------------------------------- the properties


@settings(max_examples=320, **SETTINGS)
@given(cases(), st.sampled_from(ALL_PATHS))
def test_random_dags_match_conventional(case, path):
    """Each example along one drawn entry path (see streamcnn.testing.Path)."""
    check_random_dag(case, path)


def check_random_dag(case, path, **streaming_kwargs):
    ndim, trunk, shape, tiles, seed = case
    net = build(trunk, ndim, seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cmp = compare(net, x, tiles[0] if ndim == 1 else tiles, paths=path, **streaming_kwargs)
    assert cmp.worst <= F64, cmp


@settings(max_examples=160, **SETTINGS)
@given(cases(), st.sampled_from(ALL_PATHS))
def test_random_dags_reusing_overlaps_match_conventional(case, path):
    """Property 1 with ``overlap="reuse"`` (each map computed once per pass, strips read)."""
    check_random_dag(case, path, overlap="reuse")


@settings(max_examples=80, **SETTINGS)
@given(cases(), st.sampled_from(ALL_PATHS), st.floats(0, 1))
def test_random_dags_with_strips_at_chosen_steps_match_conventional(case, path, share):
    """The same under a strip budget, a drawn share of what strips at every step take: the
    steps nearest the input recompute their overlap, the others read strips."""
    ndim, trunk, shape, tiles, seed = case
    tile = tiles[0] if ndim == 1 else tiles
    full = streamcnn.plan(build(trunk, ndim, seed), shape, tile, overlap="reuse").strip_bytes
    check_random_dag(case, path, overlap="reuse", strip_budget=int(share * full))


@settings(max_examples=150, **SETTINGS)
@given(dags(), ints(0, 2**16))
def test_receptive_field_is_the_hull_over_paths(dag, seed):
    ndim, _, trunk = dag
    net = build(trunk, ndim, seed)
    for a, rf in enumerate(streamcnn.receptive_field(net, ndim)):
        expected = chain_rf(trunk, a)
        assert (rf.size, rf.stride, rf.offset) == expected, f"axis {a}"
        assert rf.min_tile_size == min_tile(expected), f"axis {a}"


@settings(max_examples=100, **SETTINGS)
@given(dags())
def test_hull_is_the_measured_dependency_region(dag):
    """The oracle of the two tests above, checked against autograd (no streamcnn): with all
    weights 1 and no nonlinearity no sum cancels, and an output far from the border reads no
    padding at any layer, so its input gradient is nonzero exactly on the union of the
    paths' windows, whose ends are the hull's."""
    ndim, cin, trunk = dag
    net = build(trunk, ndim, 0, linear=True)
    rfs = [chain_rf(trunk, a) for a in range(ndim)]
    sizes = [3 * size + 2 * offset + 4 * stride + smallest_image(trunk, a)
             for a, (size, stride, offset) in enumerate(rfs)]
    x = torch.ones(1, cin, *sizes, dtype=torch.float64, requires_grad=True)
    y = net(x)
    index = [rf[0] // rf[1] + rf[2] // rf[1] + 1 for rf in rfs]  # outputs far from the border
    y[(0, slice(None), *index)].sum().backward()
    for a, (size, stride, offset) in enumerate(rfs):
        others = [d for d in range(x.ndim) if d != 2 + a]
        support = (x.grad.sum(dim=others) > 0).nonzero().flatten()
        start = index[a] * stride - offset
        assert (support.min().item(), support.max().item() + 1) == (start, start + size), \
            f"axis {a}"


def _node_values(graph, x) -> list:
    """Every step's value for input ``x``, by running the traced graph (fx's Interpreter)."""
    import torch.fx as fx
    from streamcnn.memory import _step_tensors
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Record(fx.GraphModule(graph.root, graph.graph)).run(x)
    return [x] + _step_tensors(graph, values)[1:]


@settings(max_examples=120, **SETTINGS)
@given(cases(), st.data())
def test_ownership_partitions_every_node_map(case, data):
    """Ownership at every node (the statistics' partition): with random steps of a random
    graph as targets, each target's map is partitioned among the tiles, every owned position
    lies in its tile's valid positions, and - the check of validity - a tile's value at each
    position it owns equals the whole image's (float64, 1e-10: convolutions sum in another
    order on other sizes)."""
    ndim, trunk, shape, tiles, seed = case
    net = build(trunk, ndim, seed).eval()
    graph = analyse_structure(net, ndim, shape[1])
    steps = list(range(1, len(graph.steps)))
    targets = tuple(sorted(set(data.draw(st.lists(st.sampled_from(steps), min_size=1, max_size=4)))))
    try:
        tilings = [tile_axis(graph.axis(a), shape[2 + a], tiles[a], targets=targets)
                   for a in range(ndim)]
    except TileTooSmallError:  # a target needs a larger tile than the output: said, not silent
        return
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = _node_values(graph, x)
    for t in targets + (len(graph.steps) - 1,):
        owns = [ownership(graph.axis(a), tilings[a], t) for a in range(ndim)]
        for own in owns:
            assert own.own_starts[0] == 0 and own.own_stops[-1] == own.length
            assert list(own.own_starts[1:]) == list(own.own_stops[:-1])
            assert all(b >= a for a, b in zip(own.own_starts, own.own_stops))
        if not isinstance(full[t], torch.Tensor):
            continue
        for index in itertools.product(*(range(len(tl.starts)) for tl in tilings)):
            box = tuple(slice(tl.starts[i], tl.stops[i]) for tl, i in zip(tilings, index))
            tile_value = _node_values(graph, x[(slice(None), slice(None)) + box])[t]
            crop = tuple(slice(o.own_starts[i] - o.starts[i], o.own_stops[i] - o.starts[i])
                         for o, i in zip(owns, index))
            place = tuple(slice(o.own_starts[i], o.own_stops[i]) for o, i in zip(owns, index))
            got, want = tile_value[(Ellipsis,) + crop], full[t][(Ellipsis,) + place]
            assert got.shape == want.shape
            if want.numel():
                assert rel_err(got, want) <= F64 or torch.equal(got, want), (t, index)


@settings(max_examples=40, **SETTINGS)
@given(cases(), st.data())
def test_channel_stats_of_random_nodes_equal_hooks(case, data):
    """channel_stats of randomly named modules of a random graph (leaves and blocks) equals
    the per-channel mean and biased variance that forward hooks see conventionally
    (float64, 1e-10)."""
    ndim, trunk, shape, tiles, seed = case
    net = build(trunk, ndim, seed).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seen = {n: [] for n, _ in net.named_modules() if n}  # (clones: a later layer may work in place)
    handles = [net.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen[n].append(o.transpose(0, 1).reshape(o.shape[1], -1).clone()))
        for n in seen]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    called = sorted(n for n, v in seen.items() if v)  # (a ModuleList is never called)
    chosen = sorted(set(data.draw(st.lists(st.sampled_from(called), min_size=1, max_size=3))))
    try:
        stats = streamcnn.channel_stats(net, x, tiles[0] if ndim == 1 else tiles, chosen)
    except TileTooSmallError:  # a named map needs a larger tile than the output: said
        return
    for n in chosen:
        values = torch.cat(seen[n], dim=1)
        assert stats[n].count == values.shape[1], n
        assert rel_err(stats[n].mean, values.mean(1)) <= F64, n
        assert rel_err(stats[n].var, values.var(1, unbiased=False)) <= F64, n
