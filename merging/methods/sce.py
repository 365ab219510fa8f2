"""SCE (Select, Calculate, Erase; Wan et al., 2024, arXiv 2408.07990), as mergekit 0.1.5 computes
it (``merge_methods/sce.py``).

On the task vectors ``d_i = w_i - w_0``:

1. Select: with ``select_topk < 1``, keep the ``int(select_topk * nonzero)`` entries where the
   task vectors vary most across models (largest variance over the models; ``nonzero`` counts the
   entries with a nonzero variance), zero the rest in every task vector.
2. Calculate: each task vector's weight is its mean square, normalised to sum to 1 over the models
   (equal weights where they all vanish).
3. Erase: TIES' sign election (the sign of ``sum_i d_i``); each entry averages, with those weights,
   the task vectors agreeing with it.

No per-model parameter (the weights are computed, not given). Shared: ``select_topk`` (default
1.0: no selection). ``int8_mask`` is declared by mergekit and changes nothing (accepted with a
warning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.methods.base import MergeMethod, Param, TensorInputs
from merging.methods.generalized import INT8_MASK


def variance_mask(tvs: Tensor, fraction: float) -> Tensor:
    """mergekit's ``sce_mask``: 1 at the ``int(fraction * nonzero)`` entries of largest variance."""
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    if k == 0:
        return torch.zeros_like(var)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[indices] = 1
    return mask


def tv_weights(tvs: Tensor) -> Tensor:
    """Each task vector's mean square, normalised to sum 1 (mergekit's ``sce_weight``)."""
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


class Sce(MergeMethod):
    name = "sce"
    global_params = (Param("select_topk", 1.0, low=0.0, high=1.0),)
    inert_params = (INT8_MASK,)

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        if not t.deltas:
            return t.base
        # mergekit's operations on its (K, ...) stack, in its order, so that float32 merges give its
        # bits (the variance and the sums over the models reduce along the stack).
        tvs = torch.stack(t.deltas, dim=0)
        if params["select_topk"] < 1:
            tvs = tvs * variance_mask(tvs, params["select_topk"]).unsqueeze(0)
        majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1  # TIES' elected sign
        agree = tvs.sign() == majority
        weights = tv_weights(tvs)
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * agree  # (K, ...): each model's weight where it agrees with the election
        merged = (tvs * erased).sum(dim=0)
        return t.base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)
