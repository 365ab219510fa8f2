"""SLERP: spherical linear interpolation between the base and one other model, as mergekit 0.1.5
computes it (``merge_methods/slerp.py``).

Each tensor is one vector (flattened): ``t = 0`` gives the ``base_model``, ``t = 1`` the other
model, and in between the point on the great circle through both at angle ``t * theta`` (scaled
along, so that collinear or antipodal tensors, whose angle is within ``dot_threshold`` of 0 or
pi, are interpolated linearly instead). mergekit computes in float32 whatever the inputs' dtype
(float64 for float64 inputs) and rounds once into it, so float32 and bfloat16 merges both give
its bits.

Parameters: ``t``, shared (mergekit's ``BatchParameter``), required, any float (outside [0, 1]
extrapolates). Shape: a ``base_model`` and exactly one other model (mergekit: ``InputContract(
base=REQUIRED, min_inputs=2, max_inputs=2)``); the base may also be listed among the models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import MergeMethod, Param, TensorInputs

# mergekit bounds its full-precision scratch by splitting each vector into chunks of this many
# entries; the norms and the dot product are summed chunk by chunk, so the chunking is part of the
# result's bits for tensors larger than one chunk.
_CHUNK_ELEMENTS = 1024 * 1024
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class Required(Param):
    """A parameter mergekit declares without a default: a missing one is named as such."""

    method: str = ""

    def check(self, value: Any, where: str) -> None:
        if value is None:
            raise MergeError(f"{where}: '{self.name}' is required by method '{self.method}' "
                             f"(mergekit: Missing required parameter {self.name})")
        super().check(value, where)


def check_inputs(method: str, expert_names: Sequence[str], *, low: int, high: int | None, inputs: str,
                 offset: int) -> None:
    """mergekit's input contract, in its words: ``offset`` is what mergekit counts beside our
    experts (1 where it counts the base as an input)."""
    n = len(expert_names) + offset
    expected = None
    if n < low:
        expected = f"at least {low}"
    elif high is not None and n > high:
        expected = f"exactly {low}" if low == high else f"at most {high}"
    if expected is not None:
        listed = ", ".join(f"'{e}'" for e in expert_names) or "none"
        raise MergeError(f"method '{method}': Merge method requires {expected} {inputs}; got {n} (mergekit's "
                         f"contract; the models besides the base_model: {listed})")


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> Tensor:
    """mergekit's ``slerp`` for one tensor (its batch of one output), operation for operation:
    the result in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)  # (1, N): mergekit's leading axis is the batch of outputs, one here
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype).reshape(-1, 1)  # (1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a.to(dtype) + tt * b.to(dtype)).reshape(v0.shape)
    chunks = range(0, a.shape[1], _CHUNK_ELEMENTS)

    def part(x: Tensor, start: int) -> Tensor:
        return x[:, start:start + _CHUNK_ELEMENTS].to(dtype)

    # the norms of the chunks' norms, as mergekit takes them (not the sqrt of a sum of squares)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(a, s), dim=1, keepdim=True)
                                                   for s in chunks]), dim=0)  # (1, 1)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(b, s), dim=1, keepdim=True)
                                                   for s in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((part(a, s) / norm_a) * (part(b, s) / norm_b)).sum(dim=1, keepdim=True)
                       for s in chunks]).sum(dim=0).clamp(-1, 1)  # (1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    # elementwise: mergekit's chunking here changes no bits
    return (coef_a * a.to(dtype) + coef_b * b.to(dtype)).reshape(v0.shape)


class Slerp(MergeMethod):
    """Spherical interpolation from the ``base_model`` (``t = 0``) to the one other model (``t = 1``)."""

    name = "slerp"
    takes = "models"
    global_params = (Required("t", method="slerp"),)

    def resolve(self, experts, params, expert_names):
        resolved = super().resolve(experts, params, expert_names)
        check_inputs(self.name, expert_names, low=2, high=2, inputs="inputs", offset=1)
        return resolved

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        (other,) = t.models
        return slerp(float(params["t"]), t.base, other)
