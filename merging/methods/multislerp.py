"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere, as mergekit
0.1.5 computes it (``merge_methods/multislerp.py``).

Each model's tensor (with a ``base_model``: its task vector ``model - base``) is flattened and
projected onto the unit sphere; their weighted mean direction is the tangent point; the weighted
tangent vectors are mapped back onto the sphere by the exponential map, scaled by the weighted
mean of the norms (and added to the base). One model alone is returned as it is. A weighted mean
of norm below ``eps`` falls back to linear interpolation for two models and is refused for more
(antipodal inputs whose weights cancel). mergekit computes in the inputs' dtype (bfloat16 for
bfloat16 checkpoints unless ``dtype: float32``), mmmo in float32.

Parameters: ``weight`` per model (required); ``normalize_weights`` (true: divided by their sum)
and ``eps`` (1e-8), shared. Shape: at least one model besides the base (``InputContract(
base=OPTIONAL, min_non_base=1)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import WEIGHT, MergeMethod, Param, TensorInputs
from merging.methods.slerp import check_inputs


def multislerp(models: Sequence[Tensor], weight: Sequence[float], base: Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """mergekit's ``multislerp`` kernel, operation for operation (the models are stacked, as there:
    the norms' reductions run over the stack's rows)."""
    if len(models) == 1:
        return models[0]
    tensors = torch.stack(list(models), dim=0)  # (K, *shape)
    if base is not None:
        tensors -= base
    tensors_flat = tensors.view(tensors.shape[0], -1)  # (K, N)
    weights = torch.tensor(list(weight), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        weights = weights / weights.sum()

    norms = torch.norm(tensors_flat, dim=-1, keepdim=True)  # (K, 1)
    unit_tensors = tensors_flat / (norms + eps)
    mean = (unit_tensors * weights.view(-1, 1)).sum(0)  # (N,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:  # mergekit falls back to linear interpolation
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            return res + base if base is not None else res
        raise MergeError("multislerp: the weighted sum of the input tensors is zero (mergekit: \"The weighted sum "
                         "of the input tensors is zero\"): antipodal tensors whose weights cancel; use different "
                         "weights")
    mean = mean / mean_norm
    dots = (unit_tensors * mean).sum(-1, keepdim=True)  # (K, 1)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    avg_norm = (norms.squeeze(-1) * weights).sum()
    result = (result * avg_norm).view(tensors.shape[1:])
    return result + base if base is not None else result


class MultiSlerp(MergeMethod):
    """Multi-SLERP of the models' task vectors from the ``base_model``.

    Without a ``base_model`` mergekit merges the models themselves: the config's first model is
    then only the layout (``MergeConfig.base_input`` false) and the kernel gets no base.
    """

    name = "multislerp"
    takes = "models"
    needs_base = False
    base_optional = True
    expert_params = (WEIGHT,)
    global_params = (Param("normalize_weights", True), Param("eps", 1e-8))

    def resolve(self, experts, params, expert_names):
        resolved = super().resolve(experts, params, expert_names)
        check_inputs(self.name, expert_names, low=1, high=None, inputs="non-base inputs", offset=0)
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        return multislerp(t.models, [float(e["weight"]) for e in experts], t.base if t.has_base else None,
                          normalize_weights=params["normalize_weights"], eps=float(params["eps"]))
