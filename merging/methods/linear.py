from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.methods.base import WEIGHT, MergeMethod, Param, TensorInputs


class Linear(MergeMethod):
    """Weighted average of the experts' weights (model soup); the base takes no part."""

    name = "linear"
    expert_params = (WEIGHT,)
    global_params = (Param("normalize", True),)

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        weights = torch.tensor([e["weight"] for e in experts], dtype=t.base.dtype)
        mixed = sum((t.base + d) * w for d, w in zip(t.deltas, weights, strict=True))
        if params["normalize"]:
            total = weights.sum()
            mixed = mixed / (total if total.abs() > 1e-8 else 1)
        return mixed.to(t.base.dtype)
