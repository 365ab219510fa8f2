"""What workers ask of the server, whether over HTTP (``routes/leases.py``) or in process
(``local.py``): the next piece of work, heartbeats, hand-backs and outcomes.

Callers serialise these per process (``Services.lock``); on PostgreSQL the row locks and the
ask lock also keep several servers apart. Every function takes ``now`` from the caller's clock,
and ``holder``, the caller's API token id (None in process): a lease is only ever renewed,
reported or released by the holder it was granted to (``leases.held``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from search.optuna_store import OptunaStudies
from service import jobs, leases, proposals, results
from service.db.models import Job, Study, Trial
from service.lease_source import Cost
from service.leases import LeasePolicy, StaleLease
from service.schemas import LeasePublic
from service.specs import objectives_of, spec_of
from service.states import StudyStatus, TrialState


def sweep_expired(session: Session, optuna: OptunaStudies, policy: LeasePolicy, now: datetime) -> None:
    """Expired leases go back to the queue, or fail once they used up their attempts (or their
    study stopped meanwhile); trials left waiting on a twin that is gone are settled."""
    for trial in leases.expired(session, Trial, now):
        if trial.study.status != StudyStatus.RUNNING:
            results.fail(session, optuna, trial, f"study {trial.study.status}", now)
        elif reason := leases.out_of_attempts(trial, policy):
            results.fail(session, optuna, trial, reason, now)
        else:
            leases.requeue(trial)
    for job in leases.expired(session, Job, now):
        if reason := leases.out_of_attempts(job, policy):
            jobs.fail(session, job, reason, now)
        else:
            leases.requeue(job)
    results.settle_waiters(session, optuna, now)


def _running_studies(session: Session, team_id: int | None, study_id: int | None) -> list[Study]:
    """Running studies in round-robin order: the one that waited longest for a lease first."""
    query = select(Study).where(Study.status == StudyStatus.RUNNING)
    if team_id is not None:
        query = query.where(Study.team_id == team_id)
    if study_id is not None:
        query = query.where(Study.id == study_id)
    return list(session.scalars(query.order_by(Study.last_leased_at.asc().nulls_first(), Study.id)))


def _next_trial(session: Session, optuna: OptunaStudies, policy: LeasePolicy, worker: str, holder: int | None,
                now: datetime, team_id: int | None, study_id: int | None) -> Trial | None:
    grace = max(policy.lease_seconds, 60.0)
    for study in _running_studies(session, team_id, study_id):
        trial = session.scalars(
            select(Trial).where(Trial.study_id == study.id, Trial.state == TrialState.QUEUED,
                                Trial.waiting_on.is_(None))
            .order_by(Trial.id).limit(1).with_for_update(skip_locked=True)
        ).first() or proposals.propose(session, optuna, study, now, orphan_grace_s=grace,
                                       twins_in_study_only=study_id is not None)
        if trial is not None:
            leases.grant(trial, worker, holder, policy, now)
            trial.started_at = study.last_leased_at = now
            return trial
    return None


def next_work(session: Session, optuna: OptunaStudies, policy: LeasePolicy, worker: str, now: datetime, *,
              holder: int | None, team_id: int | None = None, study_id: int | None = None,
              with_jobs: bool = True) -> LeasePublic | None:
    """Lease the next piece of work to ``worker`` (calling with token ``holder``): a materialise
    job first (someone is waiting for its download), else a queued or new trial of the running
    study (of ``team_id``'s studies, of every team's if None; of ``study_id`` only, if given)
    that was served longest ago."""
    sweep_expired(session, optuna, policy, now)
    job = jobs.next_queued(session, team_id) if with_jobs and study_id is None else None
    if job is not None:
        leases.grant(job, worker, holder, policy, now)
        session.commit()
        trial = next(t for t in job.study.trials if t.number == job.trial_number)
        return LeasePublic(kind="materialize", token=job.lease_token, study_id=job.study_id,
                           trial_number=job.trial_number, job_id=job.id, options=job.options,
                           merge_config=trial.merge_config, objectives=[], expires_at=job.lease_expires_at,
                           lease_seconds=policy.lease_seconds)
    trial = _next_trial(session, optuna, policy, worker, holder, now, team_id, study_id)
    session.commit()
    if trial is None:
        return None
    spec = spec_of(trial.study)
    ladder = spec.ladder()
    rung = None if ladder is None else results.next_rung(trial)
    return LeasePublic(token=trial.lease_token, study_id=trial.study_id, trial_number=trial.number,
                       merge_config=trial.merge_config, objectives=[o.__dict__ for o in objectives_of(spec)],
                       task_paths=list(spec.task_paths), expires_at=trial.lease_expires_at,
                       lease_seconds=policy.lease_seconds, rung=rung,
                       window=None if ladder is None else ladder.window(rung))


def heartbeat(session: Session, optuna: OptunaStudies, policy: LeasePolicy, token: str, holder: int | None,
              now: datetime, *, lock: AbstractContextManager) -> Trial | Job:
    """Extend the lease. A trial of a study that stopped (cancelled, failed) fails here: its
    worker should stop.

    A renewal touches its own row only, so it needs no process ``lock``: an ask that holds that
    lock for seconds must not let other workers' leases run out. Failing the trial tells Optuna,
    which is done under ``lock`` like every other Optuna call.
    """
    row = leases.held(session, token, holder)
    if isinstance(row, Trial) and row.lease_expires_at >= now and row.study.status != StudyStatus.RUNNING:
        session.rollback()  # no row lock held while waiting for the process lock
        with lock:
            row = leases.held(session, token, holder)
            status = row.study.status
            results.fail(session, optuna, row, f"study {status}", now)
            session.commit()
        raise StaleLease(f"the study was {status}: stop this trial")
    leases.renew(row, policy, now)
    session.commit()
    return row


def release(session: Session, optuna: OptunaStudies, token: str, holder: int | None, now: datetime) -> Trial | Job:
    """The worker will not run this lease: queued again, the attempt not counted; a trial of a
    study that stopped meanwhile fails instead (nothing would ever lease it again)."""
    row = leases.held(session, token, holder)
    if isinstance(row, Trial) and row.study.status != StudyStatus.RUNNING:
        results.fail(session, optuna, row, f"study {row.study.status}", now)
    else:
        leases.release(row)
    session.commit()
    return row


def requeue_leases_of(session: Session, study_id: int, worker: str) -> int:
    """Return a dead in-process worker's leases of a study to the queue at once (``mmmo study resume``)."""
    held = session.scalars(select(Trial).where(Trial.study_id == study_id, Trial.state == TrialState.LEASED,
                                               Trial.worker == worker, Trial.lease_holder_id.is_(None))).all()
    for trial in held:
        leases.requeue(trial)
    session.commit()
    return len(held)


def complete(session: Session, optuna: OptunaStudies, token: str, holder: int | None, values: dict[str, float],
             now: datetime, cost: Cost | None = None) -> Trial:
    row = leases.held(session, token, holder)
    if isinstance(row, Job):
        raise results.BadResult("a materialise job reports success by uploading its archive")
    return results.complete(session, optuna, row, values, now, cost)


def fail(session: Session, optuna: OptunaStudies, token: str, holder: int | None, error: str, now: datetime, *,
         fatal: bool = False, load_failure: bool = False) -> Trial | Job:
    """The work failed with ``error``. ``fatal``: the study itself cannot run (its checkpoints are
    incompatible), so it fails once with that reason instead of trial after trial.
    ``load_failure``: the worker could not load the study's models; a few identical ones fail
    the study (``results.fail``)."""
    row = leases.held(session, token, holder)
    if isinstance(row, Job):
        return jobs.fail(session, row, error, now)
    results.fail(session, optuna, row, error, now, load_failure=load_failure)
    if fatal:
        results.fail_study(session, optuna, row.study, error, now)
    session.commit()
    return row
