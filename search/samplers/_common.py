"""Machinery the samplers share: the unit-cube encoding of parameters, the RBF kernel, and
objectives oriented and scaled from Optuna's study directions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.pareto import min_max_scale, sign

__all__ = ["StudyView", "encode", "from_unit", "min_max_scale", "rbf", "signs", "to_unit"]


def to_unit(dist: BaseDistribution, value: float) -> float:
    """A float or int parameter's value in [0, 1] (log-aware)."""
    lo, hi = dist.low, dist.high
    if hi == lo:
        return 0.0
    if dist.log:
        return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (value - lo) / (hi - lo)


def from_unit(dist: BaseDistribution, u: float) -> float:
    """The inverse of ``to_unit`` (``u`` clipped to [0, 1]; int parameters rounded to their step)."""
    u = min(1.0, max(0.0, u))
    lo, hi = dist.low, dist.high
    value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist.log else lo + u * (hi - lo)
    if isinstance(dist, IntDistribution):
        return int(round((value - lo) / dist.step) * dist.step + lo)
    return min(hi, max(lo, value))


def encode(dist: BaseDistribution, value: Any) -> float:
    """Any parameter in [0, 1]: numbers by ``to_unit``, a categorical by its choice's index."""
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return to_unit(dist, value)
    return dist.choices.index(value) / max(1, len(dist.choices) - 1)


def rbf(p: np.ndarray, q: np.ndarray, lengthscale: float) -> np.ndarray:
    """RBF kernel (unit signal variance) between the rows of ``p`` and of ``q``."""
    d2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * lengthscale**2))


def signs(directions: Sequence[StudyDirection]) -> np.ndarray:
    """+1 per maximised objective, -1 per minimised one: values times these are all maximised."""
    return np.array([sign("minimize" if d == StudyDirection.MINIMIZE else "maximize") for d in directions])


class StudyView:
    """A study as a wrapped Optuna sampler should read it: each trial passed through ``view``;
    storage, ids and everything else the study's own."""

    def __init__(self, study: Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def view(self, trial: FrozenTrial) -> FrozenTrial:
        raise NotImplementedError

    def _get_trials(self, deepcopy: bool = True, states: Sequence[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return [self.view(t) for t in self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)]

    def get_trials(self, deepcopy: bool = True, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()
