"""Karcher mean (the Riemannian centre of mass on the unit sphere), as mergekit 0.1.5 computes it
(``merge_methods/karcher.py``).

Each model's tensor is split into its norm and its direction; the directions' weighted Karcher
mean is found by at most ``max_iter`` steps of Riemannian gradient descent (stopping when the
tangent step is shorter than ``tol``), and scaled by the mean of the norms. Every model has the
same weight, ``1 / K``; models whose tensor has norm ``<= tol`` do not pull on the direction (but
their norm still counts in the scale).

Parameters, both shared: ``max_iter`` (default 10), ``tol`` (default 1e-5). No base: mergekit
merges every model it reads, a ``base_model`` included, as one more model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import MergeMethod, Param, TensorInputs


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int, tol: float, *,
                 inplace: bool = False) -> Tensor:
    """mergekit's ``karcher_merge_tensors``, operation for operation (float32 merges give its bits).
    ``inplace``: the tensors are ours, and become the unit directions."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        if norm.item() == 0.0:
            units.append(tensor.zero_() if inplace else torch.zeros_like(tensor))
        else:
            units.append(tensor.div_(norm) if inplace and tensor.dtype == dtype else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(unit * 0 for unit in units)  # zeros of the tensors' shape
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


class Karcher(MergeMethod):
    name = "karcher"
    takes = "models"
    needs_base = False
    base_is_input = True  # a base_model is one more model to average, as in mergekit
    global_params = (Param("max_iter", 10, low=0), Param("tol", 1e-5, low=0.0))

    def resolve(self, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                expert_names: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        resolved, resolved_global = super().resolve(experts, params, expert_names)
        max_iter = resolved_global["max_iter"]
        if max_iter != int(max_iter):  # mergekit reads it as an int: 10.0 is 10, 2.5 is refused
            raise MergeError(f"parameters: 'max_iter' must be a whole number, got {max_iter!r}")
        resolved_global["max_iter"] = int(max_iter)
        return resolved, resolved_global

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        tensors = list(t.models)
        alphas = [1.0 / len(tensors)] * len(tensors)
        return karcher_mean(tensors, alphas, params["max_iter"], params["tol"], inplace=t.owned)
