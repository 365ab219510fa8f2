"""The resident Merger: base and expert deltas held in memory, merged into a live model in place.

This is what a worker uses for trials: no disk, no new model per trial. Deltas are computed
once when the experts are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from merging.checks import check_compatible
from merging.config import MergeConfig
from merging.errors import MergeError
from merging.io import StateDictReader, load_state_dict
from merging.plan import MergePlan
from merging.step import merge_tensor


class Merger:
    """Holds a base and K expert deltas; ``apply`` writes a merge into a model's parameters.

    The experts are checked against the base first (``merging.checks``): same tensors and shapes,
    and with ``check_ancestry`` (pass ``method != "linear"``) a base that is their ancestor.
    """

    def __init__(self, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                 dtype: torch.dtype = torch.float32,
                 stats: Mapping[str, Mapping[str, Tensor]] | None = None, device: str | torch.device = "cpu",
                 *, check_ancestry: bool = True) -> None:
        if not experts:
            raise MergeError("a merge needs at least one expert")
        check_compatible(StateDictReader(base), {e: StateDictReader(sd) for e, sd in experts.items()},
                         ancestry=check_ancestry)
        self.device = torch.device(device)
        self.expert_names = list(experts)
        self.base = {k: v.to(self.device, dtype) for k, v in base.items()}
        # Per tensor, each expert's ``W_k - W_base``.
        self.deltas = {name: [experts[e][name].to(self.device, dtype) - b for e in self.expert_names]
                       for name, b in self.base.items()}
        self.stats = {name: {k: v.to(self.device) for k, v in (stats or {}).get(name, {}).items()}
                      for name in self.expert_names}

    @classmethod
    def from_checkpoints(cls, base_dir: str, expert_dirs: Mapping[str, str],
                         stats: Mapping[str, Mapping[str, Tensor]] | None = None,
                         device: str | torch.device = "cpu", *, check_ancestry: bool = True) -> Merger:
        return cls(load_state_dict(base_dir), {name: load_state_dict(p) for name, p in expert_dirs.items()},
                   stats=stats, device=device, check_ancestry=check_ancestry)

    def merged_tensors(self, config: MergeConfig):
        """Yield (name, merged tensor) for every tensor of the base."""
        names = [e.name for e in config.experts]
        if names != self.expert_names:
            raise MergeError(f"merge config names experts {names}, the merger holds {self.expert_names}")
        plan = MergePlan(config)
        for name, base in self.base.items():
            yield name, merge_tensor(plan, name, base, self.deltas[name], [self.stats[e].get(name) for e in names])

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


__all__ = ["Merger", "expert_dirs"]
