"""Global steps: reductions of a feature map over all its spatial positions, streamed exactly.

Squeeze-and-excitation, ECA, CBAM's channel attention and ConvNeXt-V2's GRN reduce a map
``x`` over every position to one value per sample and channel, ``R = red(x)`` (a mean, sum,
max or min, or the L2 norm), compute a small gate from it, and broadcast the gate back
onto maps. A tile holds only some positions, so streamcnn finds ``R`` first, as it finds a
normalisation's statistics (``streamcnn.passes``: one streamed pass per level, each tile
adding what it owns of ``x``: float64 sums, exact extremes), and then every tile uses the
whole image's ``R`` as the reduction call's result; the gate is computed from it on every
tile, the same each time.

The backward. The gradient reaching ``R`` is a sum over the output's positions, and a
tile's backward gives only the part that flows from the outputs it owns: the parts add up,
so ``G = dL/dR`` is collected by a streamed backward pass (deepest level first, as for
normalisations), the small computation's parameters getting their gradients from each
tile's part as any parameter does. In the final backward every tile then adds the
reduction's own input gradient once, at the positions it owns of ``x``::

    dx = G · dR/dx,   dR/dx = 1/n (mean), 1 (sum), x / R (L2 norm; 0 where R = 0),
                      [x = R] / #ties (amax, amin: torch shares it evenly among ties),
                      [at the first extreme in row-major order] (max, min, adaptive max
                      pooling: torch's kernels pick one)                              (G1)

This module holds the per-kind parts: the merge of tiles' parts (:class:`Accumulator`), the
value a tile uses (:func:`value_of`), and (G1) (:class:`Reduce`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .rules import Global


#: kinds whose whole-map value is the log-sum-exp of the input over all positions (a softmax
#: over the positions uses it: ``exp(x - R)``)
LOG_SUM_EXP = ("logsumexp", "softmax", "log_softmax")


@dataclass(frozen=True)
class Reduced:
    """One global step's whole-map value, float64, with the reduced dimensions kept as 1
    (``value``); ``count``: positions per sample and channel; ``ties``: how many hold the
    extreme (amax/amin); ``winners``: tile index -> (which samples and channels' first
    extreme that tile owns, its index in the tile's owned part, flattened) (max/min)."""

    value: torch.Tensor
    count: int
    ties: torch.Tensor | None = None
    winners: dict | None = None


def _flat(part: torch.Tensor, g: Global) -> torch.Tensor:
    """``part`` with the reduced dimensions moved last and flattened into one."""
    k = len(g.dims)
    return part.movedim(g.dims, tuple(range(-k, 0))).flatten(-k)


def _keepdim(t: torch.Tensor, part_shape, g: Global) -> torch.Tensor:
    """A reduced value of the other dimensions, in the keepdim shape of ``part``."""
    return t.reshape([1 if k in g.dims else s for k, s in enumerate(part_shape)])


class Accumulator:
    """A global step's reduction, merged over the tiles' owned parts of its input."""

    def __init__(self, g: Global, origins: dict | None = None, lengths: tuple = ()):
        self.g, self.origins, self.lengths = g, origins, lengths
        self.count = 0
        self.total = None  # float64 sums (of squares for the norm), or the running extreme
        self.ties = None
        self.key = None  # max/min: the row-major position of the first extreme so far
        self.owner: dict = {}

    @property
    def sign(self) -> int:
        return -1 if self.g.kind in ("amin", "min") else 1

    def add(self, part: torch.Tensor, tile_index) -> None:
        self.include(self.summary(part), tile_index)

    def summary(self, part: torch.Tensor) -> tuple | None:
        """What an owned part adds, small and a function of its values alone (None: empty):
        its count and float64 sum (of squares for the norm); or its extreme and the ties
        (amax/amin); or its extreme, the flat index of the first, and its shape (max/min: the
        row-major position in the whole map needs the tile, given to :meth:`include`). An
        identical part (:mod:`streamcnn.dedup`) adds it again."""
        part = part.detach()
        n = math.prod(part.shape[d] for d in self.g.dims)
        if n == 0:
            return None
        flat = _flat(part, self.g)
        kind = self.g.kind
        if kind in LOG_SUM_EXP:
            return (n,) + _log_sum_exp(flat.double())
        if kind in ("mean", "sum", "norm", "matmul"):
            return n, (flat.double().square() if kind == "norm" else flat.double()).sum(-1)
        signed = flat.double() * self.sign
        best = signed.amax(-1)
        if kind in ("amax", "amin"):
            return n, best, (signed == best.unsqueeze(-1)).sum(-1)
        local = (signed == best.unsqueeze(-1)).to(torch.uint8).argmax(-1)  # first extreme
        return n, best, local, part.shape

    def include(self, summary: tuple | None, tile_index) -> None:
        """Merge a part's :meth:`summary`, owned by the tile ``tile_index``."""
        if summary is None:
            return
        self.count += summary[0]
        kind = self.g.kind
        if kind in LOG_SUM_EXP:
            self._merge_log_sum_exp(*summary[1:])
            return
        if kind in ("mean", "sum", "norm", "matmul"):
            s = summary[1]
            self.total = s if self.total is None else self.total + s
            return
        if kind in ("amax", "amin"):
            _, best, ties = summary
            if self.total is None:
                self.total, self.ties = best, ties
            else:
                self.ties = torch.where(best > self.total, ties, self.ties + torch.where(
                    best == self.total, ties, torch.zeros_like(ties)))
                self.total = torch.maximum(self.total, best)
            return
        _, best, local, shape = summary
        key = self._global_key(local, shape, tile_index)
        if self.total is None:
            better = torch.ones_like(best, dtype=torch.bool)
        else:
            better = (best > self.total) | ((best == self.total) & (key < self.key))
        self.total = best if self.total is None else torch.where(better, best, self.total)
        self.key = key if self.key is None else torch.where(better, key, self.key)
        for index in list(self.owner):
            mask, at = self.owner[index]
            self.owner[index] = (mask & ~better, at)
        self.owner[tile_index] = (better, local)

    def _merge_log_sum_exp(self, shift: torch.Tensor, part: torch.Tensor) -> None:
        """A running log-sum-exp: the largest value so far ``key`` and the sum of
        ``exp(x - key)`` so far ``total``, rescaled when a larger value comes."""
        if self.total is None:
            self.total, self.key = part, shift
            return
        top = torch.maximum(self.key, shift)
        self.total = self.total * (self.key - top).exp() + part * (shift - top).exp()
        self.key = top

    def _global_key(self, local, shape, tile_index):
        """The row-major position in the whole map of each owned part's flat index."""
        sizes = [shape[d] for d in self.g.dims]
        origin = self.origins[tile_index]
        key = torch.zeros_like(local)
        rest = local.clone()
        coords = []
        for size in reversed(sizes):
            coords.append(rest % size)
            rest = rest // size
        for d, c in zip(self.g.dims, reversed(coords)):
            key = key * self.lengths[d] + c + origin[d]
        return key

    def stats(self) -> Reduced:
        if self.total is None:
            raise ValueError("no values were seen: the reduction of an empty map is undefined")
        kind = self.g.kind
        value = self.total
        if kind == "mean":
            value = value / self.count
        elif kind == "norm":
            value = value.sqrt()
        elif kind in LOG_SUM_EXP:
            value = self.key + value.log()
        elif kind not in ("sum", "matmul"):
            value = value * self.sign
        return Reduced(value, self.count, self.ties,
                       {i: w for i, w in self.owner.items() if w[0].any()} if kind in ("max", "min")
                       else None)


def _log_sum_exp(flat: torch.Tensor) -> tuple:
    """A part's largest value (0 where all are -inf) and its sum of ``exp(x - largest)``."""
    top = flat.amax(-1)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return shift, (flat - shift.unsqueeze(-1)).exp().sum(-1)


def value_of(reduced: Reduced, g: Global, like: torch.Tensor) -> torch.Tensor:
    """The value a reduction call of ``like`` 's tile returns: the whole map's, in
    ``like`` 's dtype, with the reduced dimensions kept (as 1) or dropped as the call does."""
    value = _keepdim(reduced.value, like.shape, g).to(like.dtype)
    return value if g.keepdim else value.squeeze(g.dims) if g.dims else value


def reduced_input(g: Global, args: tuple, kwargs: dict) -> torch.Tensor:
    """The map a tile's reduction call reduces: its input, or for ``x @ w`` over the
    positions the product ``x[..., :, p, None] * w[..., None, p, :]``, summed over ``p``."""
    x = args[0] if args else next(iter(kwargs.values()))
    if g.kind == "matmul":
        x = x.unsqueeze(-1) * (args[1] if len(args) > 1 else kwargs["other"]).unsqueeze(-3)
    return x


def after(g: Global, x: torch.Tensor):
    """What a tile's call returns given the whole map's value ``R``: ``R`` itself for a
    reduction; ``exp(x - R)`` for a softmax over the positions, ``x - R`` for log_softmax
    (``R`` their log-sum-exp): pointwise in ``x`` once ``R`` is known."""
    if g.kind == "softmax":
        return lambda r: (x - r).exp()
    if g.kind == "log_softmax":
        return lambda r: x - r
    return lambda r: r


@dataclass
class TileGrad:
    """What one global step's autograd node needs of the tile it runs in."""

    crop: tuple | None  # this tile's owned part of the reduction's input
    grad: torch.Tensor | None  # G, the whole-map gradient of R (float64, keepdim), once known
    reduced: Reduced
    index: tuple  # the tile's index
    #: the tiles whose (G1) this tile's backward adds (:mod:`streamcnn.dedup`: identical tiles
    #: recomputed once; read when the backward runs, so the tile loop may change it between
    #: backward calls); None: this tile alone
    members: list | None = None


def group_gradient(g: Global, t: TileGrad, part: torch.Tensor) -> torch.Tensor:
    """(G1) of each of ``t.members``, added. Identical tiles own the same positions of the
    same values, so (G1) is the same for each but for max/min, where only the tile that owns
    the first extreme gets it: there each member's own is added."""
    members = t.members or [t.index]
    if g.kind in ("max", "min"):
        if members == [t.index]:
            return gradient(g, t, part)
        return sum(gradient(g, replace(t, index=i, members=None), part) for i in members)
    grad = gradient(g, t, part)
    return grad * len(members) if len(members) > 1 else grad


def gradient(g: Global, t: TileGrad, part: torch.Tensor) -> torch.Tensor:
    """(G1) at the positions of ``part``, the tile's owned part of the reduction's input."""
    grad = _keepdim(t.grad, part.shape, g)
    value = _keepdim(t.reduced.value, part.shape, g)
    kind = g.kind
    p = part.double()
    if kind == "mean":
        return (grad / t.reduced.count).expand(part.shape)
    if kind in ("sum", "matmul"):
        return grad.expand(part.shape)
    if kind in LOG_SUM_EXP:
        return grad * (p - value).exp()
    if kind == "norm":
        return torch.where(value == 0, torch.zeros_like(p), grad * p / value)
    if kind in ("amax", "amin"):
        ties = _keepdim(t.reduced.ties, part.shape, g)
        return torch.where(p == value, grad / ties, torch.zeros_like(p))
    flat = torch.zeros_like(_flat(p, g))
    won = t.reduced.winners.get(t.index)
    if won is not None:
        mask, at = won
        flat.scatter_(-1, at.unsqueeze(-1), torch.where(
            mask, _flat(grad, g).squeeze(-1), torch.zeros_like(mask, dtype=flat.dtype)).unsqueeze(-1))
    k = len(g.dims)
    moved = flat.unflatten(-1, [part.shape[d] for d in g.dims])
    return moved.movedim(tuple(range(-k, 0)), g.dims)


class Reduce(torch.autograd.Function):
    """``R``, the whole map's reduction, as a tile's reduction call returns it; the backward
    ignores the tile's own gradient of ``R`` (its part, collected by the backward passes)
    and gives ``x`` (G1) at the positions the tile owns (zero elsewhere)."""

    @staticmethod
    def forward(ctx, x, value, tile: TileGrad, g: Global):
        ctx.save_for_backward(x)
        ctx.tile, ctx.g = tile, g
        return value.clone()

    @staticmethod
    def backward(ctx, _):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        t = ctx.tile
        dx = torch.zeros_like(x)
        if t.grad is not None and t.crop is not None:
            dx[t.crop] = group_gradient(ctx.g, t, x[t.crop]).to(x.dtype)
        return dx, None, None, None
