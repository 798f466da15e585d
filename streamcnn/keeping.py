"""The graphs of the forward's last tiles, kept for the backward within a memory budget.

The backward recomputes every tile (gradient checkpointing). The tiles the forward computes
last can instead keep their graphs - built with grad enabled on aliases of the module's
tensors, as the backward would build them - and the backward starts with those, without
recomputing them. Each kept graph holds one tile's activations from the forward until the
backward, so their number is set by a budget in bytes, divided by ``plan()``'s estimate of
one tile's working memory. ``None`` keeps the last tile only: its graph lives from the end of
the forward to the start of the backward, which would build the same graph next.

Gradients are the same sums: the kept tiles' contributions reach the aliases' ``.grad``
and are added to the recomputed tiles' (in another order: float rounding only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Kept:
    """What the forward keeps for the backward: ``count`` of its last tiles' graphs, built
    on ``tensors`` (name -> alias; ``aliases``: the alias of each captured tensor that
    requires grad, in order), with tiles requiring grad as the input does (``x_grad``)."""

    count: int
    tensors: dict
    aliases: tuple
    x_grad: bool
    graphs: dict = field(default_factory=dict)  # tile index -> (tile leaf, owned output)

    @classmethod
    def of(cls, count: int, captured, x_grad: bool) -> "Kept | None":
        if count <= 0:
            return None
        aliases = tuple(t.detach().requires_grad_() for t in captured.grad_tensors)
        return cls(count, captured.substitutes(aliases, captured.const_tensors), aliases, x_grad)

    def needed(self, need: list) -> list:
        """The aliases whose gradients are wanted (``need``, one flag per alias); the others'
        gradients are dropped."""
        for a, n in zip(self.aliases, need):
            if not n:
                a.grad = None
        return [a for a, n in zip(self.aliases, need) if n]


def check_budget(budget) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"keep_graphs must be None (the last tile), 0 (none) or a budget in "
                         f"bytes >= 0, got {budget!r}")


def tiles_kept(budget: int | None, tile_bytes: int, num_tiles: int) -> int:
    """How many of the forward's last tiles keep their graph: ``None``, the last one; else as
    many as ``budget`` bytes hold at ``tile_bytes`` each. Never the first tile (it runs
    before the forward knows what it reads), so at most ``num_tiles - 1``."""
    check_budget(budget)
    count = 1 if budget is None else budget // max(tile_bytes, 1)
    return max(0, min(count, num_tiles - 1))
