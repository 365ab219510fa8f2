"""mergekit's generalized task arithmetic: sparsify, weight, sign consensus, mix, scale.

The methods of this family differ only in which sparsifier and consensus they use and in
their defaults, so each of them is a few lines over this class. Parameters are declared as
mergekit 0.1.5 declares them (``merge_methods/generalized_task_arithmetic.py``): ``weight``,
``density`` and the sparsifier's own (``gamma``, ``epsilon``) per model; ``normalize``,
``rescale``, ``lambda`` and ``int8_mask`` shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from merging import sparsify
from merging.errors import MergeError
from merging.kernels.rng import expert_key
from merging.methods.base import DENSITY, LAMBDA, WEIGHT, Inert, MergeMethod, Param, TensorInputs
from merging.select import topk_mask

INT8_MASK = Inert(Param("int8_mask", False), "it only changes how mergekit stores its sign masks")


class GeneralizedTaskArithmetic(MergeMethod):
    sparsifier: ClassVar[str | None] = None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: ClassVar[bool] = False
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.global_params = (LAMBDA, Param("normalize", cls.default_normalize))
        cls.expert_params = (WEIGHT,) + cls.extra_expert_params()
        cls.inert_params = (INT8_MASK,)
        if cls.sparsifier:
            cls.global_params += (Param("rescale", cls.default_rescale),)
            cls.expert_params = (WEIGHT, DENSITY) + cls.extra_expert_params()
        else:  # mergekit declares these for the whole family; without a sparsifier they do nothing
            cls.inert_params += (Inert(DENSITY, "it has no sparsification step"),
                                 Inert(Param("rescale", False), "it has no sparsification step"))
        cls.uses_rng = cls.sparsifier in ("random", "della_magprune")

    @classmethod
    def extra_expert_params(cls) -> tuple[Param, ...]:
        return ()

    def sparsify(self, delta: Tensor, expert: Mapping[str, Any], params: Mapping[str, Any], key: int,
                 inplace: bool = False) -> Tensor:
        if self.sparsifier is None:
            return delta
        density, rescale = expert["density"], params["rescale"]
        if density >= 1:
            return delta
        if density <= 0:  # mergekit's sparsifiers return zeros (DARE's draw keeps nothing either)
            return delta.zero_() if inplace else torch.zeros_like(delta)
        if self.sparsifier == "magnitude":
            if int(density * delta.numel()) < 1:  # mergekit keeps at least the largest entry
                return self._keep_largest(delta, rescale, inplace)
            return sparsify.magnitude(delta, density, rescale, inplace)
        if self.sparsifier == "random":
            return sparsify.bernoulli(delta, density, rescale, key, inplace)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, density, expert["gamma"], rescale, inplace)
        if self.sparsifier == "della_magprune":
            return sparsify.della_magprune(delta, density, expert["epsilon"], rescale, key, inplace)
        raise AssertionError(f"unknown sparsifier {self.sparsifier}")

    @staticmethod
    def _keep_largest(delta: Tensor, rescale: bool, inplace: bool) -> Tensor:
        before = sparsify.l1(delta) if rescale else None
        keep = topk_mask(delta.abs(), 1)
        masked = delta.masked_fill_(~keep, 0.0) if inplace else torch.where(keep, delta, 0.0)
        return sparsify.rescale_l1(before, masked) if rescale else masked

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        # mergekit's arithmetic, operation for operation, so that float32 merges give its bits:
        # each sparsified delta times its weight (the weight held in the tensor's dtype), then the
        # sum over experts in their order, which is how torch sums mergekit's (K, ...) stack up to
        # 4 experts. Expert by expert, in place where the deltas are ours: no (K, ...) stack, so
        # memory stays near the K deltas plus a couple of tensor-sized buffers.
        dtype = t.base.dtype
        weights = torch.tensor([float(e["weight"]) for e in experts], dtype=dtype)
        weighted = []
        for i, (d, e, w) in enumerate(zip(t.deltas, experts, weights.tolist(), strict=True)):
            s = self.sparsify(d, e, params, expert_key(t.key, i), t.owned)
            weighted.append(s.mul_(w) if t.owned or s is not d else s * w)
        mixed = torch.zeros_like(t.base)
        for wd in weighted:
            mixed.add_(wd)
        if self.consensus:
            positive = mixed >= 0  # the elected sign: that of the weighted sum
            mixed.zero_()
            divisor = torch.zeros_like(t.base)
            for w, wd in zip(weights.tolist(), weighted, strict=True):
                # mergekit's mask: sign(w * d) equal to the elected sign (a zero never agrees)
                agree = torch.where(positive, wd > 0, wd < 0)
                mixed.add_(wd.masked_fill_(~agree, 0.0))
                divisor.add_(agree.to(dtype), alpha=w)
            divisor.masked_fill_(divisor == 0, 1.0)
        else:
            total = weights.sum()
            divisor = total if total.abs() >= 1e-8 else torch.ones((), dtype=dtype)
        del weighted
        if params["normalize"]:
            mixed.div_(divisor)
        if params["lambda"] != 1:
            mixed.mul_(params["lambda"])
        return mixed.add_(t.base)  # base + mixed, without another tensor-sized buffer


def check_della_bounds(method: str, experts: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """DELLA's keep probabilities ``density +- epsilon`` must lie in (0, 1) wherever it drops anything."""
    for name, e in zip(names, experts, strict=True):
        density, epsilon = e["density"], e["epsilon"]
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            raise MergeError(f"model '{name}': method '{method}' needs 0 < density - epsilon and density + epsilon"
                             f" < 1 (got density {density}, epsilon {epsilon})")
