"""Sparsification of task vectors, with mergekit's semantics (``mergekit/sparsify.py``).

Each function takes one delta tensor and returns it with some entries zeroed (and, where
asked, the survivors rescaled so the L1 norm is unchanged, as mergekit's ``rescale`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.kernels.rng import keep_draw
from merging.select import topk_mask


def l1(t: Tensor) -> Tensor:
    # vector_norm reduces in one pass, ~10x faster than abs().sum() on a CPU (no temporary); summed
    # in float64 so that the fused kernels' sum, in another order, gives the same float32 factor.
    return torch.linalg.vector_norm(t, 1, dtype=torch.float64)


def rescalel1(before: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale ``masked`` (in place) so its L1 norm is ``before``, as mergekit's ``rescale`` does."""
    after = l1(masked)
    if before < eps or after < eps:
        return masked
    return masked.mul_((before / after).float())


def _finish(delta: Tensor, mask: Tensor, rescale: bool, inplace: bool = False) -> Tensor:
    """``delta`` with the entries outside ``mask`` zeroed; ``inplace`` reuses ``delta``'s memory."""
    before = l1(delta) if rescale else None
    if mask.dtype != torch.bool:
        mask = mask.bool()
    masked = delta.masked_fill_(~mask, 0.0) if inplace else torch.where(mask, delta, 0.0)
    return rescalel1(before, masked) if rescale else masked


def magnitude(delta: Tensor, density: float, rescale: bool = False, inplace: bool = False) -> Tensor:
    """TIES: keep the ``int(density * numel)`` entries of largest magnitude in the whole tensor."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise MergeError(f"density {density} keeps no entry of a tensor of {delta.numel()} elements")
    # The same set as mergekit's full argsort (ties aside), for a fraction of its cost.
    return _finish(delta, topk_mask(delta.abs(), k), rescale, inplace)


def bernoulli(delta: Tensor, density: float, rescale: bool, key: int, inplace: bool = False) -> Tensor:
    """DARE: keep each entry with probability ``density``; the draw is the counter-based one of
    ``key`` (``merging.kernels.rng``), a function of the entry's position only."""
    if density >= 1:
        return delta
    mask = keep_draw(delta.shape, key, delta.device) < density
    return _finish(delta, mask, rescale, inplace)


def magnitude_outliers(delta: Tensor, density: float, gamma: float, rescale: bool = False,
                       inplace: bool = False) -> Tensor:
    """Model breadcrumbs: drop the largest ``gamma`` fraction and the smallest rest (mergekit
    0.1.5's, checked against it: where ``int(gamma * numel)`` is 0 nothing is dropped at the top)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:  # as mergekit: make room for the kept entries by dropping fewer at the top
        n_top, n_bot = n - keep, 0
    order = delta.abs().view(-1).argsort()
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[n_bot : n - n_top]] = 1
    return _finish(delta, mask, rescale, inplace)


def della_keep_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability of each entry: over each row's magnitude ranks 0..n-1, a ramp from
    ``density - epsilon`` to ``density + epsilon`` (mergekit's ``della_magprune``)."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1)
    # One argsort and its inverse permutation: the ranks mergekit's argsort().argsort() gives.
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order)).to(delta.dtype)
    span = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + (ranks / span) * (2 * epsilon)).reshape(delta.shape)


def della_magprune(
    delta: Tensor, density: float, epsilon: float, rescale: bool, key: int, inplace: bool = False,
) -> Tensor:
    """DELLA: per row, keep probability ramps with magnitude rank over density +- epsilon."""
    if density >= 1:
        return delta
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(f"della needs 0 < density - epsilon and density + epsilon < 1 (got {density}, {epsilon})")
    mask = keep_draw(delta.shape, key, delta.device) < della_keep_probability(delta, density, epsilon)
    return _finish(delta, mask, rescale, inplace)
