"""Arcee Fusion, as mergekit 0.1.5 computes it (``merge_methods/arcee_fusion.py``): a base and
exactly one other model; the model's changes are taken where they matter most, the base kept
elsewhere.

Per entry, importance is ``|w - w_0|`` times the KL divergence of ``softmax(w)`` from
``softmax(w_0)`` along the last axis (one value per row). The threshold is an outlier fence over
the importances, ``median + 1.5 (q3 - q1)``, with mergekit's quantiles: the sorted values at
indices ``int(q * (n - 1))``. The merge is ``w_0 + (w - w_0) * (importance >= threshold)``.

No parameters. mergekit takes the quantiles of a tensor of more than 1,000,000 entries from a
sample of 1,000,000 entries drawn with replacement, with torch's global random state (so not
reproducibly); here the draw comes from the tensor's seeded generator, so a merge of such
tensors depends on the config's seed (and is reproducible with it), as DARE's does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import MergeMethod, TensorInputs

QUANTILE_SAMPLE_SIZE = 1_000_000  # mergekit's: larger tensors' quantiles come from a sample of this size


def importance(model: Tensor, base: Tensor) -> Tensor:
    """``|model - base|`` times the per-row KL divergence of the two softmaxes (mergekit's order)."""
    diff = (model - base).abs()
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl_div = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    return diff * kl_div


def approximate_quantiles(values: Tensor, q: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator, device=flat.device)]
    ordered, _ = torch.sort(flat)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    takes = "models"
    uses_rng = True  # only for tensors of more than QUANTILE_SAMPLE_SIZE entries

    def resolve(self, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                expert_names: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        resolved = super().resolve(experts, params, expert_names)
        if len(expert_names) != 1:  # mergekit: exactly two inputs, the base one of them
            raise MergeError(f"method '{self.name}' merges exactly one model into the base "
                             f"(got {len(expert_names)})")
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        (model,) = t.models
        scores = importance(model, t.base)
        q1, median, q3 = approximate_quantiles(scores, torch.tensor([0.25, 0.5, 0.75]), t.generator)
        threshold = median + 1.5 * (q3 - q1)
        mask = (scores >= threshold).float()
        del scores
        delta = model.sub_(t.base) if t.owned else model - t.base
        return t.base + delta.mul_(mask)
