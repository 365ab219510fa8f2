"""Model Stock (Jang et al., 2024, arXiv 2403.19522), as mergekit 0.1.5 computes it
(``merge_methods/model_stock.py``).

The experts' offsets from the base ``d_i = w_i - w_0`` meet at an average angle
``cos_theta`` (the mean over pairs); the merge interpolates between the experts' average and
the base with ``t = K cos_theta / (1 + (K - 1) cos_theta)``: ``t * mean(w_i) + (1 - t) * w_0``.
Where the denominator vanishes (``|1 + (K - 1) cos_theta| < 1e-6``) the base is kept.

No per-model parameter: no weight, no density. One shared option, ``filter_wise`` (default
false): one angle per row (per output filter) instead of one per tensor; a 1-D tensor is one row.
mergekit requires a base and at least two other models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import MergeMethod, Param, TensorInputs


class ModelStock(MergeMethod):
    name = "model_stock"
    takes = "models"  # mergekit averages the weights themselves and takes offsets from them
    global_params = (Param("filter_wise", False),)

    def resolve(self, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                expert_names: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        resolved = super().resolve(experts, params, expert_names)
        if len(expert_names) < 2:  # mergekit: min_inputs 3, the base included
            raise MergeError(f"method '{self.name}' needs at least two models besides the base "
                             f"(got {len(expert_names)})")
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        # mergekit's operations in its order, so that float32 merges give its bits.
        w_0, ws = t.base, list(t.models)
        out_shape = w_0.shape
        if params["filter_wise"]:
            if w_0.dim() == 1:  # one row
                w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        else:  # one angle for the whole tensor
            w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
        count = len(ws)
        average = sum(ws) / count  # before the offsets: where the inputs are ours they become the offsets
        offsets = [w.sub_(w_0) if t.owned else w - w_0 for w in ws]
        del ws
        cos_thetas = []
        for idx, offset_a in enumerate(offsets):
            for offset_b in offsets[idx + 1:]:
                norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
                cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        del offsets
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)  # (rows, 1), or (1,) for the tensor
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        ratio = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
        return (ratio * average + (1 - ratio) * w_0).reshape(out_shape)
