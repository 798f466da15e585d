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

    def add(self, values: torch.Tensor) -> None:
        """Merge one part: ``values`` has the groups (channels) first; every other dimension
        is reduced. An empty part changes nothing."""
        per_group = values[0].numel() if values.shape[0] else 0
        if per_group == 0:
            return
        flat = values.detach().reshape(values.shape[0], -1).double()
        mean = flat.mean(dim=1)
        m2 = (flat - mean[:, None]).square().sum(dim=1)
        self.merge(per_group, mean, m2)

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


def channels_first(value: torch.Tensor, dims: tuple) -> torch.Tensor:
    """``value`` with its channel dimension first (``dims``: each dimension's role)."""
    return value.movedim(dims.index("C"), 0)
