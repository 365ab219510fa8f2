"""NSGA-II, made to work at the budgets merge searches can afford.

Optuna's NSGA-II draws its whole first generation uniformly at random, so at 30–60 trials it
is little better than random search. Here the first ``warmup_trials`` trials are proposed by a
model (multivariate TPE) and all tagged as NSGA-II's generation 0; the first generation of
children is then bred from the elite of that larger, better-than-random pool. With
``warmup_trials: 0`` this is Optuna's NSGA-II unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.spec import SamplerSpec

GENERATION_KEY = "NSGAIISampler:generation"


class WarmNSGAIISampler(BaseSampler):
    def __init__(self, *, population_size: int, crossover_prob: float = 0.9, mutation_prob: float | None = None,
                 warmup_trials: int = 0, tpe_startup_trials: int = 4, seed: int | None = None) -> None:
        self.nsga = NSGAIISampler(population_size=population_size, crossover_prob=crossover_prob,
                                  mutation_prob=mutation_prob, seed=seed)
        self.warm = TPESampler(seed=seed, multivariate=True, n_startup_trials=tpe_startup_trials)
        self.warmup_trials = warmup_trials

    def _warming(self, trial: FrozenTrial) -> bool:
        return trial.number < self.warmup_trials

    def reseed_rng(self) -> None:
        self.nsga.reseed_rng()
        self.warm.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._warming(trial):
            return self.warm.infer_relative_search_space(study, trial)
        return self.nsga.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self._warming(trial):
            # Generation 0, whatever NSGA-II's own count says: the warm-up is one large generation.
            study._storage.set_trial_system_attr(trial._trial_id, GENERATION_KEY, 0)
            return self.warm.sample_relative(study, trial, search_space)
        return self.nsga.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        sampler = self.warm if self._warming(trial) else self.nsga
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.nsga.before_trial(study, trial)
        self.warm.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.nsga.after_trial(study, trial, state, values)
        self.warm.after_trial(study, trial, state, values)


def make_nsga2(spec: SamplerSpec, seed: int) -> BaseSampler:
    # Optuna 5 defaults multi-objective studies to TPE: NSGA-II must be asked for.
    warmup = 2 * spec.population_size if spec.warmup_trials is None else spec.warmup_trials
    if warmup == 0:
        return NSGAIISampler(population_size=spec.population_size, crossover_prob=spec.crossover_prob,
                             mutation_prob=spec.mutation_prob, seed=seed)
    return WarmNSGAIISampler(population_size=spec.population_size, crossover_prob=spec.crossover_prob,
                             mutation_prob=spec.mutation_prob, warmup_trials=warmup, seed=seed)
