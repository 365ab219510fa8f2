"""mergekit's generalized task arithmetic: sparsify, weight, sign consensus, mix, scale.

The methods of this family differ only in which sparsifier and consensus they use and in
their defaults, so each of them is a few lines over this class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from merging import sparsify
from merging.methods.base import DENSITY, LAMBDA, WEIGHT, MergeMethod, Param, TensorInputs


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES' elect step: keep entries whose sign agrees with the sign of the summed deltas."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


class GeneralizedTaskArithmetic(MergeMethod):
    sparsifier: ClassVar[str | None] = None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = [LAMBDA, Param("normalize", cls.default_normalize)]
        if cls.sparsifier:
            params.append(Param("rescale", cls.default_rescale))
        cls.global_params = tuple(params) + cls.extra_global_params()
        cls.expert_params = (WEIGHT, DENSITY) if cls.sparsifier else (WEIGHT,)

    @classmethod
    def extra_global_params(cls) -> tuple[Param, ...]:
        return ()

    def sparsify(self, delta: Tensor, expert: Mapping[str, Any], params: Mapping[str, Any], gen) -> Tensor:
        if self.sparsifier is None:
            return delta
        density, rescale = expert["density"], params["rescale"]
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(delta, density, rescale)
        if self.sparsifier == "random":
            return sparsify.bernoulli(delta, density, rescale, gen)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, density, params["gamma"], rescale)
        if self.sparsifier == "della_magprune":
            return sparsify.della_magprune(delta, density, params["epsilon"], rescale, gen)
        raise AssertionError(f"unknown sparsifier {self.sparsifier}")

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        deltas = torch.stack([self.sparsify(d, e, params, t.generator) for d, e in zip(t.deltas, experts, strict=True)])
        weights = torch.tensor([e["weight"] for e in experts], dtype=deltas.dtype)
        weights = weights.view(-1, *([1] * (deltas.dim() - 1)))  # (K, 1, ..., 1)
        weighted = deltas * weights
        if self.consensus:
            mask = sign_consensus(weighted).to(deltas.dtype)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            divisor = weights.sum(dim=0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if params["normalize"]:
            mixed = mixed / divisor
        if params["lambda"] != 1:
            mixed = mixed * params["lambda"]
        return (t.base + mixed).to(t.base.dtype)
