"""Exact statistics from parts: per-part moments merged with Chan's parallel formula.

A feature map's per-channel mean and variance over a whole image are sums over its
positions. Streaming computes a map tile by tile, and the tiles *own* disjoint parts of
it that together hold every position once (``geometry.ownership``), so the sums over the
owned parts add up to the sums over the map - exactly, whatever the tiling. Each part is
reduced to its count ``n``, mean and sum of squared deviations ``M2`` in float64, and
parts are merged as Chan, Golub and LeVeque (1979) show::

    n = n_a + n_b,   d = mean_b - mean_a,
    mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d**2 * n_a * n_b / n

which never forms ``E[x^2] - E[x]^2`` (that difference cancels catastrophically when the
mean is large against the spread, as it is for most activations in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one feature map per channel (or per statistic group): ``mean`` and
    ``var`` (biased, as BatchNorm normalises; float64 tensors) over ``count`` values each."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    @property
    def unbiased_var(self) -> torch.Tensor:
        """``var * count / (count - 1)``, what BatchNorm keeps as its running variance."""
        return self.var * (self.count / max(self.count - 1, 1))

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


class Moments:
    """Running count, mean and ``M2`` per group, merged part by part (float64)."""

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, values: torch.Tensor, dims: tuple[int, ...]) -> None:
        """Merge one part: ``values`` reduced over ``dims``; the dimensions left, flattened in
        order, are the groups (channels). An empty part changes nothing. The part's own
        moments come from torch's ``var_mean`` (Welford's algorithm), in float64 for float64
        values; float32 values are reduced in their own type (accumulated in double on CPU)
        and the part's results merged in float64."""
        self.include(self.summary(values, dims))

    @staticmethod
    def summary(values: torch.Tensor, dims: tuple[int, ...]) -> tuple | None:
        """What one part adds (:meth:`add`): its ``(count, mean, M2)`` per group, float64; None
        for an empty part. Small, and a function of the part's values alone, so an identical
        part (:mod:`streamcnn.dedup`) adds it again through :meth:`include`."""
        count = math.prod(values.shape[d] for d in dims)
        if count == 0 or values.numel() == 0:
            return None
        values = values.detach()
        if values.dim() == 4 and not values.is_contiguous() and \
                values.is_contiguous(memory_format=torch.channels_last):
            # two passes (the mean, then squared deviations: no cancellation either), as torch's
            # var_mean over a channels-last map's non-innermost dimensions is ~3x slower
            mean = values.sum(dims, keepdim=True) / count
            m2 = (values - mean).square().sum(dims)
            return count, mean.reshape(-1).double(), m2.reshape(-1).double()
        var, mean = torch.var_mean(values, dim=dims, correction=0)
        mean, var = mean.reshape(-1).double(), var.reshape(-1).double()
        return count, mean, var * count

    def include(self, summary: tuple | None, tile_index=None) -> None:
        """Merge a part's :meth:`summary` (``tile_index``: unused, as the part's place does not
        matter to moments; :class:`reductions.Accumulator` takes the same call)."""
        if summary is not None:
            self.merge(*summary)

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan's formula (module docstring): add a part of ``count`` values per group."""
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2 + delta.square() * (self.count * count / total)
        self.count = total

    def absorb(self, other: "Moments") -> None:
        """Merge another accumulator (e.g. the same map's moments from another image)."""
        if other.mean is not None:
            self.merge(other.count, other.mean, other.m2)

    def stats(self) -> ChannelStats:
        if self.mean is None:
            raise ValueError("no values were seen: the statistics of an empty map are undefined")
        return ChannelStats(self.mean.clone(), self.m2 / self.count, self.count)


def all_but_channels(dims: tuple) -> tuple[int, ...]:
    """The dimensions to reduce for per-channel statistics (``dims``: each one's role)."""
    return tuple(k for k, role in enumerate(dims) if role != "C")
