"""OBIM: Optimal Brain Iterative Merging (Wang et al., 2025, arXiv 2502.12217) — our reading.

The paper's code is not public; this follows ``shared/notes/obim.md``:

* OBM saliency of a delta entry: ``s_ij = d_ij^2 * sum_t x_tj^2`` (diagonal of the layer-wise
  Hessian over the expert's own calibration inputs); ``d^2`` where no statistics apply
  (embeddings, norms, experts without calibration data).
* Each expert keeps the top ``density`` fraction of its saliency (per tensor, or per row).
* IM: experts are merged one after another through mutually exclusive masks — a position
  taken by an earlier expert is never written again, nothing is averaged, no rescale:
  ``W = W_base + sum_k weight_k * M_k * d_k`` with ``M_k = top_k AND NOT (M_1 | ... | M_{k-1})``.
* Order: as listed, or by total kept saliency, largest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.methods.base import DENSITY, MergeMethod, Param, TensorInputs
from merging.select import row_topk_mask, topk_mask


def obm_saliency(delta: Tensor, energy: Tensor | None) -> Tensor:
    """``d^2 * energy`` broadcast over rows when ``energy`` matches the input dimension, else ``d^2``."""
    s = delta.pow(2)
    if energy is not None and delta.dim() == 2 and energy.shape == (delta.shape[1],):
        s = s * energy.to(s.dtype).unsqueeze(0)  # (out, in) * (1, in)
    return s


def top_fraction_mask(scores: Tensor, density: float, per_row: bool) -> Tensor:
    """Boolean mask of the ``int(density * n)`` largest scores (over the tensor, or each row); ties
    at the threshold by position."""
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    if not (per_row and scores.dim() >= 2):
        return topk_mask(scores, int(density * scores.numel()))
    rows = scores.reshape(scores.shape[0], -1)
    return row_topk_mask(rows, int(density * rows.shape[1])).reshape(scores.shape)


class Obim(MergeMethod):
    name = "obim"
    expert_params = (Param("weight", 1.0), DENSITY)
    global_params = (
        Param("order", "listed", choices=("listed", "saliency")),
        Param("granularity", "tensor", choices=("tensor", "row")),
    )

    def masks(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]],
              params: Mapping[str, Any]) -> list[tuple[int, Tensor]]:
        """``[(expert index, exclusive mask)]`` in merge order."""
        stats = t.stats or [None] * len(t.deltas)
        per_row = params["granularity"] == "row"
        scored = []
        for i, (d, e) in enumerate(zip(t.deltas, experts, strict=True)):
            s = obm_saliency(d, stats[i])
            keep = top_fraction_mask(s, e["density"], per_row)
            scored.append((i, keep, float(s.double()[keep].sum())))
        if params["order"] == "saliency":
            scored.sort(key=lambda item: -item[2])
        taken = torch.zeros_like(t.base, dtype=torch.bool)
        out = []
        for i, keep, _mass in scored:
            exclusive = keep & ~taken
            taken |= exclusive
            out.append((i, exclusive))
        return out

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        merged = t.base.clone()
        for i, mask in self.masks(t, experts, params):
            merged += experts[i]["weight"] * t.deltas[i] * mask
        return merged
