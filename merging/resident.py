"""The resident Merger: base and expert deltas held in memory, merged into a live model in place.

This is what a worker uses for trials: no disk, no new model per trial. Deltas are computed
once when the experts are loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from merging.config import MergeConfig
from merging.errors import MergeError
from merging.io import load_state_dict
from merging.methods import TensorInputs
from merging.plan import MergePlan


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def compute_deltas(
    base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]], dtype: torch.dtype = torch.float32
) -> dict[str, list[Tensor]]:
    """Per tensor, each expert's ``W_k - W_base``; errors name the expert and tensor at fault."""
    for expert, state in experts.items():
        missing = sorted(set(base) - set(state))
        extra = sorted(set(state) - set(base))
        if missing or extra:
            raise MergeError(
                f"model '{expert}': tensors differ from the base (missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for name, tensor in base.items():
            if state[name].shape != tensor.shape:
                raise MergeError(
                    f"model '{expert}': tensor '{name}' has shape {tuple(state[name].shape)}, "
                    f"the base has {tuple(tensor.shape)}"
                )
    return {name: [experts[e][name].to(dtype) - b.to(dtype) for e in experts] for name, b in base.items()}


class Merger:
    """Holds a base and K expert deltas; ``apply`` writes a merge into a model's parameters."""

    def __init__(self, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                 dtype: torch.dtype = torch.float32,
                 stats: Mapping[str, Mapping[str, Tensor]] | None = None, device: str | torch.device = "cpu") -> None:
        if not experts:
            raise MergeError("a merge needs at least one expert")
        self.device = torch.device(device)
        self.expert_names = list(experts)
        self.base = {k: v.to(self.device, dtype) for k, v in base.items()}
        self.deltas = compute_deltas(self.base, {e: {k: v.to(self.device) for k, v in sd.items()}
                                                 for e, sd in experts.items()}, dtype)
        self.stats = {name: {k: v.to(self.device) for k, v in (stats or {}).get(name, {}).items()}
                      for name in self.expert_names}

    @classmethod
    def from_checkpoints(cls, base_dir: str, expert_dirs: Mapping[str, str],
                         stats: Mapping[str, Mapping[str, Tensor]] | None = None,
                         device: str | torch.device = "cpu") -> Merger:
        return cls(load_state_dict(base_dir), {name: load_state_dict(p) for name, p in expert_dirs.items()},
                   stats=stats, device=device)

    def merged_tensors(self, config: MergeConfig):
        """Yield (name, merged tensor) for every tensor of the base."""
        names = [e.name for e in config.experts]
        if names != self.expert_names:
            raise MergeError(f"merge config names experts {names}, the merger holds {self.expert_names}")
        plan = MergePlan(config)
        for name, base in self.base.items():
            gen = torch.Generator(device=self.device).manual_seed(tensor_seed(config.seed, name))
            stats = [self.stats[e].get(name) for e in names]
            experts, params = plan.params_for(name)
            yield name, plan.method.merge(TensorInputs(name, base, self.deltas[name], gen, stats), experts, params)

    def apply(self, model: nn.Module, config: MergeConfig) -> None:
        """Write the merge of ``config`` into ``model``'s parameters in place."""
        targets = dict(model.state_dict(keep_vars=True))
        missing = sorted(set(self.base) - set(targets))
        if missing:
            raise MergeError(f"the live model has no tensor(s) {missing[:5]}")
        with torch.no_grad():
            for name, merged in self.merged_tensors(config):
                targets[name].data.copy_(merged)

    def sparsity_l1(self, model: nn.Module) -> float:
        """MM-MO's sparsity objective: ``sum |theta_merged - theta_base|`` over the merged tensors."""
        state = model.state_dict()
        with torch.no_grad():
            return float(sum((state[n].to(b.dtype) - b).abs().sum() for n, b in self.base.items()))


def expert_dirs(config: MergeConfig) -> dict[str, str]:
    return {e.name: e.path for e in config.experts}


__all__ = ["Merger", "compute_deltas", "expert_dirs", "tensor_seed"]
