"""NuSLERP: spherical interpolation between two models, weighted, optionally row by row, as
mergekit 0.1.5 computes it (``merge_methods/nuslerp.py``).

The two models' weights give ``t = weight_2 / (weight_1 + weight_2)`` (0.5 where the weights sum
to less than 1e-6 in magnitude). With a ``base_model`` the two task vectors ``model - base`` are
interpolated and added to the base; without one, the models themselves (see :class:`NuSlerp` for
what mmmo supports). ``nuslerp_flatten`` (default true) treats each tensor as one vector;
``false`` interpolates each row (``nuslerp_row_wise: false``, the last dimension) or each column
(``nuslerp_row_wise: true``: mergekit then takes vectors along dimension 0) on its own.
Collinear vectors (``1 - cos^2 <= 1e-16``) are interpolated linearly. mergekit computes in the
inputs' dtype (bfloat16 for bfloat16 checkpoints unless ``dtype: float32``), mmmo in float32.

Parameters: ``weight`` per model (required); ``nuslerp_row_wise`` (false) and ``nuslerp_flatten``
(true), shared. Shape: exactly two models besides the base (``InputContract(base=OPTIONAL,
min_non_base=2, max_non_base=2)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.methods.base import WEIGHT, MergeMethod, Param, TensorInputs
from merging.methods.slerp import check_inputs


def nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False) -> Tensor:
    """mergekit's ``nuslerp`` kernel, operation for operation."""
    out_shape = v0.shape

    def _normalize(x: Tensor, eps: float = 1e-7) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def interpolation_t(weights: Sequence[float]) -> float:
    """mergekit's ``t`` from the two models' weights (in Python floats, as it takes them)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class NuSlerp(MergeMethod):
    """NuSLERP of two models' task vectors from the ``base_model``.

    Without a ``base_model`` mergekit merges the models themselves: the config's first model is
    then only the layout (``MergeConfig.base_input`` false) and the kernel gets no base.
    """

    name = "nuslerp"
    takes = "models"
    needs_base = False
    base_optional = True
    expert_params = (WEIGHT,)
    global_params = (Param("nuslerp_row_wise", False), Param("nuslerp_flatten", True))

    def resolve(self, experts, params, expert_names):
        resolved = super().resolve(experts, params, expert_names)
        check_inputs(self.name, expert_names, low=2, high=2, inputs="non-base inputs", offset=0)
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        return nuslerp_models(t.models, [float(e["weight"]) for e in experts], t.base if t.has_base else None,
                              row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])


def nuslerp_models(models: Sequence[Tensor], weights: Sequence[float], base: Tensor | None, *, row_wise: bool,
                   flatten: bool) -> Tensor:
    """mergekit's ``nuslerp_merge_method`` on two models' tensors, with or without a base."""
    t = interpolation_t(weights)
    dim = 0 if row_wise else -1
    if base is not None:
        return base + nuslerp(t, models[0] - base, models[1] - base, dim=dim, flatten=flatten)
    return nuslerp(t, models[0], models[1], dim=dim, flatten=flatten)
