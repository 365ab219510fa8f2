"""One tensor's merge, shared by the resident and the file paths so both give the same bits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from merging.methods import TensorInputs
from merging.plan import MergePlan


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


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
                 stats: Sequence[Tensor | None], *, owned: bool = False) -> Tensor:
    """Merge tensor ``name`` of ``plan``: ``base`` and each expert's input (``expert_inputs``: a
    delta or the expert's tensor, in ``plan``'s expert order, on ``base``'s device), with the
    tensor's own generator seeded from the config's seed and its group's parameters. ``owned``:
    the inputs may be overwritten."""
    gen = torch.Generator(device=base.device).manual_seed(tensor_seed(plan.config.seed, name))
    experts, params = plan.params_for(name)
    models = plan.method.takes == "models"
    t = TensorInputs(name, base, [] if models else inputs, gen, list(stats), owned=owned,
                     models=inputs if models else None, has_base=plan.config.base_input)
    return plan.method.merge(t, experts, params)


__all__ = ["expert_inputs", "merge_tensor", "tensor_seed"]
