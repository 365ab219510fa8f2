"""SearchSpace: the flat, fixed set of Optuna distributions a study searches, and its inverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from merging.config import ExpertRef, Grouping, MergeConfig
from merging.randomness import SEEDED_METHODS
from search.spec import Range, StudySpec


def _dist(r: Range) -> BaseDistribution:
    return FloatDistribution(r.low, r.high, log=r.log)


@dataclass(frozen=True)
class SearchSpace:
    """Parameter names: ``{expert}.{param}``, ``{expert}.{param}@{group}`` with layer groups or
    filters (one set per group), and ``method.{param}`` for searched global merge parameters."""

    spec: StudySpec

    def grouping(self) -> Grouping | None:
        ss = self.spec.search_space
        if not ss.layer_groups and not ss.filters:
            return None
        return Grouping(ss.layer_groups, ss.num_layers, tuple(ss.filters))

    def distributions(self) -> dict[str, BaseDistribution]:
        ss = self.spec.search_space
        grouping = self.grouping()
        suffixes = [f"@{g}" for g in grouping.groups()] if grouping else [""]
        space: dict[str, BaseDistribution] = {}
        for e in self.spec.experts:
            for suffix in suffixes:
                space[f"{e.name}.weight{suffix}"] = _dist(ss.weight)
                if ss.density is not None:
                    space[f"{e.name}.density{suffix}"] = _dist(ss.density)
        for key, choices in ss.method_choices.items():
            space[f"method.{key}"] = CategoricalDistribution(choices)
        return space

    def merge_config(self, params: dict[str, Any]) -> MergeConfig:
        flat: dict[str, dict[str, Any]] = {e.name: {} for e in self.spec.experts}
        grouped: dict[str, dict[str, dict[str, Any]]] = {e.name: {} for e in self.spec.experts}
        global_params = dict(self.spec.method_params)
        for key, value in params.items():
            name, _, group = key.partition("@")
            owner, param = name.rsplit(".", 1)
            if owner == "method" and not group:
                global_params[param] = value
            elif group:
                grouped[owner].setdefault(group, {})[param] = value
            else:
                flat[owner][param] = value
        experts = tuple(ExpertRef(name=e.name, path=e.path, params=flat[e.name], calibration=e.calibration,
                                  group_params=grouped[e.name]) for e in self.spec.experts)
        # The seed is part of a merge only where the method draws random masks: a TIES merge of
        # a study seeded 7 is the same model (and the same cache entry) as one seeded 0.
        seed = self.spec.seed if self.spec.method in SEEDED_METHODS else 0
        return MergeConfig(method=self.spec.method, base=self.spec.base, experts=experts, params=global_params,
                           seed=seed, grouping=self.grouping(), dtype=self.spec.dtype,
                           allow_unrelated=self.spec.allow_unrelated)
