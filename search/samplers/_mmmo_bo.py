"""The MM-MO paper's proposer on Optuna (Li et al., "It's Morphing Time", arXiv 2407.00487).

1. A multi-objective Bayesian-optimisation proposal: Optuna's ``GPSampler`` (logEHVI).
2. Weak-to-strong: ``n_candidates`` DE/rand/1 mutants built from the ``top`` best configurations
   so far (by summed, min-max normalised objectives), each crossed with the proposal
   (binomial crossover, ``F=0.5``, ``CR=0.5`` as in the paper).
3. Screening: of the proposal and its mutants, keep the one with the smallest Fisher
   information ``sum_m 1 / var_m(x)``, i.e. the most uncertain. We share one RBF-kernel GP
   prior over the unit-scaled parameters between objectives (posterior variance does not
   depend on observed values), so the pick is the candidate of largest posterior variance.

Float and int parameters take part in the DE step (in the unit cube, log-aware); categorical
ones keep the GP's choice. Until ``n_startup_trials`` are complete, trials are random.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.samplers._common import from_unit, min_max_scale, rbf, signs, to_unit
from search.samplers._infill_gp import InfillGP
from search.spec import SamplerSpec


def de_candidate(base: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, rng: np.random.RandomState,
                 f: float = 0.5, cr: float = 0.5) -> np.ndarray:
    """DE/rand/1 mutant ``a + f (b - c)`` clipped to the unit cube, binomially crossed with ``base``."""
    mutant = np.clip(a + f * (b - c), 0.0, 1.0)
    take = rng.rand(base.size) < cr
    take[rng.randint(base.size)] = True  # at least one coordinate from the mutant
    return np.where(take, mutant, base)


def posterior_variance(x: np.ndarray, observed: np.ndarray, lengthscale: float = 0.2,
                       noise: float = 1e-4) -> np.ndarray:
    """GP posterior variance (RBF prior, unit signal variance) at rows of ``x`` given ``observed``."""
    if observed.size == 0:
        return np.ones(len(x))
    gram = rbf(observed, observed, lengthscale) + noise * np.eye(len(observed))
    cross = rbf(x, observed, lengthscale)  # (n, m)
    solved = np.linalg.solve(gram, cross.T)  # (m, n)
    return np.clip(1.0 - (cross * solved.T).sum(1), 0.0, None)


class MMMOBOSampler(BaseSampler):
    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 10, n_candidates: int = 5,
                 top: int = 5, f: float = 0.5, cr: float = 0.5, lengthscale: float = 0.2,
                 reference: Sequence[float] | None = None) -> None:
        self._gp = InfillGP(seed=seed, n_startup_trials=n_startup_trials, warn_independent_sampling=False,
                            reference=reference)
        self._random = RandomSampler(seed=seed)
        self._rng = np.random.RandomState(seed)
        self.n_startup_trials, self.n_candidates, self.top = n_startup_trials, n_candidates, top
        self.f, self.cr, self.lengthscale = f, cr, lengthscale

    def reseed_rng(self) -> None:
        self._gp.reseed_rng()
        self._random.reseed_rng()
        self._rng.seed()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._gp.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not search_space or len(complete) < self.n_startup_trials:
            return {}
        proposal = self._gp.sample_relative(study, trial, search_space)
        numeric = [k for k, d in search_space.items() if isinstance(d, (FloatDistribution, IntDistribution))]
        known = [t for t in complete if all(k in t.params for k in numeric)]
        if not numeric or len(known) < 3:
            return proposal

        def encode(params: dict[str, Any]) -> np.ndarray:
            return np.array([to_unit(search_space[k], params[k]) for k in numeric])

        best = self._best(known, study.directions)
        pool = [encode(t.params) for t in best]
        base = encode(proposal)
        candidates = [base]
        for _ in range(self.n_candidates):
            a, b, c = (pool[i] for i in self._rng.choice(len(pool), 3, replace=False))
            candidates.append(de_candidate(base, a, b, c, self._rng, self.f, self.cr))
        observed = np.stack([encode(t.params) for t in known])
        pick = candidates[int(np.argmax(posterior_variance(np.stack(candidates), observed, self.lengthscale)))]
        return proposal | {k: from_unit(search_space[k], float(u)) for k, u in zip(numeric, pick, strict=True)}

    def _best(self, trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
        """The ``top`` trials by summed min-max normalised objectives (each oriented to maximise)."""
        scaled = min_max_scale(np.array([t.values for t in trials], dtype=float) * signs(directions))
        order = np.argsort(-scaled.sum(1))
        return [trials[i] for i in order[: max(3, self.top)]]

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._gp.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._gp.after_trial(study, trial, state, values)


def make_mmmo_bo(spec: SamplerSpec, seed: int, reference: Sequence[float] | None = None) -> MMMOBOSampler:
    return MMMOBOSampler(seed=seed, n_startup_trials=spec.n_startup_trials, reference=reference)
