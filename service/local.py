"""``mmmo study run`` / ``resume``: a whole study in one process, no HTTP, on the same queue.

The process is its own single worker: the worker loop of ``mmmo worker`` runs over an
in-process ``LeaseSource``, so the lease rules (budget honoured after a kill, nothing counted
twice, a lost lease abandoned) are the server's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from search.spec import StudySpec
from service import auth, dispatch, results, studies
from service.lease_source import Cost, Lease, LeaseLost, Refused
from service.leases import StaleLease
from service.runner import TrialRunner
from service.services import Services
from service.specs import spec_of
from service.states import FINISHED_TRIAL, TrialOrigin, TrialState
from service.validation import SpecPolicy
from service.worker import Outcome, Worker

LOCAL_WORKER = "study-run"


class LocalLeaseSource:
    """``worker.LeaseSource`` on this process's database, for one study. It calls with no API
    token, so its leases' holder is None (``leases.held``)."""

    def __init__(self, services: Services, study_id: int) -> None:
        self.services, self.study_id = services, study_id

    def _call(self, call: Callable, *args, **kwargs):
        with self.services.sessions() as session, self.services.lock:
            try:
                return call(session, *args, **kwargs)
            except StaleLease as exc:
                raise LeaseLost(str(exc)) from exc
            except results.BadResult as exc:
                raise Refused(str(exc)) from exc

    def lease(self, worker: str, *, memory: str | None = None) -> Lease | None:  # no workers page in process
        s = self.services
        leased = self._call(dispatch.next_work, s.optuna, s.policy, worker, s.clock(), holder=None,
                            study_id=self.study_id)
        return None if leased is None else Lease.from_api(leased.model_dump(mode="json"))

    def heartbeat(self, token: str, *, memory: str | None = None) -> None:
        s = self.services
        # ``_call`` holds the process lock already.
        self._call(dispatch.heartbeat, s.optuna, s.policy, token, None, s.clock(), lock=nullcontext())

    def complete(self, token: str, values: dict[str, float], cost: Cost | None = None) -> None:
        self._call(dispatch.complete, self.services.optuna, token, None, values, self.services.clock(), cost)

    def fail(self, token: str, error: str, *, fatal: bool = False, load_failure: bool = False) -> None:
        self._call(dispatch.fail, self.services.optuna, token, None, error, self.services.clock(), fatal=fatal,
                   load_failure=load_failure)

    def release(self, token: str) -> None:
        self._call(dispatch.release, self.services.optuna, token, None, self.services.clock())

    def upload(self, token: str, archive: Path) -> None:
        raise Refused("`mmmo study run` runs no materialise jobs")


def create(services: Services, spec: StudySpec) -> int:
    with services.sessions() as session, services.lock:
        team = auth.local_team(session)
        return studies.create_study(session, services.optuna, services.catalog, spec, team_id=team.id,
                                    created_by=LOCAL_WORKER, now=services.clock(),
                                    policy=SpecPolicy.from_settings(services.settings)).id


def run(services: Services, study_id: int, runner: TrialRunner,
        on_trial: Callable[[int, int, dict | None, str | None, str], None] | None = None) -> dict:
    """Run the study's remaining trials; returns its final state as the API shows it.

    ``on_trial(number, finished, values, error, rung)`` after each trial is reported: ``finished``
    trials of the study so far; ``values`` None when it failed (with ``error``, its reason) or
    was abandoned (no error: its lease was lost); ``rung`` with multi-fidelity, e.g. "rung 0 of 2,
    promoted" ("" without)."""
    with services.sessions() as session, services.lock:
        # A previous run of ours died: its leases go back to the queue at once, and what it had
        # asked Optuna for but not yet recorded is failed there (nothing else runs this study).
        dispatch.requeue_leases_of(session, study_id, LOCAL_WORKER)
        results.fail_orphans(session, services.optuna, studies.get_study(session, study_id, None), older_than_s=0.0)

    def reported(outcome: Outcome) -> None:
        if on_trial is None:
            return
        with services.sessions() as session:
            study = studies.get_study(session, study_id, None)
            done = sum(t.state in FINISHED_TRIAL and t.origin == TrialOrigin.SAMPLER for t in study.trials)
            trial = next(t for t in study.trials if t.number == outcome.lease.trial_number)
            ladder = spec_of(study).ladder()
            rung = "" if ladder is None or trial.rung is None else (
                f"rung {trial.rung} of {ladder.top}" + (", promoted" if trial.state == TrialState.QUEUED else ""))
        on_trial(outcome.lease.trial_number, done, outcome.values, outcome.error, rung)

    worker = Worker(LocalLeaseSource(services, study_id), runner, LOCAL_WORKER, prefetch=False, on_outcome=reported)
    worker.run(threading.Event(), until_idle=True)
    with services.sessions() as session:
        return studies.study_detail(studies.get_study(session, study_id, None)).model_dump(mode="json")
