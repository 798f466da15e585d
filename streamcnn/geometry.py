"""Tile geometry along one axis of a graph of local operations: plain integers, no torch.

A 2D tiling is the product of two 1D tilings, because every operation streamcnn
streams acts on each spatial axis independently (a 2D window is the product of
two 1D windows). So everything here is about one axis.

The graph. A network is a list of :class:`Step` in execution (topological) order.
Step 0 is the input; every other step applies a *rule* to the outputs of earlier
steps, and the last step is the output. There are five rules:

* :class:`Window` - a convolution or pooling window (kernel, stride, padding,
  dilation, ceil mode), as torch computes it;
* :class:`Pointwise` - each position maps to itself (activations, normalisation
  over channels, Linear over channels, permutes, scalar arithmetic);
* :class:`Merge` - several feature maps on the same grid combined position by
  position (residual add, multiplication, concatenation along channels);
* :class:`Upsample` - a map made ``scale`` times finer: nearest, nearest-exact and
  linear interpolation (``align_corners=False``) by an integer factor, pixel shuffle;
  with a second input, the factor that makes it match that map (``size=y.shape``);
* :class:`Transposed` - a transposed convolution (the adjoint of a window).

A :class:`SizedWindow` is a window whose paddings the module computes from sizes it
reads (a centre crop): the same amounts on every length it accepts.

Strides are fractions. A map finer than the input (after upsampling) has a total
stride below one: position ``j`` of a map of total stride ``p/q`` lies at input pixel
``j * p / q``. ``fractions.Fraction`` keeps every field exact. A tile must start where
every map's grid has a position, at a multiple of the *grid* of the graph (:func:`grid`):
the least common multiple of the numerators of all total strides, which for a graph
without upsampling is the output's stride, and for an encoder-decoder the encoder's
deepest stride.

Upsampling and transposed convolutions map a tile's span alike: a tile whose input
starts at ``a`` computes, at its output position ``t``, the full image's position
``t + a * factor`` (torch indexes both from the first input position), so its span
starts at ``a * factor``. Output ``j`` reads the inputs ``[lo(j), hi(j)]`` (each
rule's formula, before torch clamps at the border); it is valid when they lie in the
valid input interval, or where the tile's side is the image's (a clamp or a missing
contribution there is the image's own). Both are periodic: ``lo(j + factor) = lo(j) + 1``
(``stride`` for a transposed convolution), so their fields follow from one period.

Coordinates. Each step's activation has its own grid. A tile is described, in the
full image's coordinates of that grid, by the interval ``[start, stop)`` its
activation covers and the sub-interval ``[valid_start, valid_stop)`` whose values
equal the full image's. A window maps these intervals to its output grid:

* the tile's output covers ``[start/s, start/s + n)`` where ``n`` is the length
  torch computes for a ``stop - start`` long input (``start`` is a multiple of
  the stride ``s``, so the tile computes on the full image's grid);
* output ``j`` reads inputs ``[j*s - pad_left, j*s - pad_left + span)``; it is
  valid when the part of that window inside the image lies in the valid input
  interval. Padding that falls outside the image is the image's own padding, so
  a tile side on the true image border stays valid; padding at an interior side
  replaces real pixels and invalidates the outputs that read it.

A merge needs its inputs to cover the same interval (torch adds or concatenates
tensors of equal shape); its valid interval is the intersection of theirs. The
receptive field of a step is the hull over all paths from the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import TileTooSmallError, internal_assert


@dataclass(frozen=True)
class Span:
    """One tile's extent on one axis of one activation grid (full-image coordinates)."""

    length: int  # length of the full image's activation on this axis
    start: int
    stop: int
    valid_start: int
    valid_stop: int


@dataclass(frozen=True)
class Field:
    """Receptive field of a step on the input axis.

    Output ``j`` depends on inputs ``[j*stride - offset, j*stride - offset + size)``.
    (``reference.tiling.Field`` is the same record.) Integers, or ``Fraction`` s after an
    upsampling (a hull: the inputs read lie within it).
    """

    size: int | Fraction = 1
    stride: int | Fraction = 1
    offset: int | Fraction = 0

    @property
    def reach(self) -> int:
        """How far right of ``j*stride`` output ``j`` reads (exclusive)."""
        return self.size - self.offset


class GridMismatch(ValueError):
    """The inputs of a merge lie on different grids (different total strides)."""


@dataclass(frozen=True)
class Window:
    """A sliding window (convolution, pooling or zero padding) on one axis, as torch computes it."""

    kernel: int
    stride: int = 1
    pad_left: int = 0
    pad_right: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    max_pool: bool = False  # torch mishandles max-pool windows with no tap inside the input
    divides: bool = False  # the input length must be a multiple of the stride (pixel unshuffle)

    @property
    def span(self) -> int:
        """Input positions from the first to the last tap, inclusive."""
        return self.dilation * (self.kernel - 1) + 1

    def out_length(self, n: int) -> int:
        """Output length torch produces for an input of length ``n`` (may be <= 0)."""
        room = n + self.pad_left + self.pad_right - self.span
        if not self.ceil_mode:
            return room // self.stride + 1
        out = (room + self.stride - 1) // self.stride + 1
        # torch: the last window must start inside the input or its left padding
        if (out - 1) * self.stride >= n + self.pad_left:
            out -= 1
        return out

    def fits(self, n: int) -> bool:
        """Whether an ``n``-long input gives an output, and every max-pool window a tap
        inside the input (only dilated windows can miss a short input)."""
        out = self.out_length(n)
        if out <= 0 or (self.divides and n % self.stride):
            return False
        if self.max_pool and self.dilation > 1 and n < self.span:
            for j in range(out):  # n is short here: a few windows at most
                first = j * self.stride - self.pad_left
                if not any(0 <= first + i * self.dilation < n for i in range(self.kernel)):
                    return False
        return True

    def map_span(self, t: Span) -> Span:
        s = self.stride
        internal_assert(t.start % s == 0, f"tile start {t.start} is not on the stride-{s} grid")
        length = self.out_length(t.length)
        start = t.start // s
        stop = start + max(self.out_length(t.stop - t.start), 0)
        if t.valid_start <= 0:  # true left border: the tile's padding is the image's
            vstart = 0
        else:  # first j whose window starts at or after valid_start
            vstart = -(-(t.valid_start + self.pad_left) // s)
        if t.valid_stop >= t.length:  # true right border
            vstop = length
        else:  # one past the last j whose window ends before valid_stop
            vstop = (t.valid_stop - 1 + self.pad_left - (self.span - 1)) // s + 1
        vstart = min(max(vstart, start), stop)
        vstop = max(min(vstop, stop), vstart)
        return Span(length, start, stop, vstart, vstop)

    def field(self, f: Field) -> Field:
        return Field(size=f.size + (self.span - 1) * f.stride, stride=f.stride * self.stride,
                     offset=f.offset + self.pad_left * f.stride)


@dataclass(frozen=True)
class Pointwise:
    """An operation that maps each position to itself."""

    def out_length(self, n: int) -> int:
        return n

    def fits(self, n: int) -> bool:
        return n > 0

    def map_span(self, t: Span) -> Span:
        return t

    def field(self, f: Field) -> Field:
        return f


@dataclass(frozen=True)
class Merge:
    """Feature maps on the same grid combined position by position (add, mul, cat)."""

    def out_length(self, *ns: int) -> int:
        return ns[0] if len(set(ns)) == 1 else 0

    def fits(self, *ns: int) -> bool:
        return len(set(ns)) == 1 and ns[0] > 0

    def map_span(self, *ts: Span) -> Span:
        first = ts[0]
        internal_assert(all((t.length, t.start, t.stop) == (first.length, first.start, first.stop)
                            for t in ts), f"merge of tiles with different extents {ts}")
        vstart = max(t.valid_start for t in ts)
        vstop = max(min(t.valid_stop for t in ts), vstart)
        return Span(first.length, first.start, first.stop, vstart, vstop)

    def field(self, *fs: Field) -> Field:
        strides = sorted({f.stride for f in fs})
        if len(strides) > 1:
            raise GridMismatch(f"its inputs have total strides {strides}")
        offset = max(f.offset for f in fs)
        return Field(size=offset + max(f.reach for f in fs), stride=strides[0], offset=offset)


class _Resampling:
    """What :class:`Upsample` and :class:`Transposed` share: a map ``factor`` times finer
    whose output ``j`` reads the inputs ``[lo(j), hi(j)]``, periodic with period
    ``factor`` (module docstring). A subclass gives ``factor``, ``lo``, ``hi`` and
    ``_length`` (the output length torch gives an ``n``-long input)."""

    factor: int

    def out_length(self, n: int, *like: int) -> int:
        out = self._length(n) if n > 0 else 0
        return out if not like or like[0] == out else 0

    def fits(self, n: int, *like: int) -> bool:
        return n > 0 and self.out_length(n, *like) > 0

    def map_span(self, t: Span, *like: Span) -> Span:
        length = self.out_length(t.length)
        start = t.start * self.factor
        stop = start + self.out_length(t.stop - t.start)
        internal_assert(not like or (like[0].start, like[0].stop, like[0].length)
                        == (start, stop, length), f"resampled tile {start, stop} does not "
                        f"match the map whose size it takes {like}")
        vstart = start if t.valid_start <= 0 else self._first(lambda j: self.lo(j) >= t.valid_start,
                                                                t.valid_start)
        vstop = length if t.valid_stop >= t.length else self._first(
            lambda j: self.hi(j) >= t.valid_stop, t.valid_stop)
        vstart = min(max(vstart, start), stop)
        vstop = max(min(vstop, stop), vstart)
        return Span(length, start, stop, vstart, vstop)

    def _first(self, holds, i: int) -> int:
        """The first output ``j`` for which ``holds(j)`` (monotone in ``j``), near the output
        positions of input ``i``: each input feeds a few periods around ``i * factor``."""
        j = i * self.factor - self.reach_periods * self.factor
        while holds(j):
            j -= self.factor
        while not holds(j):
            j += 1
        return j

    @property
    def reach_periods(self) -> int:
        return 2

    def field(self, f: Field, *like: Field) -> Field:
        k = self.factor
        ahead = max(Fraction(j, k) - self.lo(j) for j in range(k))  # inputs read left of j/k
        after = max(self.hi(j) - Fraction(j, k) for j in range(k))  # ... and right of it
        offset = f.offset + ahead * f.stride
        reach = after * f.stride - f.offset + f.size
        return Field(size=_plain(offset + reach), stride=_plain(Fraction(f.stride) / k),
                     offset=_plain(offset))


def _plain(v):
    """A whole Fraction as an int (fields stay integers without upsampling)."""
    v = Fraction(v)
    return v.numerator if v.denominator == 1 else v


@dataclass(frozen=True)
class Upsample(_Resampling):
    """A map ``factor`` times finer, as ``F.interpolate`` makes it with an integer
    ``scale_factor`` (or a ``size`` that many times the input's: ``like`` is then the map it
    matches, a second input) and ``align_corners=False``: ``mode`` "nearest" copies input
    ``floor(j / k)``, "nearest-exact" input ``floor((j + 1/2) / k)``, "linear" blends inputs
    ``floor((j + 1/2) / k - 1/2)`` and the next (clamped at the image's border). Pixel shuffle
    is "nearest" on each axis."""

    factor: int
    mode: str = "nearest"

    def _length(self, n: int) -> int:
        return n * self.factor

    def lo(self, j: int) -> int:
        k = self.factor
        if self.mode == "nearest":
            return j // k
        if self.mode == "nearest-exact":
            return (2 * j + 1) // (2 * k)
        return (2 * j + 1 - k) // (2 * k)

    def hi(self, j: int) -> int:
        return self.lo(j) + (self.mode == "linear")


@dataclass(frozen=True)
class Transposed(_Resampling):
    """A transposed convolution on one axis, as torch computes it: input ``i`` adds into
    outputs ``i * stride - padding + dilation * m`` for each tap ``m``; the output is
    ``(n - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1`` long.
    Output ``j`` gets contributions from the inputs ``ceil((j + padding - dilation *
    (kernel - 1)) / stride)`` to ``floor((j + padding) / stride)``."""

    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1

    @property
    def factor(self) -> int:
        return self.stride

    def _length(self, n: int) -> int:
        return (n - 1) * self.stride - 2 * self.padding + self.dilation * (self.kernel - 1) \
            + self.output_padding + 1

    def lo(self, j: int) -> int:
        return -(-(j + self.padding - self.dilation * (self.kernel - 1)) // self.stride)

    def hi(self, j: int) -> int:
        return (j + self.padding) // self.stride

    @property
    def reach_periods(self) -> int:
        return 2 + (self.dilation * (self.kernel - 1) + self.padding) // self.stride


@dataclass(frozen=True)
class Length:
    """A size the module reads: the length of its step's ``k``-th input (``y.shape[-1]``)."""

    k: int


@dataclass(frozen=True)
class Arithmetic:
    """Integer arithmetic on sizes, as the module computes a crop or a padding from them:
    ``op`` is "+", "-", "*" or "//", each side a :class:`Length`, an int or another."""

    op: str
    left: object
    right: object


def evaluate(expr, ns: tuple) -> int:
    """The value of a size expression when the step's inputs have lengths ``ns``."""
    if isinstance(expr, Length):
        return ns[expr.k]
    if isinstance(expr, Arithmetic):
        a, b = evaluate(expr.left, ns), evaluate(expr.right, ns)
        return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0}[expr.op]
    return expr


@dataclass(frozen=True)
class SizedWindow(Window):
    """A 1-tap window whose paddings (negative: a crop) the module computes from sizes:
    the original U-Net's centre crop ``x[..., d:d + y.size(2)]`` with ``d = (x.size(2) -
    y.size(2)) // 2``, or a pad to another map's size. ``sizes`` holds the two expressions
    (over the lengths of the step's inputs: the map, then the maps whose sizes it reads).
    The left one sets where the output's positions lie: it must be ``pad_left`` for every
    length the module is used with (a length on which it is not does not fit, so no tile
    computes a crop the whole image would not). The right one sets only the output's
    length, and is evaluated for each (``pad_right`` is its value where it was traced)."""

    sizes: tuple = ()

    def agrees(self, ns: tuple) -> bool:
        return evaluate(self.sizes[0], ns) == self.pad_left

    def out_length(self, n: int, *refs: int) -> int:
        ns = (n,) + refs
        return n + self.pad_left + evaluate(self.sizes[1], ns) if self.agrees(ns) else 0

    def fits(self, n: int, *refs: int) -> bool:
        return self.out_length(n, *refs) > 0

    def map_span(self, t: Span, *refs: Span) -> Span:
        length = self.out_length(t.length, *(r.length for r in refs))
        start = t.start  # (output j is input j - pad_left, in the tile and in the image)
        stop = start + max(self.out_length(t.stop - t.start, *(r.stop - r.start for r in refs)), 0)
        vstart = start if t.valid_start <= 0 else t.valid_start + self.pad_left
        vstop = length if t.valid_stop >= t.length else t.valid_stop + self.pad_left
        vstart = min(max(vstart, start), stop)
        return Span(length, start, stop, vstart, max(min(vstop, stop), vstart))

    def field(self, f: Field, *refs: Field) -> Field:
        return super().field(f)


@dataclass(frozen=True)
class Step:
    """One step of an axis graph: ``rule`` applied to the outputs of steps ``inputs``."""

    rule: Window | Pointwise | Merge | Upsample | Transposed | None  # None: the input (step 0)
    inputs: tuple[int, ...] = ()
    name: str = "the input"


def _run(graph, first, apply):
    values = [first]
    for step in graph[1:]:
        values.append(apply(step, [values[i] for i in step.inputs]))
    return values


def lengths(graph, n: int) -> list[int]:
    """Activation length of every step for an input of length ``n`` (<= 0: no output)."""
    return _run(graph, n, lambda step, ns: step.rule.out_length(*ns) if min(ns) > 0 else 0)


@dataclass(frozen=True)
class Misfit:
    """Why an input (or tile) length cannot run through a graph: the first step that fails."""

    name: str
    kind: str  # "merge" (inputs of different lengths), "sizes" (a crop or padding computed
    # from sizes that differs from the one traced), "empty" (no output) or "max-pool"
    inputs: tuple[int, ...]  # the step's input lengths

    def __str__(self) -> str:
        if self.kind == "merge":
            broadcast = (" (a branch of length 1 is broadcast over the other: that depends on the "
                         "image's size, which no tile has)" if 1 in self.inputs else "")
            return f"{self.name} gets inputs of different lengths {list(self.inputs)}{broadcast}"
        if self.kind == "sizes":
            return (f"{self.name} crops or pads by amounts it computes from map sizes, and for "
                    f"maps of lengths {list(self.inputs)} they are not the amounts every other "
                    f"length gives")
        if self.kind == "empty":
            return f"{self.name} gets {self.inputs[0]} positions and gives no output"
        return f"{self.name} has a dilated max-pool window without a pixel"


def misfit(graph, n: int) -> Misfit | None:
    """Why an ``n``-long input (or tile) cannot run through the graph, or None if it can."""
    ns = lengths(graph, n)
    for step, out in zip(graph[1:], ns[1:]):
        ins = tuple(ns[i] for i in step.inputs)
        if min(ins) <= 0 or step.rule.fits(*ins):
            continue
        kind = ("merge" if isinstance(step.rule, Merge) else
                "sizes" if isinstance(step.rule, SizedWindow) and not step.rule.agrees(ins) else
                "empty" if out <= 0 else "max-pool")
        return Misfit(step.name, kind, ins)
    return None


def fits(graph, n: int) -> bool:
    return misfit(graph, n) is None


def spans(graph, first: Span) -> list[Span]:
    """The span of every step for a tile whose input span is ``first``."""
    return _run(graph, first, lambda step, ts: step.rule.map_span(*ts))


def fields(graph) -> list[Field]:
    """Receptive field of every step on the input (hull over paths at merges)."""
    return _run(graph, Field(), lambda step, fs: step.rule.field(*fs))


def output_field(graph) -> Field:
    return fields(graph)[-1]


def grid(graph) -> int:
    """The input pixels at which a tile may start: a multiple of this, so that every map
    of the graph has a position there (the lcm of the numerators of all total strides; the
    output's stride when nothing upsamples)."""
    return math.lcm(*(Fraction(f.stride).numerator for f in fields(graph)))


def _far_length(graph, n: int) -> int:
    """An image length, far beyond an ``n``-long tile, that the graph accepts."""
    f, align = output_field(graph), grid(graph)
    base = n + 4 * math.ceil(f.size + f.offset + 2 * f.stride + align)
    for length in range(base, base + 4 * align + 4):
        if fits(graph, length):
            return length
    return base


def interior_spans(graph, n: int) -> list[Span]:
    """Spans of every step for an interior tile of ``n`` pixels (no side on the image border).

    The tile starts at one :func:`grid` step and the image extends far beyond it on
    both sides; by translation invariance on that grid, every interior tile looks alike.
    """
    align = grid(graph)
    return spans(graph, Span(_far_length(graph, n), align, align + n, align, align + n))


def min_tile_size(graph) -> int:
    """Smallest tile that streams ``graph`` (for images larger than a tile).

    An interior tile starting at ``a`` (a multiple of the stride) has its first
    valid output read from ``a + stride*ceil(offset/stride) - offset``, so it
    needs ``size - offset + stride * ceil(offset / stride)`` pixels for one valid
    output, and at least one :func:`grid` step so that a last tile ending at the image
    edge can start on that grid. Merges may also need equal branch lengths, which some
    tile lengths do not give (nor do encoder-decoders whose maps must match); the
    smallest length that does is used. Consecutive tiles start a grid step apart at
    least, so a tile's valid outputs must span one (an encoder-decoder whose output is
    finer than its grid needs that many).
    """
    f, align = output_field(graph), grid(graph)
    n = max(math.ceil(f.size - f.offset + f.stride * math.ceil(f.offset / f.stride)), align)
    for candidate in range(n, n + 4 * align + 4 + 2 * math.ceil(f.size)):
        if fits(graph, candidate):
            last = interior_spans(graph, candidate)[-1]
            if (last.valid_stop - last.valid_start) * f.stride >= align:  # tiles can advance
                return candidate
    return n


def min_image_size(graph, limit: int) -> int | None:
    """Smallest input length up to ``limit`` the graph gives an output for (None if none)."""
    return next((n for n in range(1, limit + 1) if lengths(graph, n)[-1] > 0), None)


@dataclass(frozen=True)
class AxisTiling:
    """How one axis is cut into tiles.

    ``starts``/``stops``: input interval of each tile. ``out_starts``/``out_stops``:
    the full-output interval each tile's uncropped output covers.
    ``own_starts``/``own_stops``: the output interval each tile writes; they
    partition ``[0, out_length)`` and lie inside the tile's valid outputs.
    ``tile_length``: the regular tiles' length, ``tile_size`` or less where a merge
    needs equal branch lengths. ``step``/``overlap`` describe the regular tiles
    (the last tile ends at the image edge and may overlap more).
    """

    length: int
    tile_size: int
    out_length: int
    stride: int
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    out_starts: tuple[int, ...]
    out_stops: tuple[int, ...]
    own_starts: tuple[int, ...]
    own_stops: tuple[int, ...]
    min_tile_size: int
    step: int
    overlap: int
    tile_length: int


def tile_axis(graph, length: int, tile_size: int, axis_name: str = "axis",
              targets: tuple[int, ...] = ()) -> AxisTiling:
    """Cut one axis of length ``length`` into tiles of at most ``tile_size`` pixels.

    Tiles start at multiples of the graph's :func:`grid` (the total output stride
    without upsampling). Each next tile starts
    as far right as possible while its first valid output is no later than the
    previous tile's last valid output + 1. The last tile ends at the image edge
    (unless the tiles before it already give every output, when the pixels left
    over affect none) and may be shorter than ``tile_size``. A tile at least as
    large as the image gives one tile. ``overlap`` is ``tile_length - step``,
    or 0 when strides skip pixels between tiles.

    ``targets``: further steps whose whole map the tiles' valid positions must cover
    without a gap, as they cover the output's (for statistics of those maps: see
    :func:`ownership`). A position no output depends on (one a stride skips, or past
    the last output's window) is then computed too, and the tiles may start a little
    earlier, on the same stride grid.
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size} along {axis_name}")
    _check_image(graph, length, axis_name)
    f = output_field(graph)
    stride, min_size = grid(graph), min_tile_size(graph)
    out_length = lengths(graph, length)[-1]
    if tile_size >= length:
        return AxisTiling(length, tile_size, out_length, stride, (0,), (length,), (0,),
                          (out_length,), (0,), (out_length,), min_size, 0, 0, length)
    if tile_size < min_size:
        raise TileTooSmallError(
            f"tile_size {tile_size} is too small along {axis_name}: the streamed layers "
            f"have a receptive field of {f.size} pixels and an output stride of "
            f"{f.stride}, so a tile needs at least {min_size} pixels to produce a valid "
            f"output; use tile_size >= {min_size} (or >= {length}, the image size, for "
            f"a single tile)")
    size = next((n for n in range(tile_size, min_size - 1, -1) if fits(graph, n)), None)
    if size is None:
        raise TileTooSmallError(
            f"no tile of {min_size} to {tile_size} px runs through the streamed layers along "
            f"{axis_name} ({misfit(graph, tile_size)}); the image's {length} px do, so use "
            f"tile_size >= {length} (one tile), or make the branches agree for every length")
    covered = tuple(sorted(set(targets) | {len(graph) - 1}))
    full = lengths(graph, length)
    margin, advance = _interior_validity(graph, size, covered)
    if min(advance.values()) < stride:
        raise TileTooSmallError(
            f"tile_size {tile_size} is too small along {axis_name} for the map of "
            f"{graph[min(advance, key=advance.get)].name}, which the tiles must cover (an output, "
            f"or a map whose statistics are taken): its tiles would leave positions of that "
            f"map uncomputed; use tile_size >= {_covering_tile(graph, length, size, covered)}")
    rfs = fields(graph)
    tiles = [spans(graph, Span(length, 0, size, 0, size))]
    starts = [0]
    while any(tiles[-1][t].valid_stop < full[t] for t in covered):
        # the first valid position on every covered map at most one past the previous tile's last
        start = min((tiles[-1][t].valid_stop - margin[t]) * rfs[t].stride for t in covered)
        start = start // stride * stride
        if start + size >= length:
            start = _last_start(graph, length, size, start, axis_name)
        internal_assert(start > starts[-1], "tiling made no progress")
        stop = min(start + size, length)
        tile = spans(graph, Span(length, start, stop, start, stop))
        internal_assert(all(tile[t].valid_start <= tiles[-1][t].valid_stop for t in covered),
                        "gap between the valid positions of two tiles")
        starts.append(start)
        tiles.append(tile)
    out = [t[-1] for t in tiles]
    own_stops = [min(s.valid_stop, out_length) for s in out]
    step = min(advance.values()) // stride * stride
    return AxisTiling(
        length=length, tile_size=tile_size, out_length=out_length, stride=stride,
        starts=tuple(starts), stops=tuple(min(a + size, length) for a in starts),
        out_starts=tuple(s.start for s in out), out_stops=tuple(s.stop for s in out),
        own_starts=tuple([0] + own_stops[:-1]), own_stops=tuple(own_stops),
        min_tile_size=min_size, step=step, overlap=max(size - step, 0), tile_length=size)


def _interior_validity(graph, size: int, covered) -> tuple[dict, dict]:
    """Per covered step, for an interior tile of ``size`` pixels: how many positions of that
    step's map at its left are invalid, and how many input pixels its valid positions span
    (their number times the step's total stride), by which consecutive tiles can advance."""
    interior, rfs = interior_spans(graph, size), fields(graph)
    margin = {t: interior[t].valid_start - interior[t].start for t in covered}
    advance = {t: (interior[t].valid_stop - interior[t].valid_start) * rfs[t].stride for t in covered}
    return margin, advance


def _covering_tile(graph, length: int, size: int, covered) -> int:
    """The smallest tile above ``size`` whose valid positions advance by a stride on every
    covered map (the image size if none is near)."""
    stride = grid(graph)
    for n in range(size + 1, min(length, size + 8 * stride + 64)):
        if fits(graph, n) and min(_interior_validity(graph, n, covered)[1].values()) >= stride:
            return n
    return length


@dataclass(frozen=True)
class Ownership:
    """Which positions of one step's map each tile owns, on one axis: the tiles' owned
    intervals ``[own_starts[i], own_stops[i])`` partition the map, and each lies inside
    the tile's valid positions, which start at ``starts[i]`` on that map (so a tile's
    owned values are ``activation[own_start - start : own_stop - start]``)."""

    length: int
    starts: tuple[int, ...]
    own_starts: tuple[int, ...]
    own_stops: tuple[int, ...]
    stops: tuple[int, ...] = ()  # where each tile's value of the map ends


def ownership(graph, tiling: AxisTiling, step: int) -> Ownership:
    """The partition of step ``step``'s map among the tiles of ``tiling`` (made with that
    step among its ``targets``, or the output), each position owned by the first tile
    whose valid positions hold it."""
    length = lengths(graph, tiling.length)[step]
    tiles = [spans(graph, Span(tiling.length, a, b, a, b))[step]
             for a, b in zip(tiling.starts, tiling.stops)]
    own_stops = [min(t.valid_stop, length) for t in tiles]
    own_starts = [0] + own_stops[:-1]
    problem = next((i for i, (t, a, b) in enumerate(zip(tiles, own_starts, own_stops))
                    if b < a or (b > a and a < t.valid_start)), None)
    if problem is not None or own_stops[-1] != length:
        raise ValueError(f"the tiles do not cover every position of {graph[step].name}'s map with "
                         f"valid values: tile the image with that step among the targets")
    return Ownership(length, tuple(t.start for t in tiles), tuple(own_starts), tuple(own_stops),
                     tuple(t.stop for t in tiles))


def _check_image(graph, length: int, axis_name: str) -> None:
    problem = misfit(graph, length)
    if problem is None:
        return
    if problem.kind == "merge":
        fails = "" if 1 in problem.inputs else "; conventional backprop would fail the same way"
        raise ValueError(f"the streamed module cannot run on {length} pixels along {axis_name}: "
                         f"{problem}{fails}")
    if problem.kind == "empty":
        f = output_field(graph)
        least = min_image_size(graph, math.ceil(max(length, f.size + f.offset) + 4 * f.stride + 4))
        need = f"; they need at least {least} pixels" if least is not None else ""
        raise ValueError(
            f"the input is too small along {axis_name}: {length} pixels give no output "
            f"through the streamed layers ({problem}){need}")
    raise ValueError(f"the streamed module cannot run on {length} pixels along {axis_name}: "
                     f"{problem}; conventional backprop would fail the same way")


def _last_start(graph, length: int, size: int, start: int, axis_name: str) -> int:
    """Start of the last tile, which ends at the image edge.

    As far right as the previous tile allows (``start``), so that the last tile
    does no more work than needed, and at most ``size`` from the edge; the first
    such start on the stride grid whose tile the graph accepts.
    """
    stride = grid(graph)
    flush = -(-(length - size) // stride) * stride
    for a in range(min(start, (length - 1) // stride * stride), flush - 1, -stride):
        if fits(graph, length - a):
            return a
    raise TileTooSmallError(
        f"tile_size {size} cannot tile {axis_name} ({length} px): every last tile of at "
        f"most {size} px that ends at the image edge and starts on the output-stride grid "
        f"({stride} px) leaves a layer without input, a dilated max-pool window without a "
        f"pixel, or the inputs of a merge with different lengths; use tile_size >= "
        f"{_workable_tile(graph, length, size)}")


def _workable_tile(graph, length: int, tile_size: int) -> int:
    """Smallest larger tile size that tiles ``length`` (the image size if none is near)."""
    for t in range(tile_size + 1, min(length, tile_size + 64)):
        try:
            tile_axis(graph, length, t)
            return t
        except TileTooSmallError:
            continue
    return length


@dataclass(frozen=True)
class StepAxisGeometry:
    """One step on one axis: cumulative receptive field and, for an interior tile,
    the tile's activation length after this step and how many of its positions at
    each side are invalid (differ in general from the full image's)."""

    name: str
    rf: Field
    tile_length: int | None = None
    invalid_left: int | None = None
    invalid_right: int | None = None


@dataclass(frozen=True)
class AxisReceptiveField:
    """Receptive field of the streamed module on one axis.

    ``size``: input pixels one output depends on; ``stride``: total output stride;
    ``offset``: output ``j`` reads inputs from ``j*stride - offset``;
    ``min_tile_size``: smallest tile that gives a valid output away from the image
    border. With a ``tile_size``: for an *interior* tile of that many input pixels
    (starting on the stride grid, no side on the image border),
    ``tile_output_size`` is its output length and ``invalid_left``/``invalid_right``
    the output positions at each side whose receptive field leaves the tile.
    ``layers`` gives the same per step of the traced graph (input excluded).
    """

    size: int
    stride: int
    offset: int
    min_tile_size: int
    tile_size: int | None
    tile_output_size: int | None
    invalid_left: int | None
    invalid_right: int | None
    layers: tuple[StepAxisGeometry, ...]


def axis_receptive_field(graph, tile_size: int | None = None) -> AxisReceptiveField:
    """:class:`AxisReceptiveField` of one axis graph, per step and at the output."""
    rfs = fields(graph)
    if tile_size is None:
        per_step = [StepAxisGeometry(step.name, rf) for step, rf in zip(graph[1:], rfs[1:])]
        last = StepAxisGeometry("", rfs[-1])
    else:
        per_step = [StepAxisGeometry(step.name, rf, s.stop - s.start, s.valid_start - s.start,
                                     s.stop - s.valid_stop)
                    for step, rf, s in zip(graph, rfs, interior_spans(graph, tile_size))][1:]
        last = per_step[-1] if per_step else StepAxisGeometry("", rfs[-1], tile_size, 0, 0)
    f = rfs[-1]
    return AxisReceptiveField(
        size=f.size, stride=f.stride, offset=f.offset, min_tile_size=min_tile_size(graph),
        tile_size=tile_size, tile_output_size=last.tile_length, invalid_left=last.invalid_left,
        invalid_right=last.invalid_right, layers=tuple(per_step))
