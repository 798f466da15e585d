"""Tiles whose owned output gradient is exactly zero are not recomputed in the backward.

A tile's backward starts from the gradient of the outputs it owns. When that is all zeros,
every gradient the tile contributes - to the input and to every parameter - is a sum of
products with a zero factor, so it is zero and the tile need not run again: a global
max-pool head gives gradient to a few positions only, a masked loss to the masked region.

Exactly zero only in finite arithmetic: conventionally, 0 × inf and 0 × NaN are NaN, and
that NaN reaches the gradients. A skipped tile would give zeros instead. So a tile is
skipped only where no factor of its backward can be infinite:

* every value the tile computed in the forward was finite (:class:`FiniteWatch`, which
  sums each floating-point result as the tile runs: a non-finite value makes the running
  sum non-finite; an overflowing sum only keeps the tile, the safe side), its input too,
  and every tensor of the module it read (checked once per step);
* the graph has no operation whose derivative is infinite at a finite value: ``sqrt`` at
  0 (its result 0 is finite, its derivative is not), a power with an exponent that is not
  a whole number >= 1, ``std`` of equal values, ``norm`` (:func:`allowed`);
* no normalisation with whole-image statistics is streamed: its backward adds whole-map
  terms at every position a tile owns, whatever that tile's own output gradient
  (``streamcnn.norms``, (N1)).

At least one tile is always recomputed, so that where a gradient exists conventionally -
zeros, not None - it exists streamed too.
"""

from __future__ import annotations

import operator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

#: calls whose derivative can be infinite where their input and result are finite
_UNBOUNDED = {torch.sqrt, "sqrt", "sqrt_", torch.std, "std", torch.norm, "norm"}
_POWERS = {torch.pow, operator.pow, "pow", "pow_"}


def allowed(graph) -> bool:
    """Whether zero-gradient tiles of a pass through ``graph`` (a ``TracedGraph``) may be
    skipped (see the module docstring)."""
    if any(step.norm is not None for step in graph.steps):
        return False
    return not any(_unbounded(node) for node in graph.graph.nodes)


def _unbounded(node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _UNBOUNDED:
        return True
    if node.target in _POWERS:
        exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
        return not (isinstance(exponent, int) and exponent >= 1 or
                    isinstance(exponent, float) and exponent.is_integer() and exponent >= 1)
    return False


class FiniteWatch(TorchFunctionMode):
    """Whether every floating-point value computed while the mode is active is finite:
    each result's float32 sum is added to a running total on its device (no
    synchronisation per operation); :attr:`finite` reads the totals once."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self.totals: dict = {}  # device -> running sum
        for t in tensors:
            self._add(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out

    def _add(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            s = t.detach().sum(dtype=torch.float32)
            total = self.totals.get(s.device)
            self.totals[s.device] = s if total is None else total + s

    @property
    def finite(self) -> bool:
        return all(bool(torch.isfinite(t)) for t in self.totals.values())


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` holds only finite values."""
    return all(bool(torch.isfinite(t).all()) for t in tensors
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def zero_gradient(grads) -> bool:
    """Whether every output gradient of ``grads`` (the slices a group of tiles owns, one per
    tile and output map; None for an output the loss does not use) is exactly zero."""
    return not any(bool(g.any()) for g in grads if g is not None)
