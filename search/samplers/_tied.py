"""A structure prior across layer groups: search the tied space first.

With layer groups and filters each expert's weight and density become one parameter per group
(``add.weight@L0-1/mlp``, ``add.weight@L2-3/mlp``, ...): 4 experts x 9 groups x 2 parameters is
72 dimensions, where the per-expert values (8 here) carry most of what a merge is worth and
the per-group deviations refine it. A model-based search that starts in all 72 spends its first
trials learning that. ``TiedSpace`` folds every grouped parameter into one value per owner and
parameter (``add.weight``), so a sampler can propose in the small space and have its proposal
broadcast to every group; ``TiedStudy`` shows that sampler the study's trials folded the same
way (each tied value the mean of its groups' values).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial

from search.samplers._common import StudyView


class TiedSpace:
    """The grouped parameters of ``space`` (``{name}@{group}`` floats sharing one distribution per
    ``name``) as one parameter each; every other parameter as it is."""

    def __init__(self, space: dict[str, BaseDistribution]) -> None:
        members: dict[str, list[str]] = {}
        for key, dist in space.items():
            name, sep, _ = key.partition("@")
            if sep and isinstance(dist, FloatDistribution):
                members.setdefault(name, []).append(key)
        # a name whose groups differ in range stays untied
        self.members = {name: keys for name, keys in members.items()
                        if len({repr(space[k]) for k in keys}) == 1 and name not in space}
        self.tied = {k for keys in self.members.values() for k in keys}
        self.space = {key: dist for key, dist in space.items() if key not in self.tied}
        self.space |= {name: space[keys[0]] for name, keys in self.members.items()}

    def __bool__(self) -> bool:
        return bool(self.members)

    def fold(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's parameters in the tied space: each tied value the mean of its groups' (a name
        some of whose groups are missing is left out)."""
        out = {k: v for k, v in params.items() if k not in self.tied}
        for name, keys in self.members.items():
            if all(k in params for k in keys):
                dist = self.space[name]
                out[name] = min(dist.high, max(dist.low, statistics.fmean(params[k] for k in keys)))
        return out

    def broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        """A tied proposal in the full space: every group takes its name's value."""
        out = {k: v for k, v in params.items() if k not in self.members}
        for name, keys in self.members.items():
            if name in params:
                out |= dict.fromkeys(keys, params[name])
        return out


class TiedStudy(StudyView):
    """The study as a sampler of the tied space reads it."""

    def __init__(self, study: Study, tied: TiedSpace) -> None:
        super().__init__(study)
        self._tied = tied

    def view(self, trial: FrozenTrial) -> FrozenTrial:
        out = copy.copy(trial)
        out._params = self._tied.fold(trial.params)
        out._distributions = {k: self._tied.space.get(k) or trial.distributions[k] for k in out._params}
        return out
