"""Optuna's GPSampler with two changes to how its acquisition (logEHVI) is optimised.

- *Candidates*: before a proposal the caller may set ``candidates`` (parameter dicts, e.g.
  NSGA-II's children). The most promising of them by the acquisition join the local searches'
  starting points, so the proposal is the best of the GP's own optimum and the candidates
  refined on the model: the infill step of a surrogate-assisted NSGA-II.
- *The study's reference point*: GPSampler measures hypervolume improvement against a point
  just beyond the worst values seen, in standardised units. That weighs objectives by their
  spread, not by what the study scores: with per-task accuracies, a task whose scores barely
  vary (0.97-1.00) would count as much per point gained as one that spans 0.5-0.9. Given
  ``reference`` (the study's hypervolume reference, in objective units), the expected
  improvement is taken against it, so the sampler optimises the hypervolume the study reports.

Optuna names ``_optimize_acqf`` as the place to change how the acquisition is optimised; the
reference point reaches the acquisition through its box decomposition. Both lean on Optuna
internals (tested against Optuna 5): if those move, the sampler logs a warning once and
searches as GPSampler does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.samplers import GPSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from search.samplers._common import signs

_logger = logging.getLogger(__name__)


class InfillGP(GPSampler):
    def __init__(self, *, reference: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidates: list[dict[str, Any]] = []
        self.reference = None if reference is None else np.asarray(reference, dtype=float)
        self._reference_loss: np.ndarray | None = None  # the reference, standardised, as a loss
        self._y_train: np.ndarray | None = None
        self._warned = False

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        self._reference_loss = self._y_train = None
        if self.reference is not None and len(self.reference) == len(study.directions):
            # the trials and the standardisation GPSampler fits on, read the same way
            done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=False)
            if done:
                sign = signs(study.directions)
                values = sign * np.array([t.values for t in done], dtype=float)
                mean, sd = values.mean(0), np.maximum(values.std(0), 1e-12)
                self._y_train = (values - mean) / sd
                self._reference_loss = -(sign * self.reference - mean) / sd
        return super().sample_relative(study, trial, search_space)

    def _optimize_acqf(self, acqf: Any, best_params: np.ndarray | None) -> np.ndarray:
        try:
            if self._reference_loss is not None:
                self._rebase(acqf)
            best_params = self._with_candidates(acqf, best_params)
        except (ImportError, AttributeError, TypeError) as exc:  # Optuna's internals moved
            if not self._warned:
                _logger.warning("InfillGP falls back to GPSampler's own acquisition search: %s", exc)
                self._warned = True
        return super()._optimize_acqf(acqf, best_params)

    def _with_candidates(self, acqf: Any, best_params: np.ndarray | None) -> np.ndarray | None:
        """The local searches' starting points, with the best candidates by the acquisition added."""
        if not self.candidates:
            return best_params
        children = acqf.search_space.get_normalized_params([None] * len(self.candidates), self.candidates)
        slots = self._n_local_search - 1 - (0 if best_params is None else len(best_params))
        if slots <= 0:
            return best_params
        top = children[np.argsort(-acqf.eval_acqf_no_grad(children))[:slots]]
        return top if best_params is None else np.vstack([best_params, top])

    def _rebase(self, acqf: Any) -> None:
        """Redo the acquisition's box decomposition against the study's reference point: once for
        logEHVI, once per Monte-Carlo fantasy of the running trials for qLogEHVI."""
        import torch  # here, not at the top: importing the samplers (the server does) stays torch-free
        from optuna._gp import acqf as module

        y = torch.from_numpy(self._y_train)
        # Optuna's decomposition assumes every observed point lies inside the reference box
        reference = np.maximum(self._reference_loss, (-self._y_train).max(0) + 1e-9)
        if isinstance(acqf, module.LogEHVI):
            lower, upper = module._get_non_dominated_box_bounds(y, reference)
            acqf._non_dominated_box_lower_bounds = lower
            acqf._non_dominated_box_intervals = (upper - lower).clamp_min_(module._EPS)
        elif isinstance(acqf, module.qLogEHVI):
            bounds = [module._get_non_dominated_box_bounds(torch.cat([y, fantasy]), reference)
                      for fantasy in acqf._cond_gpr.get_fantasy_samples()]
            pad = torch.nn.utils.rnn.pad_sequence
            acqf._baseline._non_dominated_box_lower_bounds = pad([lo for lo, _ in bounds], batch_first=True)
            acqf._baseline._non_dominated_box_intervals = pad(
                [(hi - lo).clamp_min_(module._EPS) for lo, hi in bounds], batch_first=True, padding_value=module._EPS)
