"""NearSwap: take the other model's value where it is near the base's, as mergekit 0.1.5 computes
it (``merge_methods/nearswap.py``).

Per entry, the other model's weight is ``clamp(t / max(|base - other|, 1e-6), 0, 1)``: entries
closer than ``t`` are swapped in whole, farther ones interpolated by ``t / distance``. mergekit
computes in the inputs' dtype (bfloat16 for bfloat16 checkpoints unless ``dtype: float32``), mmmo
in float32, rounding once.

Parameters: ``t``, shared, required (a float; ``t <= 0`` keeps the base). Shape: a
``base_model`` and exactly one other model (``InputContract(base=REQUIRED, min_inputs=2,
max_inputs=2)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from merging.methods.base import MergeMethod, TensorInputs
from merging.methods.slerp import Required, check_inputs


def nearswap(t: float, a: Tensor, b: Tensor) -> Tensor:
    """mergekit's ``nearswap_merge`` (``a`` the base, ``b`` the other model), operation for operation."""
    absdiff = (a - b).abs_()
    weight = (t / absdiff.clamp_(min=1e-6)).clamp_(min=0, max=1)
    return weight * b + (1 - weight) * a


class NearSwap(MergeMethod):
    name = "nearswap"
    takes = "models"
    global_params = (Required("t", method="nearswap"),)

    def resolve(self, experts, params, expert_names):
        resolved = super().resolve(experts, params, expert_names)
        check_inputs(self.name, expert_names, low=2, high=2, inputs="inputs", offset=1)
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        (other,) = t.models
        return nearswap(float(params["t"]), t.base, other)
