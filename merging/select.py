"""Exact top-k selection without sorting, for the large k that merges use.

``topk`` and ``argsort`` cost about a sort per tensor when k is a sizeable fraction of n. Here a
random sample brackets the k-th largest value, one pass counts what lies above the bracket and
marks what lies inside it, and ``kthvalue`` runs only on the few values inside. The result is a
``Cut``: the exact k-th largest value and, among the entries equal to it, how many (the first, by
position) are kept, so the selected set is exactly k entries and the same on every path. If the
bracket misses, ``kthvalue`` over everything is the fallback.

The pass over the tensor is the caller's (``Band``), so the fused merge kernels can count on values
they compute on the fly (``|e - b|``, OBIM's saliency) without materialising them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SMALL = 1 << 18  # up to this many entries, kthvalue over all of them is as fast
_SAMPLE = (1 << 14, 1 << 18)  # sample size bounds: n / 64 between them
_Z = 5.6  # the bracket's half-width in standard errors of the sample quantile: misses are very rare


@dataclass(frozen=True)
class Cut:
    """Keep ``v > value``, and ``v == value`` at flat positions ``< position`` (ties by position)."""

    value: Tensor  # 0-dim, the values' dtype
    position: int

    def mask(self, values: Tensor) -> Tensor:
        pos = torch.arange(values.numel(), device=values.device).view(values.shape)
        return (values > self.value) | ((values == self.value) & (pos < self.position))


# (lo, hi) -> (number of entries above hi, flat indices of the entries in [lo, hi], ascending)
Band = Callable[[Tensor, Tensor], tuple[int, Tensor]]


def cut_among(values: Tensor, index: Tensor | None, need: int) -> Cut:
    """The cut keeping the ``need`` largest of ``values`` (taken at ascending flat ``index``; None:
    ``values`` is the whole flat tensor, at positions 0..n-1)."""
    value = values.kthvalue(values.numel() - need + 1).values
    missing = need - int(torch.count_nonzero(values > value))
    tied = values == value
    ties = tied.nonzero().squeeze(1) if index is None else index[tied]
    return Cut(value, int(ties[missing - 1]) + 1)


def top_cut(values: Tensor, k: int, band: Band | None = None,
            values_at: Callable[[Tensor], Tensor] | None = None, small: int = SMALL) -> Cut:
    """The cut of the ``k`` largest (1 <= k <= numel) of ``values``, a tensor or, with ``band`` and
    ``values_at`` (the values at given flat indices), a tensor of that many entries never built."""
    n = values.numel()
    materialised = band is None
    if band is None:
        flat = values.reshape(-1)
        values_at = flat.__getitem__

        def band(lo: Tensor, hi: Tensor) -> tuple[int, Tensor]:
            above = int(torch.count_nonzero(flat > hi))  # count_nonzero: ~15x faster than a bool sum
            return above, ((flat >= lo) & (flat <= hi)).nonzero().squeeze(1)
    if n > small:
        lo, hi = bracket(values, k, values_at)
        above, inside = band(lo, hi)
        need = k - above
        if 0 < need <= inside.numel():
            return cut_among(values_at(inside), inside, need)
    # small, or the bracket missed: every value, exactly (a tensor's own, not gathered again)
    if materialised:
        return cut_among(values.reshape(-1), None, k)
    return cut_among(values_at(torch.arange(n, device=values.device)), None, k)


def bracket(values: Tensor, k: int, values_at: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Bounds that very likely hold the k-th largest of ``values``, from a fixed random sample."""
    n = values.numel()
    gen = torch.Generator(device=values.device).manual_seed(n)  # fixed: the same tensor, the same work
    m = min(max(n // 64, _SAMPLE[0]), _SAMPLE[1])
    sample = values_at(torch.randint(n, (m,), generator=gen, device=values.device))
    q = 1.0 - k / n
    margin = _Z * 0.5 / m**0.5  # q(1 - q) <= 1/4
    # order statistics of the sample (kthvalue: no sort, unlike quantile)
    lo = sample.kthvalue(min(m, max(1, int((q - margin) * m)))).values
    hi = sample.kthvalue(min(m, max(1, int((q + margin) * m) + 1))).values
    return lo, hi


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= numel)."""
    return top_cut(values, k).value


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``scores``) of its k largest entries; ties at the threshold by position."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    return top_cut(scores, k).mask(scores)


def row_topk_mask(rows: Tensor, k: int) -> Tensor:
    """Per row of a 2-D tensor, the mask of its ``k`` largest entries; ties by column."""
    if k <= 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    if k >= rows.shape[1]:
        return torch.ones_like(rows, dtype=torch.bool)
    value = rows.kthvalue(rows.shape[1] - k + 1, dim=1, keepdim=True).values
    above = rows > value
    ties = rows == value
    missing = k - above.sum(dim=1, keepdim=True)
    return above | (ties & (ties.cumsum(dim=1) <= missing))


__all__ = ["SMALL", "Band", "Cut", "bracket", "cut_among", "kth_largest", "row_topk_mask", "top_cut", "topk_mask"]
