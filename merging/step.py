"""One tensor's merge, shared by the resident and the file paths so both give the same bits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from merging.methods import TensorInputs
from merging.plan import MergePlan


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def merge_tensor(plan: MergePlan, name: str, base: Tensor, deltas: list[Tensor],
                 stats: Sequence[Tensor | None], *, owned: bool = False) -> Tensor:
    """Merge tensor ``name`` of ``plan``: ``base`` and each expert's delta (in ``plan``'s expert
    order, on ``base``'s device), with the tensor's own generator seeded from the config's seed and
    its group's parameters. ``owned``: the deltas may be overwritten."""
    gen = torch.Generator(device=base.device).manual_seed(tensor_seed(plan.config.seed, name))
    experts, params = plan.params_for(name)
    return plan.method.merge(TensorInputs(name, base, deltas, gen, list(stats), owned=owned), experts, params)


__all__ = ["merge_tensor", "tensor_seed"]
