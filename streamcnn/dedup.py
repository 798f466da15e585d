"""Identical tiles computed once, exactly.

A slide is mostly background: glass, or one colour where a tissue mask blanked it
(``ImageArray.from_slide(..., tissue=mask)``). Many of its tiles then hold the same pixels,
and a streamed pass need not run the module on each.

Why sharing is exact. The tile loop runs the pipeline on the tile alone: ``y =
pipeline(tile)`` sees the tile's pixels and shape and nothing else (not where the tile
lies; zero padding is applied at the tile's own edges, and ``Streaming`` refuses anything
that reads positions or the spatial size). So ``y`` is one fixed function of the tile's
shape, applied to its pixels, and a tile writes ``y[crop]``, its *owned* crop, into the
output. Two tiles of one pass with

* the same input shape (batch, channels, every spatial length) and dtype,
* the same owned crop (offsets and sizes on every spatial axis),
* the same pixels, compared exactly - bit for bit, not by ``==``, which equates ``-0.0``
  with ``0.0`` and no NaN with itself -

therefore write equal owned outputs, and each is its own tile's correct part of the whole
output (the tiling chose that crop for that tile, inside its valid outputs). The key also
holds each side's place against the image border and the tile's start against the stride
grid. They add nothing to the argument (every start is a multiple of the output stride,
and a crop is valid for its tile, border or not); they keep border tiles apart from
interior ones should crops ever coincide. The crop cannot be left out: a last tile may
stop short of the image (pixels no output reads), so it is no border tile, yet own more
outputs than the tiles of its shape before it (``verify/test_dedup.py`` shows the step
failing without it). A tile next to a tile that differs is never shared by
mistake: its pixels include its whole overlap, so any differing pixel it reads makes it
differ.

Equality is decided on the pixels: a fingerprint (BLAKE2b of the bits,
:func:`fingerprint`) only finds the candidate, and :func:`same_pixels` compares the two
tiles exactly. The candidate's pixels come from a small cache of the representatives that
were matched lately, or are read again from the source.

The backward. A duplicate's part of the loss is the representative's owned output
against the duplicate's slice of the output gradient. By linearity the parameter
gradient of the representative's recomputation with the *sum* of its duplicates' output
gradients is the sum of theirs - one recomputation and one backward for the whole group
(:func:`gradient_parts`); the sums are the same products added in another order, so they
agree with unshared streaming to float rounding, not bit for bit. When the input gradient
is wanted, each duplicate's input gradient goes to its own place, so the group's graph is
kept and backpropagated once per duplicate (``retain_graph``): exact, and the
recomputation is still shared. Half-precision output gradients are not summed before the
backward either (the sum could overflow where the parts do not).

What changes for the user: forward hooks fire once per *computed* tile (fewer than the
tiles); a full backward hook fires once per backward call - once per group with the
group's summed gradient, or once per duplicate when the input gradient is wanted. State
and randomness are checked after every computed tile as before.

When it is off: ``Streaming(..., dedup=False)``; and always for graphs whose
normalisation statistics span the image, and for modules that return several feature maps
(:func:`allowed`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .sources import digest
from .tiling import Tile

#: integer dtype of the same width, to compare and hash a float tensor's bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def allowed(graph) -> bool:
    """Whether tiles of a pass through ``graph`` (a ``TracedGraph``) may be shared.

    Not when a step normalises with statistics over the whole feature map (``norm`` steps,
    training-mode BatchNorm): its backward adds whole-map terms (sums of ``dy`` and ``dy
    x̂`` over every position) that a streamed implementation gathers per tile in passes of
    its own, and those passes must see every tile. This is the hook for that: dedup stays
    off there until those passes are shown to combine duplicates exactly.

    Not when the module returns several feature maps (``TracedGraph.maps``): a group's key,
    its copies and its summed gradients are written for one owned output per tile."""
    return len(graph.maps) == 1 and not any(step.norm is not None for step in graph.steps)


def geometry_key(tile: Tile, tilings, raw: torch.Tensor) -> tuple:
    """What besides its pixels decides a tile's owned output (see the module docstring):
    input shape and dtype, owned crop, border sides, start against the stride grid."""
    spatial = tile.inp[2:]
    crop = tuple((c.start, c.stop) for c in tile.crop[2:])
    borders = tuple((s.start == 0, s.stop == t.length) for s, t in zip(spatial, tilings))
    phase = tuple(s.start % t.stride for s, t in zip(spatial, tilings))
    return tuple(raw.shape), raw.dtype, crop, borders, phase


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same width (a view): equal exactly when the bits
    are (unlike ``==`` on floats, which equates ``-0.0`` and ``0.0`` and no NaN)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.view(_BITS[t.element_size()])
    return t


def fingerprint(raw: torch.Tensor) -> bytes:
    """A hash of a tile's bits (``sources.digest``; a tile on another device is copied to
    the host first). Finds candidates only: equality is :func:`same_pixels`."""
    return digest(bits(raw).cpu())


def same_pixels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tiles hold the same bits (shapes and dtypes included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


class Duplicates:
    """The tiles of one forward pass, grouped by geometry and pixels.

    :meth:`match` is called with every tile in order; a tile equal to an earlier one (see
    the module docstring) is a *duplicate* of that *representative*. ``reread(tile)``
    returns a representative's pixels again, for the exact comparison when they are no
    longer held: at most ``keep`` representatives that were matched lately are held, plus
    the latest new one (``keep=None``: all, for reads that are views of a tensor held
    anyway)."""

    def __init__(self, tilings, reread, keep: int | None = 4, fingerprint=fingerprint):
        self.tilings, self.reread, self.keep = tilings, reread, keep
        self.fingerprint = fingerprint
        self.candidates: dict[tuple, list[Tile]] = {}  # (geometry, fingerprint) -> representatives
        self.representative: dict[tuple, Tile] = {}  # tile index -> its representative
        self.groups: dict[tuple, list[Tile]] = {}  # representative index -> it and its duplicates
        self.held: OrderedDict = OrderedDict()  # representative index -> pixels (recently matched)
        self.latest: tuple | None = None  # (index, pixels) of the latest new representative

    def match(self, tile: Tile, raw: torch.Tensor, hashed: bytes | None = None) -> Tile | None:
        """The earlier tile ``tile`` duplicates, or None (it becomes a representative).
        ``hashed``: its fingerprint, where the caller has one."""
        key = (geometry_key(tile, self.tilings, raw),
               self.fingerprint(raw) if hashed is None else hashed)
        for earlier in self.candidates.get(key, ()):
            pixels = self._pixels(earlier)
            if same_pixels(raw, pixels):
                self._hold(earlier, pixels)
                self.representative[tile.index] = earlier
                self.groups[earlier.index].append(tile)
                return earlier
        self.candidates.setdefault(key, []).append(tile)
        self.representative[tile.index] = tile
        self.groups[tile.index] = [tile]
        self.latest = (tile.index, raw)
        if self.keep is None:
            self.held[tile.index] = raw
        return None

    def _pixels(self, tile: Tile) -> torch.Tensor:
        if tile.index in self.held:
            return self.held[tile.index]
        if self.latest is not None and self.latest[0] == tile.index:
            return self.latest[1]
        return self.reread(tile)

    def _hold(self, tile: Tile, pixels: torch.Tensor) -> None:
        self.held[tile.index] = pixels
        self.held.move_to_end(tile.index)
        while self.keep is not None and len(self.held) > self.keep:
            self.held.popitem(last=False)

    def computed(self, tiles):
        """The representatives among ``tiles`` (the tiles a pass computes), in order."""
        return (t for t in tiles if self.representative[t.index].index == t.index)

    def group(self, tile: Tile) -> list[Tile]:
        """A representative and its duplicates, in tile order."""
        return self.groups[tile.index]

    def release(self) -> None:
        """Drop the pixels held for comparisons (the forward is done)."""
        self.held.clear()
        self.latest = None


def gradient_parts(group: list[Tile], grad_out: torch.Tensor, separate: bool) -> list:
    """(tile, output gradient) pairs to backpropagate through one recomputation of a group
    of identical tiles: one pair per tile when ``separate`` (each input gradient is wanted
    at its own place) or the output gradients are half precision, else one pair, the
    representative with the sum of the group's output gradients (the parameter gradients
    are linear in it)."""
    parts = [(t, grad_out[t.out]) for t in group]
    if separate or len(parts) == 1 or grad_out.element_size() < 4:
        return parts
    total = parts[0][1].clone()
    for _, g in parts[1:]:
        total += g
    return [(group[0], total)]
