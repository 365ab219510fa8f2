"""SearchSpace: the flat, fixed set of Optuna distributions a study searches, and its inverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from merging.config import ExpertRef, Grouping, MergeConfig
from merging.mergekit_yaml import _grouped_setting
from merging.randomness import SEEDED_METHODS
from search.spec import Range, StudySpec

METHOD = "method"  # the searched method's parameter (experts may not be named so)


def method_parameters(name: str) -> tuple[set[str], set[str]]:
    """The per-model and the global parameters merge method ``name`` takes."""
    from merging.methods import get_method  # torch: when a study searches among methods

    method = get_method(name)
    return {p.name for p in method.expert_params}, {p.name for p in method.global_params}


def _dist(r: Range) -> BaseDistribution:
    return FloatDistribution(r.low, r.high, log=r.log)


@dataclass(frozen=True)
class SearchSpace:
    """Parameter names: ``{expert}.{param}``, ``{expert}.{param}@{group}`` with layer groups or
    filters (one set per group), ``method.{param}`` for searched global merge parameters, and
    ``method.{param}@{group}`` for a global parameter searched per group (``method_params``).

    A global parameter has one value per tensor, which a MergeConfig holds as the parameter's
    mergekit setting in ``MergeConfig.params``: ``filter`` entries with per-layer gradients that
    give every layer exactly its group's value (:func:`merging.mergekit_yaml._grouped_setting`), so
    the trial's merge and its mergekit export are the same settings. mergekit evaluates the tensors
    outside the layers (embeddings, final norm, lm_head) at layer 0's position, and a filter entry
    cannot tell them from layer 0's tensors without their names; so with layer groups they form
    one group, ``rest/other`` (``rest/all`` without filters), and one outside the layers whose name
    contains a filter takes that filter's value in the first layer group.
    """

    spec: StudySpec

    def grouping(self) -> Grouping | None:
        ss = self.spec.search_space
        if not ss.layer_groups and not ss.filters:
            return None
        return Grouping(ss.layer_groups, ss.num_layers, tuple(ss.filters))

    def method_groups(self) -> list[str]:
        """The groups a searched global parameter has one dimension for ("" without groups)."""
        grouping = self.grouping()
        if grouping is None:
            return [""]
        outside = {f"rest/{f}" for f in grouping.filters} if grouping.layered else set()
        return [g for g in grouping.groups() if g not in outside]

    def distributions(self) -> dict[str, BaseDistribution]:
        ss = self.spec.search_space
        grouping = self.grouping()
        suffixes = [f"@{g}" for g in grouping.groups()] if grouping else [""]
        space: dict[str, BaseDistribution] = {}
        for e in self.spec.experts:
            for suffix in suffixes:
                if ss.weight is not None:
                    space[f"{e.name}.weight{suffix}"] = _dist(ss.weight)
                if ss.density is not None:
                    space[f"{e.name}.density{suffix}"] = _dist(ss.density)
        for key, r in ss.method_params.items():
            for group in self.method_groups():
                space[f"method.{key}@{group}" if group else f"method.{key}"] = _dist(r)
        for key, choices in ss.method_choices.items():
            space[f"method.{key}"] = CategoricalDistribution(choices)
        if len(self.spec.methods) > 1:
            space[METHOD] = CategoricalDistribution(self.spec.methods)
        return space

    def merge_config(self, params: dict[str, Any]) -> MergeConfig:
        """The merge of a trial's parameters. Searching among several methods, the trial's ``method``
        takes the parameters it knows (its own, conditional on it) and leaves the others."""
        method = params.get(METHOD, self.spec.methods[0])
        per_model, shared = method_parameters(method) if len(self.spec.methods) > 1 else (None, None)
        flat: dict[str, dict[str, Any]] = {e.name: {} for e in self.spec.experts}
        grouped: dict[str, dict[str, dict[str, Any]]] = {e.name: {} for e in self.spec.experts}
        global_params = {k: v for k, v in self.spec.method_params.items() if shared is None or k in shared}
        per_group: dict[str, dict[str, Any]] = {}  # searched global parameter -> group -> value
        for key, value in params.items():
            if key == METHOD:
                continue
            name, _, group = key.partition("@")
            owner, param = name.rsplit(".", 1)
            if shared is not None and param not in (shared if owner == "method" else per_model):
                continue  # another method's parameter
            if owner == "method":
                if group:
                    per_group.setdefault(param, {})[group] = value
                else:
                    global_params[param] = value
            elif group:
                grouped[owner].setdefault(group, {})[param] = value
            else:
                flat[owner][param] = value
        grouping = self.grouping()
        for param, values in per_group.items():
            assert grouping is not None, f"'method.{param}@...' without layer groups or filters"
            global_params[param] = _grouped_setting(values, grouping).raw()
        experts = tuple(ExpertRef(name=e.name, path=e.path, params=flat[e.name], calibration=e.calibration,
                                  group_params=grouped[e.name]) for e in self.spec.experts)
        # The seed is part of a merge only where the method draws random masks: a TIES merge of
        # a study seeded 7 is the same model (and the same cache entry) as one seeded 0.
        seed = self.spec.seed if method in SEEDED_METHODS else 0
        return MergeConfig(method=method, base=self.spec.base, experts=experts, params=global_params,
                           seed=seed, grouping=grouping, dtype=self.spec.dtype,
                           allow_unrelated=self.spec.allow_unrelated, tokenizer=self.spec.tokenizer,
                           calibration=self.spec.calibration)
