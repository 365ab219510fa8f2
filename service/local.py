"""``mmmo study run`` / ``resume``: a whole study in one process, no HTTP, on the same queue.

The same lease/complete rules as the server apply (so a killed run resumes with its budget
honoured and nothing counted twice); the process is its own single worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from search.spec import StudySpec
from service import auth, queue, studies
from service.services import Services
from service.worker import TrialRunner

LOCAL_WORKER = "study-run"


def create(services: Services, spec: StudySpec) -> int:
    with services.sessions() as session, services.lock:
        team = auth.local_team(session)
        return studies.create_study(session, services.optuna, services.catalog, spec, team_id=team.id,
                                    created_by=LOCAL_WORKER).id


def run(services: Services, study_id: int, runner: TrialRunner,
        on_trial: Callable[[int, int, dict | None], None] | None = None) -> dict:
    """Run the study's remaining trials; returns its final state as the API shows it."""
    from evals.objective import Objective
    from merging.config import MergeConfig

    with services.sessions() as session, services.lock:
        # A previous run of ours died: its leases go back to the queue at once, and what it had
        # asked Optuna for but not yet recorded is failed there (nothing else runs this study).
        queue.requeue_leases_of(session, study_id, LOCAL_WORKER)
        queue.fail_orphans(session, services.optuna, studies.get_study(session, study_id, None), older_than_s=0.0)
    while True:
        with services.sessions() as session, services.lock:
            lease = queue.lease_next(session, services.optuna, services.policy, LOCAL_WORKER, study_id=study_id)
        if lease is None:
            break
        token, number = lease.trial.lease_token, lease.trial.number
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(services, token, stop), daemon=True)
        beat.start()
        try:
            values = runner.run(MergeConfig.from_dict(lease.trial.merge_config),
                                [Objective(**o) for o in lease.objectives], tuple(lease.task_paths))
            error = None
        except Exception as exc:  # the trial fails with its reason; the study goes on
            values, error = None, f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()
            beat.join()
        with services.sessions() as session, services.lock:
            if values is not None:
                queue.complete(session, services.optuna, token, values)
            else:
                queue.fail(session, services.optuna, token, error)
            study = studies.get_study(session, study_id, None)
            done = sum(t.state in ("complete", "failed") and t.origin == "sampler" for t in study.trials)
        if on_trial:
            on_trial(number, done, values)
    with services.sessions() as session:
        return studies.study_detail(studies.get_study(session, study_id, None)).model_dump(mode="json")


def _heartbeat(services: Services, token: str, stop: threading.Event) -> None:
    while not stop.wait(services.policy.lease_seconds / 3):
        with services.sessions() as session, services.lock:
            try:
                queue.heartbeat(session, services.optuna, services.policy, token)
            except queue.StaleLease:
                return
