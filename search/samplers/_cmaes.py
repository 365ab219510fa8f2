"""CMA-ES, mergekit-evolve's algorithm, on a multi-objective study.

Optuna's CmaEsSampler optimises one value and refuses a study with several. mergekit-evolve
does the same and optimises one fitness, the mean of its tasks' scores; so does this sampler:
it hands CmaEsSampler a view of the study in which each finished trial's value is the mean of
its objectives, each oriented to be maximised (a minimised objective counts negated). The study
itself keeps every objective, so CMA-ES's trials land on the same fronts as the other samplers'.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, CmaEsSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.samplers._common import StudyView, signs
from search.spec import SamplerSpec


class _MeanFitness(StudyView):
    """The study as a single-objective CmaEsSampler reads it: one maximised value per trial, the
    mean of its oriented objectives."""

    def __init__(self, study: Study) -> None:
        super().__init__(study)
        self._signs = signs(study.directions)

    direction = StudyDirection.MAXIMIZE
    directions = [StudyDirection.MAXIMIZE]

    def _is_multi_objective(self) -> bool:
        return False

    def view(self, trial: FrozenTrial) -> FrozenTrial:
        if trial.values is None or len(trial.values) < 2:
            return trial
        out = copy.copy(trial)
        out._values = [float(sum(s * v for s, v in zip(self._signs, trial.values, strict=True)) / len(trial.values))]
        return out


class MeanCmaEsSampler(BaseSampler):
    """Optuna's CmaEsSampler on the mean of the study's objectives (module docstring)."""

    def __init__(self, *, seed: int | None, n_startup_trials: int, popsize: int | None = None) -> None:
        self.cma = CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials, popsize=popsize,
                                warn_independent_sampling=False)

    def reseed_rng(self) -> None:
        self.cma.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.cma.infer_relative_search_space(_MeanFitness(study), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.cma.sample_relative(_MeanFitness(study), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.cma.sample_independent(_MeanFitness(study), trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.cma.before_trial(_MeanFitness(study), trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.cma.after_trial(_MeanFitness(study), trial, state, values)


def make_cmaes(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> MeanCmaEsSampler:
    """CMA-ES with Optuna's default population (4 + 3 ln d) after ``n_startup_trials`` random ones."""
    return MeanCmaEsSampler(seed=seed, n_startup_trials=spec.n_startup_trials)
