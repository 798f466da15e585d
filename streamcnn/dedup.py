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

Whole-map steps (training-mode normalisations over space, global steps such as
squeeze-and-excitation: :mod:`streamcnn.passes`). Their statistics come from streamed passes
per level, and their backward adds whole-map terms; every pass shares, on the same groups:

* The first statistics pass reads every tile and groups them (:meth:`Duplicates.match`;
  later passes, the forward included, know the groups). The key holds, besides the above,
  the tile's owned crop of every map it adds to a whole-map sum or stores at a checkpoint
  (:func:`owned_elsewhere`), so a duplicate owns the same part of each as its representative.
* Statistics passes. With the earlier levels' statistics constants, a tile's run is a fixed
  function of its pixels and geometry, so a duplicate's owned part of every probed map equals
  its representative's: it adds the representative's summary again (:class:`Summaries`:
  ``Moments.summary``, ``Accumulator.summary``, per channel) under its own index, which is
  what places a max/min's first extreme and counts an amax's ties again. With checkpoints it
  copies the representative's owned part of each stored map (``Checkpoints.copy``); those
  values, and the ones a pass from a checkpoint computes, equal a computation from the image
  to rounding (docs/global_steps.md), which is the exactness claimed.
* Backward passes (the backward-terms passes and the final backward). A tile's backward is
  linear in its output gradient (or the gradient injected at a cut) plus the deeper levels'
  whole-map corrections, which each tile adds once at its owned positions - the same
  positions within the tile for every member, and the same values (but a max/min's, which
  only the tile owning the first extreme gets). So one recomputation, backpropagated with
  the group's summed gradient and adding each member's corrections (``NormMode.stand_for``;
  ``norms._Tile.terms`` scales by the member count, ``reductions.group_gradient`` adds each
  member's own (G1)), gives the sum of the members' parameter gradients and whole-map sums.
  Where each member's gradient belongs at a place of its own - the input gradient, or a
  backward-terms pass's gradient stored at a checkpoint cut - the members are backpropagated
  apart through the kept graph, each adding its own corrections (the segment before a cut
  then runs once with their sum, standing for all).

What changes for the user: forward hooks fire once per *computed* tile (fewer than the
tiles); a full backward hook fires once per backward call - once per group with the
group's summed gradient, or once per duplicate when the input gradient is wanted. State
and randomness are checked after every computed tile as before.

When it is off: ``Streaming(..., dedup=False)``; and always for modules that return several
feature maps (:func:`allowed`), and for ``pixel_loss``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .sources import digest
from .tiling import Tile, count, owned_crops

#: integer dtype of the same width, to compare and hash a float tensor's bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def allowed(graph) -> bool:
    """Whether tiles of a pass through ``graph`` (a ``TracedGraph``) may be shared.

    Not when the module returns several feature maps (``TracedGraph.maps``): a group's key,
    its copies and its summed gradients are written for one owned output per tile. Graphs
    with whole-map steps (training-mode normalisations over space, global steps) are
    allowed: their passes share as the module docstring says."""
    return len(graph.maps) == 1


def owned_elsewhere(graph, tilings, steps) -> dict:
    """Tile index -> its owned crop of each of ``steps``' maps (as (start, stop) pairs): the
    maps besides the output whose owned parts a tile adds to whole-map sums or writes to a
    checkpoint. Part of the key (:class:`Duplicates`), so identical tiles own the same
    positions of those maps too."""
    crops = [owned_crops(graph, tilings, s) for s in sorted(set(steps))]
    return {index: tuple(tuple(_bounds(c) for c in by[index]) for by in crops)
            for index in (crops[0] if crops else ())}


def _bounds(c) -> tuple:
    """A crop of one dimension, comparable: a slice's ends, or the owned indices of a
    sequence of positions (``tiling._owned_positions``)."""
    return (c.start, c.stop) if isinstance(c, slice) else tuple(c.tolist())


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

    def __init__(self, tilings, reread, keep: int | None = 4, fingerprint=fingerprint,
                 elsewhere: dict | None = None):
        self.tilings, self.reread, self.keep = tilings, reread, keep
        self.fingerprint = fingerprint
        self.elsewhere = elsewhere or {}  # tile index -> more of its key (owned_elsewhere)
        self.candidates: dict[tuple, list[Tile]] = {}  # (geometry, fingerprint) -> representatives
        self.representative: dict[tuple, Tile] = {}  # tile index -> its representative
        self.groups: dict[tuple, list[Tile]] = {}  # representative index -> it and its duplicates
        self.held: OrderedDict = OrderedDict()  # representative index -> pixels (recently matched)
        self.latest: tuple | None = None  # (index, pixels) of the latest new representative

    def match(self, tile: Tile, raw: torch.Tensor, hashed: bytes | None = None) -> Tile | None:
        """The earlier tile ``tile`` duplicates, or None (it becomes a representative).
        ``hashed``: its fingerprint, where the caller has one."""
        if self.known(tile):  # (grouped by an earlier pass: the groups hold for every pass)
            earlier = self.representative[tile.index]
            return None if earlier.index == tile.index else earlier
        key = (geometry_key(tile, self.tilings, raw), self.elsewhere.get(tile.index),
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

    def known(self, tile: Tile) -> bool:
        """Whether ``tile`` was matched already (by an earlier pass over the same input)."""
        return tile.index in self.representative

    def shared(self, tile: Tile) -> Tile | None:
        """The representative of a tile known to be a duplicate, else None (a representative,
        or not matched yet)."""
        earlier = self.representative.get(tile.index)
        return None if earlier is None or earlier.index == tile.index else earlier

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

    @property
    def complete(self) -> bool:
        """Whether every tile was matched (a pass over all of them has read them)."""
        return len(self.representative) == count(self.tilings)

    def release(self) -> None:
        """Drop the pixels held for comparisons (the forward is done)."""
        self.held.clear()
        self.latest = None


class Summaries:
    """What representatives added to a statistics pass's whole-map sums (each owned part's
    small summary, ``Moments.summary``/``Accumulator.summary``: per channel, not per
    position), for their duplicates to add again. At most ``keep`` representatives', the
    latest held or used (once the groups are known, only those with duplicates); a
    duplicate whose representative's were dropped is computed, which is exact too."""

    def __init__(self, duplicates: Duplicates, keep: int = 256):
        self.duplicates, self.keep = duplicates, keep
        self.held: OrderedDict = OrderedDict()  # representative index -> [(key, summary)]

    def hold(self, tile: Tile, added: list) -> None:
        if self.duplicates.complete and len(self.duplicates.group(tile)) == 1:
            return  # (nothing will add it again)
        self.held[tile.index] = list(added)
        self._used(tile)

    def of(self, representative: Tile) -> list | None:
        """What ``representative`` added, or None where it is not held."""
        added = self.held.get(representative.index)
        if added is not None:
            self._used(representative)
        return added

    def _used(self, tile: Tile) -> None:
        self.held.move_to_end(tile.index)
        while len(self.held) > self.keep:
            self.held.popitem(last=False)


def gradient_parts(group: list[Tile], gradients, separate: bool) -> list:
    """(tiles, output gradients) pairs to backpropagate through one recomputation of a group
    of identical tiles; ``gradients(tile)``: the tile's owned output gradients (a list, None
    for a map without one). Each pair stands for ``tiles``: the backward adds each one's
    whole-map corrections (``norms.NormMode.stand_for``), and its input gradient, or the
    gradient it stores at a checkpoint, goes to ``tiles[0]`` 's place. One pair per tile
    when ``separate`` (each such gradient is wanted at its own place) or the output gradients
    are half precision, else one pair, the whole group with the sum of its output gradients
    (the parameter gradients and the whole-map sums are linear in it)."""
    parts = [([t], gradients(t)) for t in group]
    if separate or len(parts) == 1 or any(g is not None and g.element_size() < 4
                                          for g in parts[0][1]):
        return parts
    totals = [None if g is None else g.clone() for g in parts[0][1]]
    for _, gs in parts[1:]:
        for total, g in zip(totals, gs):
            if total is not None:
                total += g
    return [(list(group), totals)]
