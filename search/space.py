"""SearchSpace: the flat, fixed set of Optuna distributions a study searches, and its inverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution

from merging.config import ExpertRef, MergeConfig
from search.spec import Range, StudySpec


def _dist(r: Range) -> BaseDistribution:
    return FloatDistribution(r.low, r.high, log=r.log)


@dataclass(frozen=True)
class SearchSpace:
    spec: StudySpec

    def distributions(self) -> dict[str, BaseDistribution]:
        """``{expert}.weight`` and ``{expert}.density`` per expert; the same for the whole study."""
        space: dict[str, BaseDistribution] = {}
        for e in self.spec.experts:
            space[f"{e.name}.weight"] = _dist(self.spec.search_space.weight)
            if self.spec.search_space.density is not None:
                space[f"{e.name}.density"] = _dist(self.spec.search_space.density)
        return space

    def merge_config(self, params: dict[str, Any]) -> MergeConfig:
        experts = []
        for e in self.spec.experts:
            expert_params = {
                key.split(".", 1)[1]: value for key, value in params.items() if key.split(".", 1)[0] == e.name
            }
            experts.append(ExpertRef(name=e.name, path=e.path, params=expert_params, calibration=e.calibration))
        return MergeConfig(method=self.spec.method, base=self.spec.base, experts=tuple(experts),
                           params=dict(self.spec.method_params), seed=self.spec.seed)
