"""The server's handle on Optuna: create a study, ask for a trial, tell its result.

Only the server calls this (workers never touch Optuna). Samplers carry RNG state between
asks, so one ``optuna.Study`` object per study is kept for the life of the process; after a
restart the sampler is re-seeded from the spec's seed and the number of trials so far, so a
restarted server does not replay the proposals it already made.
"""

from __future__ import annotations

import threading
import warnings
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

from search.samplers import make_sampler
from search.samplers._nsga2 import GENERATION_KEY
from search.space import SearchSpace
from search.spec import StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=True)


class OptunaStudies:
    def __init__(self, storage_url: str) -> None:
        self.storage = optuna_storage(storage_url)
        self._open: dict[str, optuna.Study] = {}
        self._lock = threading.Lock()

    def create(self, name: str, spec: StudySpec) -> None:
        """A new Optuna study, its values named by the objectives' keys: Optuna's own tools
        (optuna-dashboard on our database) then show them by name."""
        study = optuna.create_study(storage=self.storage, study_name=name,
                                    directions=[o.direction for o in spec.objectives])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.key for o in spec.objectives])

    def delete(self, name: str) -> None:
        with self._lock:
            self._open.pop(name, None)
            optuna.delete_study(study_name=name, storage=self.storage)

    def _study(self, name: str, spec: StudySpec) -> optuna.Study:
        study = self._open.get(name)
        if study is None:
            existing = len(optuna.load_study(study_name=name, storage=self.storage).get_trials(deepcopy=False))
            sampler = make_sampler(spec.sampler, seed=(spec.seed + 7919 * existing) % 2**32,
                                   reference=spec.reference())
            study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
            self._open[name] = study
        return study

    def ask(self, name: str, spec: StudySpec) -> tuple[int, dict[str, Any]]:
        with self._lock:
            trial = self._study(name, spec).ask(SearchSpace(spec).distributions())
            return trial.number, dict(trial.params)

    def _finished(self, study: optuna.Study, number: int) -> bool:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        return self.storage.get_trial(trial_id).state.is_finished()

    def tell(self, name: str, spec: StudySpec, number: int, values: list[float],
             constraints: dict[str, float] | None = None) -> None:
        """Record a result (and its constraint violations, <= 0 feasible); idempotent."""
        with self._lock:
            study = self._study(name, spec)
            if self._finished(study, number):
                return
            if constraints:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
                trial = optuna.trial.Trial(study, trial_id)
                for key, violation in constraints.items():
                    trial.set_constraint(key, violation)
            study.tell(number, values)

    def add_evaluated(self, name: str, spec: StudySpec, params: dict[str, Any], values: list[float],
                      constraints: dict[str, float] | None = None) -> int:
        """Add a trial evaluated elsewhere (warm start); NSGA-II sees it as a parent of generation 0."""
        dists = SearchSpace(spec).distributions()
        system_attrs: dict[str, Any] = {GENERATION_KEY: 0}
        system_attrs |= {f"constraints:{k}": v for k, v in (constraints or {}).items()}
        trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                          values=values, system_attrs=system_attrs)
        with self._lock:
            study = self._study(name, spec)
            study.add_trial(trial)
            return study.get_trials(deepcopy=False)[-1].number  # callers hold the server's queue lock

    def running_since(self, name: str, spec: StudySpec) -> dict[int, datetime]:
        """Trials Optuna holds as RUNNING, with their start times."""
        with self._lock:
            study = self._study(name, spec)
            return {t.number: t.datetime_start for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}

    def fail(self, name: str, spec: StudySpec, number: int) -> None:
        with self._lock:
            study = self._study(name, spec)
            if not self._finished(study, number):
                study.tell(number, state=TrialState.FAIL)
