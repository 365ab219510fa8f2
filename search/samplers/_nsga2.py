"""NSGA-II, made to work at the budgets merge searches can afford.

Optuna's NSGA-II draws its whole first generation uniformly at random, so at 30–60 trials it
is little better than random search. Three changes, each a setting:

- *Warm-up*: the first ``warmup_trials`` trials are proposed by a model (``warmup``: Optuna's
  GPSampler, or multivariate TPE) and all tagged as NSGA-II's generation 0, so the first
  children are bred from the elite of a larger, better-than-random pool. The model's first
  ``startup_trials`` points come from a scrambled Sobol sequence, which covers the space
  more evenly than random draws.
- *Screened children*: for each later trial NSGA-II breeds ``screen`` children (its own
  selection, crossover and mutation) and a model decides what is evaluated. With the GP
  warm-up and ``model_child`` (the default) this is a surrogate-assisted NSGA-II's infill step:
  the most promising children by the GP's expected hypervolume improvement start its
  acquisition search beside the GP's own starts, and the best point found is the trial
  (``_infill_gp.py``). Otherwise a numpy GP surrogate keeps the child whose optimistic
  prediction adds most hypervolume (``_surrogate.py``), the warm-up model's proposal competing
  when ``model_child`` is set. The search stays NSGA-II's — parents, generations, elitism — but
  evaluations go where the data says they matter.
- *The study's hypervolume*: given the study's reference point, the GP aims its expected
  improvement at the hypervolume the study reports (``_infill_gp.py`` says why that matters).

With ``warmup_trials: 0`` and ``screen: 1`` this is Optuna's NSGA-II unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, NSGAIISampler, QMCSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.samplers._common import encode, from_unit, signs
from search.samplers._infill_gp import InfillGP
from search.samplers._surrogate import rank_by_improvement
from search.samplers._tied import TiedSpace, TiedStudy
from search.spec import SamplerSpec

GENERATION_KEY = "NSGAIISampler:generation"


class WarmNSGAIISampler(BaseSampler):
    def __init__(self, *, population_size: int, crossover_prob: float = 0.9, mutation_prob: float | None = None,
                 warmup_trials: int = 0, warmup: str = "gp", startup_trials: int = 5, screen: int = 1,
                 model_child: bool = False, tie_groups: bool = False, seed: int | None = None,
                 reference: Sequence[float] | None = None) -> None:
        self.nsga = NSGAIISampler(population_size=population_size, crossover_prob=crossover_prob,
                                  mutation_prob=mutation_prob, seed=seed)
        if warmup == "gp":
            self.warm: BaseSampler = InfillGP(seed=seed, n_startup_trials=startup_trials,
                                              warn_independent_sampling=False, reference=reference)
        else:
            self.warm = TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
        self.warmup_trials, self.screen, self.model_child = warmup_trials, screen, model_child
        self.tie_groups = tie_groups
        self._drawn_for: int | None = None
        self._drawn: dict[str, Any] = {}
        # the model's first trials are spread by a scrambled Sobol sequence, not drawn at random
        self.startup_trials = startup_trials
        with warnings.catch_warnings():  # experimental in name only since Optuna 3.0
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.design = QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False,
                                     warn_asynchronous_seeding=False)
        self._rng = np.random.RandomState(seed)

    def _warming(self, trial: FrozenTrial) -> bool:
        return trial.number < self.warmup_trials

    def _model(self, trial: FrozenTrial) -> BaseSampler:
        return self.design if trial.number < self.startup_trials else self.warm

    def reseed_rng(self) -> None:
        self.nsga.reseed_rng()
        self.warm.reseed_rng()
        self.design.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._warming(trial):
            return self._model(trial).infer_relative_search_space(study, trial)
        return self.nsga.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self._warming(trial):
            # Generation 0, whatever NSGA-II's own count says: the warm-up is one large generation.
            study._storage.set_trial_system_attr(trial._trial_id, GENERATION_KEY, 0)
            tied = TiedSpace(search_space) if self.tie_groups else None
            if not tied:
                return self._model(trial).sample_relative(study, trial, search_space)
            # the structure prior: per layer group values start equal, the warm-up searching the
            # per-expert values; NSGA-II's children and the GP then pull the groups apart
            return tied.broadcast(self._model(trial).sample_relative(TiedStudy(study, tied), trial, tied.space))
        child = self.nsga.sample_relative(study, trial, search_space)
        if self.screen <= 1 or not child:
            return child
        return self._screened(study, trial, search_space, child)

    def _screened(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution],
                  first: dict[str, Any]) -> dict[str, Any]:
        """The most promising of ``screen`` NSGA-II children: refined by the GP warm-up model's
        acquisition, or ranked by the numpy surrogate after a TPE warm-up."""
        names = sorted(search_space)
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None and all(n in t.params for n in names)]
        if len(done) < 5:
            return first
        children = [self._filled(first, search_space)]
        children += [self._filled(self.nsga.sample_relative(study, trial, search_space), search_space)
                     for _ in range(self.screen - 1)]
        if self.model_child and isinstance(self.warm, InfillGP):
            # infill: the GP's acquisition search starts from the most promising children too, so
            # the trial is the best of its optimum and the children refined on the model
            self.warm.candidates = children
            try:
                proposal = self.warm.sample_relative(study, trial, search_space)
            finally:
                self.warm.candidates = []
            if set(proposal) == set(search_space):
                return proposal
        elif self.model_child:  # the warm-up model's own proposal competes with the bred children
            proposal = self.warm.sample_relative(study, trial, search_space)
            if set(proposal) == set(search_space):
                children.append(proposal)

        def unit(params: dict[str, Any]) -> list[float]:
            return [encode(search_space[n], params[n]) for n in names]

        order = rank_by_improvement(np.array([unit(t.params) for t in done]),
                                    np.array([t.values for t in done]) * signs(study.directions),
                                    np.array([unit(c) for c in children]))
        return children[int(order[0])]

    def _filled(self, child: dict[str, Any], search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """NSGA-II leaves mutated parameters out (to be drawn at random later): draw them now, so
        the surrogate judges the child that will actually be evaluated."""
        out = dict(child)
        for name, dist in search_space.items():
            if name not in out:
                if isinstance(dist, CategoricalDistribution):
                    out[name] = dist.choices[self._rng.randint(len(dist.choices))]
                else:
                    out[name] = from_unit(dist, float(self._rng.rand()))
        return out

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        sampler = self._model(trial) if self._warming(trial) else self.nsga
        name, grouped, _ = param_name.partition("@")
        tied = self.tie_groups and grouped and isinstance(param_distribution, FloatDistribution)
        if not (tied and self._warming(trial)):
            return sampler.sample_independent(study, trial, param_name, param_distribution)
        # the first trial has no relative search space: its groups are tied here, one draw per name
        if self._drawn_for != trial._trial_id:
            self._drawn_for, self._drawn = trial._trial_id, {}
        if name not in self._drawn:
            self._drawn[name] = sampler.sample_independent(study, trial, param_name, param_distribution)
        return min(param_distribution.high, max(param_distribution.low, self._drawn[name]))

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.nsga.before_trial(study, trial)
        self.warm.before_trial(study, trial)
        self.design.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.nsga.after_trial(study, trial, state, values)
        self.warm.after_trial(study, trial, state, values)
        self.design.after_trial(study, trial, state, values)


def make_nsga2(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> BaseSampler:
    # Optuna 5 defaults multi-objective studies to TPE: NSGA-II must be asked for.
    warmup = 2 * spec.population_size if spec.warmup_trials is None else spec.warmup_trials
    if warmup == 0 and spec.screen <= 1:
        return NSGAIISampler(population_size=spec.population_size, crossover_prob=spec.crossover_prob,
                             mutation_prob=spec.mutation_prob, seed=seed)
    return WarmNSGAIISampler(population_size=spec.population_size, crossover_prob=spec.crossover_prob,
                             mutation_prob=spec.mutation_prob, warmup_trials=warmup, warmup=spec.warmup,
                             startup_trials=min(spec.n_startup_trials, max(warmup // 2, 1)), screen=spec.screen,
                             model_child=spec.model_child, tie_groups=spec.tie_groups, seed=seed,
                             reference=reference)
