from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.methods.base import WEIGHT, MergeMethod, Param, TensorInputs


class Linear(MergeMethod):
    """Weighted average of the models' weights (model soup); a ``base_model`` is averaged in as
    one more model, as mergekit does."""

    name = "linear"
    takes = "models"
    needs_base = False
    base_is_input = True
    expert_params = (WEIGHT,)
    global_params = (Param("normalize", True),)

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        # As mergekit computes it: in float32 (float64 for float64 inputs) whatever the inputs' dtype,
        # accumulated expert by expert with addcmul, divided once by the weights' sum.
        dtype = torch.float64 if t.base.dtype == torch.float64 else torch.float32
        weights = torch.tensor([float(e["weight"]) for e in experts], dtype=dtype)
        mixed = torch.zeros_like(t.base, dtype=dtype)
        for expert, w in zip(t.models, weights, strict=True):
            mixed.addcmul_(expert, w)
        if params["normalize"]:
            total = weights.sum()
            # mergekit divides by a zero sum (inf/nan everywhere); here a zero sum leaves the plain sum
            mixed.div_(total if total.abs() > 1e-8 else 1)
        return mixed.to(t.base.dtype)
