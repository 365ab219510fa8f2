"""One tensor's merge, shared by the resident and the file paths so both give the same bits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from merging.kernels.fused import Kernels, fusable, fused_merge
from merging.kernels.rng import tensor_key
from merging.methods import TensorInputs
from merging.plan import MergePlan

tensor_seed = tensor_key  # the seed of a tensor's generator and the key of its counter-based draws


def expert_inputs(plan: MergePlan, base32: Tensor, experts: Iterable[Tensor], *,
                  fresh: bool = False) -> list[Tensor]:
    """What the method takes of each expert's tensor, as float32 tensors it may overwrite:
    ``expert - base`` (exactly ``e.float() - base32``), or the expert's own tensor. ``fresh``: the
    experts' tensors are temporaries (read for this merge), so float32 ones are reused in place;
    held tensors are never written. Taken one expert at a time, so at most one extra buffer lives."""
    models = plan.method.takes == "models"
    out = []
    for e in experts:
        if fresh and e.dtype == torch.float32:
            out.append(e if models else e.sub_(base32))
        else:  # type promotion: one new float32 result, no rounding to the inputs' dtype
            out.append(e.to(torch.float32, copy=True) if models else torch.sub(e, base32))
    return out


def merge_tensor(plan: MergePlan, name: str, base: Tensor, inputs: list[Tensor],
                 stats: Sequence[Tensor | None], *, owned: bool = False,
                 thresholds: Sequence[float | None] | None = None) -> Tensor:
    """Merge tensor ``name`` of ``plan`` by the method's plain torch code (the reference): ``base``
    and each expert's input (``expert_inputs``: a delta or the expert's tensor, in ``plan``'s
    expert order, on ``base``'s device), with the tensor's own generator and key from the config's
    seed and its group's parameters. ``owned``: the inputs may be overwritten. ``thresholds``: per
    expert, its saliency threshold over all tensors (OBIM's global scope, ``merging.budget``)."""
    seed = tensor_seed(plan.config.seed, name)
    gen = torch.Generator(device=base.device).manual_seed(seed)
    experts, params = plan.params_for(name)
    models = plan.method.takes == "models"
    t = TensorInputs(name, base, [] if models else inputs, gen, list(stats), owned=owned,
                     models=inputs if models else None, has_base=plan.config.base_input, key=seed,
                     thresholds=None if thresholds is None else list(thresholds))
    return plan.method.merge(t, experts, params)


def merge_one(plan: MergePlan, name: str, base: Tensor, experts: Sequence[Tensor], stats: Sequence[Tensor | None],
              out_dtype: torch.dtype, kernels: Kernels | None, *, fresh: bool = False,
              out: Tensor | None = None, thresholds: Sequence[float | None] | None = None) -> Tensor:
    """Tensor ``name`` merged from the base's and the experts' tensors as held (any dtype, on one
    device), returned in ``out_dtype``: by the fused kernels where the method has them and the
    tensor is floating and large enough (``Kernels.fuses``; the same bits as the reference, see
    ``merging.kernels``), else by ``merge_tensor``. ``fresh``: the experts' tensors are this merge's
    to overwrite. ``out``: where to write the result (contiguous, ``out_dtype``, the base's shape and
    device), e.g. a live parameter. ``thresholds``: as ``merge_tensor``'s."""
    if (kernels is not None and kernels.fuses(base.numel()) and fusable(plan.method) and base.is_floating_point()
            and all(e.is_floating_point() for e in experts)):
        params_k, params = plan.params_for(name)
        return fused_merge(kernels, plan.method, tensor_seed(plan.config.seed, name), base, experts, stats,
                           params_k, params, out_dtype, out, thresholds)
    b32 = base.to(torch.float32, copy=True)
    inputs = expert_inputs(plan, b32, experts, fresh=fresh)
    merged = merge_tensor(plan, name, b32, inputs, stats, owned=True, thresholds=thresholds)
    return merged.to(out_dtype) if out is None else out.copy_(merged)


__all__ = ["expert_inputs", "merge_one", "merge_tensor", "tensor_seed"]
