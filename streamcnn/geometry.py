"""Tile geometry along one axis: interval maps, receptive fields and tilings.

Everything here is plain integer arithmetic on one spatial axis; 2D tilings are
products of per-axis tilings because every supported layer acts on each axis
independently (a 2D window is the product of two 1D windows).

Coordinates. Each layer's activation has its own grid. A tile is described, in
the full image's coordinates of that grid, by the interval ``[start, stop)`` its
activation covers and the sub-interval ``[valid_start, valid_stop)`` whose values
equal the full image's. A layer maps these intervals to its output grid:

* the tile's output covers ``[start/s, start/s + n)`` where ``n`` is the length
  torch computes for a ``stop - start`` long input (``start`` is a multiple of
  the stride ``s``, so the tile computes on the full image's grid);
* output ``j`` reads inputs ``[j*s - pad_left, j*s - pad_left + span)``; it is
  valid when the part of that window inside the image lies in the valid input
  interval. Padding that falls outside the image is the image's own padding, so
  a tile side on the true image border stays valid; padding at an interior side
  replaces real pixels and invalidates the outputs that read it.

A residual block would be one more node type whose ``map_span`` maps the span
through each branch and intersects the valid intervals; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One tile's extent on one axis of one activation grid (full-image coordinates)."""

    length: int  # length of the full image's activation on this axis
    start: int
    stop: int
    valid_start: int
    valid_stop: int


@dataclass(frozen=True)
class RF:
    """Receptive field of a chain output on the chain's input axis.

    Output ``j`` depends on inputs ``[j*stride - offset, j*stride - offset + size)``.
    """

    size: int = 1
    stride: int = 1
    offset: int = 0


@dataclass(frozen=True)
class Window:
    """A sliding window (convolution or pooling) on one axis, as torch computes it."""

    kernel: int
    stride: int = 1
    pad_left: int = 0
    pad_right: int = 0
    dilation: int = 1
    ceil_mode: bool = False
    max_pool: bool = False  # torch mishandles max-pool windows with no tap inside the input

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

    def map_span(self, t: Span) -> Span:
        s = self.stride
        if t.start % s:
            raise AssertionError(f"tile start {t.start} is not on the stride-{s} grid")
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

    def compose(self, rf: RF) -> RF:
        return RF(
            size=rf.size + (self.span - 1) * rf.stride,
            stride=rf.stride * self.stride,
            offset=rf.offset + self.pad_left * rf.stride,
        )


@dataclass(frozen=True)
class Pointwise:
    """A layer that maps each position to itself (activations, BatchNorm, Identity)."""

    stride = 1

    def out_length(self, n: int) -> int:
        return n

    def map_span(self, t: Span) -> Span:
        return t

    def compose(self, rf: RF) -> RF:
        return rf


def chain_span(nodes, t: Span) -> Span:
    """Map a tile span through a chain of layers."""
    for node in nodes:
        t = node.map_span(t)
    return t


def chain_rf(nodes) -> RF:
    """Receptive field of the chain's output on its input."""
    rf = RF()
    for node in nodes:
        rf = node.compose(rf)
    return rf


def chain_length(nodes, n: int) -> int:
    for node in nodes:
        n = node.out_length(n)
        if n <= 0:
            return n
    return n


def interior_span(nodes, tile: int) -> tuple[Span, list[Span]]:
    """Map an interior tile of ``tile`` pixels (no side on the image border).

    Returns the final span and the span after every layer. The tile starts at
    one output stride and the image extends far beyond it on both sides; by
    translation invariance on the stride grid, every interior tile looks alike.
    """
    stride = chain_rf(nodes).stride
    span = Span(length=tile + 4 * stride + 4 * _max_extent(nodes), start=stride,
                stop=stride + tile, valid_start=stride, valid_stop=stride + tile)
    spans = []
    for node in nodes:
        span = node.map_span(span)
        spans.append(span)
    return span, spans


def _max_extent(nodes) -> int:
    rf = chain_rf(nodes)
    return rf.size + rf.offset + rf.stride


def min_tile_size(nodes) -> int:
    """Smallest tile size that can stream ``nodes`` (for images larger than a tile).

    An interior tile starting at ``a`` (a multiple of the stride) has its first
    valid output read from ``a + stride*ceil(offset/stride) - offset``, so it
    needs ``rf.size - rf.offset + stride * ceil(offset / stride)`` pixels for one
    valid output; and at least one stride, so that a last tile ending at the
    image edge can start on the stride grid.
    """
    rf = chain_rf(nodes)
    return max(rf.size - rf.offset + rf.stride * -(-rf.offset // rf.stride), rf.stride)


@dataclass(frozen=True)
class AxisTiling:
    """How one axis is cut into tiles.

    ``starts``/``stops``: input interval of each tile. ``out_starts``/``out_stops``:
    the full-output interval each tile's uncropped output covers.
    ``own_starts``/``own_stops``: the output interval each tile writes; they
    partition ``[0, out_length)`` and lie inside the tile's valid outputs.
    ``step``/``overlap`` describe the regular tiles (the last tile ends at the
    image edge and may overlap more).
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


class TileTooSmallError(ValueError):
    """The tile cannot produce any valid output away from the image border."""


def tile_axis(nodes, length: int, tile_size: int, axis_name: str = "axis") -> AxisTiling:
    """Cut one axis of length ``length`` into tiles of at most ``tile_size`` pixels.

    Tiles start at multiples of the total output stride. Each next tile starts
    as far right as possible while its first valid output is no later than the
    previous tile's last valid output + 1. The last tile ends at the image edge
    (unless the tiles before it already give every output, when the pixels left
    over affect none) and may be shorter than ``tile_size``. A tile at least as
    large as the image gives one tile. ``overlap`` is ``tile_size - step``,
    or 0 when strides skip pixels between tiles.
    """
    stride = chain_rf(nodes).stride
    min_size = min_tile_size(nodes)
    out_length = chain_length(nodes, length)
    if out_length <= 0:
        raise ValueError(
            f"the input is too small along {axis_name}: {length} pixels give no output "
            f"through the streamed layers; they need at least "
            f"{_min_image(nodes)} pixels")
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size} along {axis_name}")

    def span_of(start: int, stop: int) -> Span:
        return chain_span(nodes, Span(length, start, stop, start, stop))

    if tile_size >= length:
        return AxisTiling(length, tile_size, out_length, stride, (0,), (length,),
                          (0,), (out_length,), (0,), (out_length,), min_size, 0, 0)
    if tile_size < min_size:
        rf = chain_rf(nodes)
        raise TileTooSmallError(
            f"tile_size {tile_size} is too small along {axis_name}: the streamed layers "
            f"have a receptive field of {rf.size} pixels and an output stride of "
            f"{rf.stride}, so a tile needs at least {min_size} pixels to produce a valid "
            f"output; use tile_size >= {min_size} (or >= {length}, the image size, for "
            f"a single tile)")
    interior, _ = interior_span(nodes, tile_size)
    left_margin = interior.valid_start - interior.start
    spans = [span_of(0, tile_size)]
    starts = [0]
    while spans[-1].valid_stop < out_length:
        start = (spans[-1].valid_stop - left_margin) * stride
        if start + tile_size >= length:
            start = _last_start(nodes, length, tile_size, start, axis_name)
        if start <= starts[-1]:  # cannot happen for tile_size >= min_size
            raise AssertionError("tiling made no progress")
        span = span_of(start, min(start + tile_size, length))
        if span.valid_start > spans[-1].valid_stop:
            raise AssertionError("gap between the valid outputs of two tiles")
        starts.append(start)
        spans.append(span)
    own_stops = [min(s.valid_stop, out_length) for s in spans]
    own_starts = [0] + own_stops[:-1]
    step = (interior.valid_stop - interior.valid_start) * stride
    return AxisTiling(
        length=length, tile_size=tile_size, out_length=out_length, stride=stride,
        starts=tuple(starts), stops=tuple(min(a + tile_size, length) for a in starts),
        out_starts=tuple(s.start for s in spans), out_stops=tuple(s.stop for s in spans),
        own_starts=tuple(own_starts),
        own_stops=tuple(own_stops), min_tile_size=min_size, step=step,
        overlap=max(tile_size - step, 0))


def _last_start(nodes, length: int, tile_size: int, start: int, axis_name: str) -> int:
    """Start of the last tile, which ends at the image edge.

    As far right as the previous tile allows (``start``), so that the last tile
    does no more work than needed, and at most ``tile_size`` from the edge; the
    first such start on the stride grid whose tile passes ``windows_fit``.
    """
    stride = chain_rf(nodes).stride
    flush = -(-(length - tile_size) // stride) * stride
    for a in range(min(start, (length - 1) // stride * stride), flush - 1, -stride):
        if windows_fit(nodes, length - a):
            return a
    raise TileTooSmallError(
        f"tile_size {tile_size} cannot tile {axis_name} ({length} px): every last tile of at "
        f"most {tile_size} px that ends at the image edge and starts on the output-stride grid "
        f"({stride} px) leaves a layer without input, or a dilated max-pool window without a "
        f"pixel (layers whose padding exceeds their reach); use tile_size >= "
        f"{_workable_tile(nodes, length, tile_size)}")


def _workable_tile(nodes, length: int, tile_size: int) -> int:
    """Smallest larger tile size that tiles ``length`` (the image size if none is near)."""
    for t in range(tile_size + 1, min(length, tile_size + 64)):
        try:
            tile_axis(nodes, length, t)
            return t
        except TileTooSmallError:
            continue
    return length


def windows_fit(nodes, n: int) -> bool:
    """Whether an ``n``-pixel tile gives every layer an output, and every max-pool
    window a tap inside its input (only dilated windows can miss a short input)."""
    for node in nodes:
        out = node.out_length(n)
        if out <= 0:
            return False
        if getattr(node, "max_pool", False) and node.dilation > 1 and n < node.span:
            for j in range(out):  # n is short here: a few windows at most
                first = j * node.stride - node.pad_left
                if not any(0 <= first + i * node.dilation < n for i in range(node.kernel)):
                    return False
        n = out
    return True


def _min_image(nodes) -> int:
    n = 1
    while chain_length(nodes, n) <= 0:
        n += 1
    return n


@dataclass(frozen=True)
class LayerAxisGeometry:
    """One layer on one axis: cumulative receptive field and, for an interior
    tile, the tile's activation length after this layer and how many of its
    positions at each side are invalid (differ in general from the full image's)."""

    name: str
    rf: RF
    tile_length: int | None = None
    invalid_left: int | None = None
    invalid_right: int | None = None


@dataclass(frozen=True)
class AxisReceptiveField:
    """Receptive field of the streamed module on one axis.

    ``size``: input pixels one output depends on; ``stride``: total output stride
    (product of the strides); ``offset``: output ``j`` reads inputs from
    ``j*stride - offset``; ``min_tile_size``: smallest tile that gives a valid
    output away from the image border. With a ``tile_size``: for an *interior*
    tile of that many input pixels (starting on the stride grid, no side on the
    image border), ``tile_output_size`` is its output length and
    ``invalid_left``/``invalid_right`` the output positions at each side whose
    receptive field leaves the tile. ``layers`` gives the same per layer.
    """

    size: int
    stride: int
    offset: int
    min_tile_size: int
    tile_size: int | None
    tile_output_size: int | None
    invalid_left: int | None
    invalid_right: int | None
    layers: tuple[LayerAxisGeometry, ...]


def receptive_field(module, ndim: int, tile_size=None) -> tuple[AxisReceptiveField, ...]:
    """Per-axis receptive field, output stride and interior-tile invalid borders.

    ``module``: the streamed module (nested ``nn.Sequential`` of supported layers);
    ``ndim``: 1 for (N, C, L) inputs, 2 for (N, C, H, W); ``tile_size``: optional
    int or per-axis tuple, the input tile edge in pixels.

    Example: three 3x3 convolutions with padding 1 have ``size=7, stride=1,
    offset=3``; an interior 32-pixel tile gives 32 outputs of which 3 at each
    side are invalid.
    """
    from .layers import inspect_layers
    from .streaming import normalize_tile_size

    layers = inspect_layers(module, ndim)
    sizes = normalize_tile_size(tile_size, ndim) if tile_size is not None else (None,) * ndim
    result = []
    for a in range(ndim):
        nodes = [layer.nodes[a] for layer in layers]
        per_layer, rf, spans = [], RF(), None
        if sizes[a] is not None:
            _, spans = interior_span(nodes, sizes[a])
        for i, (layer, node) in enumerate(zip(layers, nodes)):
            rf = node.compose(rf)
            if spans is None:
                per_layer.append(LayerAxisGeometry(layer.path, rf))
            else:
                s = spans[i]
                per_layer.append(LayerAxisGeometry(layer.path, rf, s.stop - s.start,
                                                   s.valid_start - s.start, s.stop - s.valid_stop))
        last = per_layer[-1] if per_layer else LayerAxisGeometry("", RF(), sizes[a], 0, 0)
        result.append(AxisReceptiveField(
            size=rf.size, stride=rf.stride, offset=rf.offset, min_tile_size=min_tile_size(nodes),
            tile_size=sizes[a], tile_output_size=last.tile_length,
            invalid_left=last.invalid_left, invalid_right=last.invalid_right,
            layers=tuple(per_layer)))
    return tuple(result)
