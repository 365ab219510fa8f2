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
        cls.uses_rng = cls.sparsifier in ("random", "della_magprune")

    @classmethod
    def extra_global_params(cls) -> tuple[Param, ...]:
        return ()

    def sparsify(self, delta: Tensor, expert: Mapping[str, Any], params: Mapping[str, Any], gen,
                 inplace: bool = False) -> Tensor:
        if self.sparsifier is None:
            return delta
        density, rescale = expert["density"], params["rescale"]
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(delta, density, rescale, inplace)
        if self.sparsifier == "random":
            return sparsify.bernoulli(delta, density, rescale, gen, inplace)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, density, params["gamma"], rescale, inplace)
        if self.sparsifier == "della_magprune":
            return sparsify.della_magprune(delta, density, params["epsilon"], rescale, gen, inplace)
        raise AssertionError(f"unknown sparsifier {self.sparsifier}")

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        # Expert by expert, accumulating in place: no (K, ...) stacks, so memory stays near
        # the K sparsified deltas plus a few tensor-sized buffers.
        sparse = [self.sparsify(d, e, params, t.generator, t.owned) for d, e in zip(t.deltas, experts, strict=True)]
        weights = [float(e["weight"]) for e in experts]
        mixed = torch.zeros_like(t.base)
        if self.consensus:
            for w, d in zip(weights, sparse, strict=True):
                mixed.add_(d, alpha=w)
            positive = mixed >= 0  # the elected sign of each entry
            mixed.zero_()
            divisor = torch.zeros_like(t.base) if params["normalize"] else None
            for w, d in zip(weights, sparse, strict=True):
                if w == 0:
                    continue  # a zero weighted delta has sign 0 and never agrees
                agree = torch.where(positive, d > 0, d < 0) if w > 0 else torch.where(positive, d < 0, d > 0)
                mixed.add_(torch.where(agree, d, 0.0), alpha=w)
                if divisor is not None:
                    divisor.add_(agree.to(divisor.dtype), alpha=w)
            if divisor is not None:
                mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        else:
            for w, d in zip(weights, sparse, strict=True):
                mixed.add_(d, alpha=w)
            if params["normalize"]:
                total = sum(weights)
                mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        if params["lambda"] != 1:
            mixed.mul_(params["lambda"])
        return (t.base + mixed).to(t.base.dtype)
