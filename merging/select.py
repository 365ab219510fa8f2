"""Exact top-k selection by threshold, faster than ``torch.topk`` for the large k that merges use.

``topk`` on CPU costs about a sort per tensor when k is a sizeable fraction of n. Here a random
sample brackets the k-th largest value, one vectorised pass counts what lies above the bracket,
and ``kthvalue`` runs only on the few values inside it. The result is the exact k-th largest
value (and so the exact top-k set, ties broken by position); if the bracket misses, the
plain ``kthvalue`` over everything is the fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SMALL = 1 << 18
_SAMPLE = 1 << 16
_MARGIN = 0.01  # quantile half-width of the bracket: wide enough that misses are rare


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= numel)."""
    n = values.numel()
    if n <= _SMALL:
        return values.kthvalue(n - k + 1).values
    gen = torch.Generator(device=values.device).manual_seed(n)  # fixed: the same tensor, the same work
    sample = values[torch.randint(n, (_SAMPLE,), generator=gen, device=values.device)].float()
    q = 1.0 - k / n
    bounds = torch.quantile(sample, torch.tensor([max(0.0, q - _MARGIN), min(1.0, q + _MARGIN)],
                                                 device=values.device))
    lo, hi = bounds[0].to(values.dtype), bounds[1].to(values.dtype)
    above = int(torch.count_nonzero(values > hi))  # count_nonzero: ~15x faster than a bool sum
    need = k - above
    if need <= 0:
        return values.kthvalue(n - k + 1).values
    band = values[(values >= lo) & (values <= hi)]
    if need > band.numel():
        return values.kthvalue(n - k + 1).values
    return band.kthvalue(band.numel() - need + 1).values


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``scores``) of its k largest entries; ties at the threshold by position."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(scores)
    if k >= flat.numel():
        return mask.fill_(True).view_as(scores)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        mask[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    return mask.view_as(scores)
