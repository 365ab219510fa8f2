"""The trial queue: leases with a TTL, heartbeats, re-lease on expiry, stale results refused.

Everything lives in the database, so a restarted server loses nothing but the trials in
flight, whose leases expire and return them to the queue. Callers serialise these functions
per process (``Services.lock``); on PostgreSQL the row locks also keep several servers apart.

Optuna writes through its own connection. On SQLite a write transaction of ours would block
it (and a read snapshot of ours would go stale under it), so every Optuna call is made with
no transaction of ours open: ``_optuna`` commits first. Optuna is always told before our row
changes, and telling is idempotent, so a crash in between heals on the next report.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from evals.objective import Objective
from search.space import SearchSpace
from search.spec import StudySpec
from search.study import OptunaStudies
from service.db.models import Job, Result, Study, Trial, utcnow
from service.objectives import objectives_of

FINISHED = ("complete", "failed")


class StaleLease(Exception):
    """A heartbeat or result for a lease that is no longer held (expired, re-leased or finished)."""


class BadResult(ValueError):
    """A result that does not match the study's objectives."""


@dataclass(frozen=True)
class QueuePolicy:
    lease_seconds: float
    max_attempts: int


def grant(row: Trial | Job, worker: str, policy: QueuePolicy, now: datetime) -> None:
    """Lease ``row`` (a trial or a job) to ``worker``: a fresh token, one more attempt."""
    row.state, row.worker, row.attempts = "leased", worker, row.attempts + 1
    row.lease_token = secrets.token_urlsafe(24)
    row.lease_expires_at = now + timedelta(seconds=policy.lease_seconds)


def renew(row: Trial | Job, policy: QueuePolicy) -> None:
    """Extend a held lease, unless it already ran out."""
    if row.lease_expires_at < utcnow():
        raise StaleLease("this lease expired before the heartbeat arrived")
    row.lease_expires_at = utcnow() + timedelta(seconds=policy.lease_seconds)


def _spec(study: Study) -> StudySpec:
    return StudySpec.model_validate(study.spec)


def _out_of_time(study: Study) -> bool:
    seconds = study.spec.get("budget", {}).get("seconds")
    return seconds is not None and (utcnow() - study.created_at).total_seconds() > seconds


def _finish_study_if_done(session: Session, optuna: OptunaStudies, study: Study) -> None:
    """Done when the trial budget is spent, or the time budget is and nothing is in flight.
    Then no ask can be in flight either, so trials Optuna handed out that never got a row (their
    server died mid-ask) are failed at once rather than left running in Optuna's records."""
    if study.status != "running":
        return
    counts = dict(session.execute(
        select(Trial.state, func.count()).where(Trial.study_id == study.id, Trial.origin == "sampler")
        .group_by(Trial.state)
    ).all())
    finished = sum(counts.get(s, 0) for s in FINISHED)
    in_flight = counts.get("queued", 0) + counts.get("leased", 0)
    if finished >= study.budget or (_out_of_time(study) and in_flight == 0):
        study.status = "done"
        study.finished_at = utcnow()
        fail_orphans(session, optuna, study, older_than_s=0.0)


def constraint_violations(spec: StudySpec, values: dict[str, float]) -> dict[str, float]:
    return {f"{c.objective}:{'max' if c.max is not None else 'min'}": c.violation(values[c.objective])
            for c in spec.constraints}


def _optuna(session: Session, call, *args):
    session.commit()
    return call(*args)


def _fail(session: Session, optuna: OptunaStudies, trial: Trial, error: str, now: datetime) -> None:
    _optuna(session, optuna.fail, trial.study.optuna_name, _spec(trial.study), trial.number)
    trial.state, trial.error, trial.lease_token, trial.finished_at = "failed", error, None, now
    _finish_study_if_done(session, optuna, trial.study)


def sweep_expired(session: Session, optuna: OptunaStudies, policy: QueuePolicy, now: datetime) -> None:
    """Return expired leases to the queue, or fail trials that used up their attempts (or whose
    study was cancelled meanwhile)."""
    expired = session.scalars(
        select(Trial).where(Trial.state == "leased", Trial.lease_expires_at < now).with_for_update(skip_locked=True)
    ).all()
    for trial in expired:
        if trial.study.status == "cancelled":
            _fail(session, optuna, trial, "study cancelled", now)
        elif trial.attempts >= policy.max_attempts:
            _fail(session, optuna, trial, f"lease expired {trial.attempts} times (last worker: {trial.worker})", now)
        else:
            trial.state, trial.lease_token, trial.lease_expires_at = "queued", None, None


def cached_values(session: Session, config_hash: str, objectives: list[Objective]) -> dict[str, float] | None:
    """Stored values of every objective for this configuration, or None if any is missing."""
    rows = session.execute(
        select(Result.objective_hash, Result.value).where(Result.config_hash == config_hash)
    ).all()
    known = dict(rows)
    if not all(o.identity() in known for o in objectives):
        return None
    return {o.key: known[o.identity()] for o in objectives}


def _store_results(session: Session, config_hash: str, objectives: list[Objective], values: dict[str, float]) -> None:
    have = {h for (h,) in session.execute(select(Result.objective_hash).where(Result.config_hash == config_hash))}
    for o in objectives:
        if o.identity() not in have:
            session.add(Result(config_hash=config_hash, objective_hash=o.identity(), value=float(values[o.key])))


def fail_orphans(session: Session, optuna: OptunaStudies, study: Study, older_than_s: float) -> list[int]:
    """Fail Optuna trials that were asked but never got a row of ours (the process asking died
    in between). Only those older than ``older_than_s``: another server may be mid-ask."""
    spec = _spec(study)
    known = set(session.scalars(select(Trial.number).where(Trial.study_id == study.id)))
    cutoff = datetime.now() - timedelta(seconds=older_than_s)  # Optuna stores local naive times
    orphans = [n for n, started in _optuna(session, optuna.running_since, study.optuna_name, spec).items()
               if n not in known and (started is None or started <= cutoff)]
    for number in orphans:
        _optuna(session, optuna.fail, study.optuna_name, spec, number)
    return orphans


# Advisory-lock namespace for "asking Optuna for a trial of study N" (an arbitrary constant).
_ASK_LOCK_NAMESPACE = 0x6D6D6D6F


@contextmanager
def ask_lock(session: Session, study_id: int) -> Iterator[bool]:
    """Whether this process may ask for ``study_id``'s next trial now.

    Servers sharing a PostgreSQL database would otherwise both count "budget left" and both ask.
    The lock is a session-level advisory lock on a connection of its own, so it outlives the
    commits ``_optuna`` makes; a busy study is skipped, not waited for (another server is asking
    for it). On SQLite one server owns the file and ``Services.lock`` serialises it.
    """
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        yield True
        return
    with bind.connect() as conn:
        key = {"ns": _ASK_LOCK_NAMESPACE, "id": study_id}
        got = conn.execute(text("SELECT pg_try_advisory_lock(:ns, :id)"), key).scalar()
        try:
            yield bool(got)
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:ns, :id)"), key)
            conn.commit()


def _new_trial(session: Session, optuna: OptunaStudies, study: Study, orphan_grace_s: float = 300.0) -> Trial | None:
    """Ask Optuna for a new trial of ``study`` if it has budget left.

    A configuration already evaluated on the same objectives (in any study) is answered from
    the results cache and the next proposal asked for: small NSGA-II populations make
    duplicate children, and warm-started studies repeat their parents' configurations.
    """
    if _out_of_time(study):
        _finish_study_if_done(session, optuna, study)
        return None
    spec = _spec(study)
    objectives = objectives_of(spec)
    with ask_lock(session, study.id) as mine:
        if not mine:
            return None
        fail_orphans(session, optuna, study, orphan_grace_s)
        while session.scalar(select(func.count()).select_from(Trial)
                             .where(Trial.study_id == study.id, Trial.origin == "sampler")) < study.budget:
            number, params = _optuna(session, optuna.ask, study.optuna_name, spec)
            config = SearchSpace(spec).merge_config(params)
            trial = Trial(study_id=study.id, number=number, params=params, merge_config=config.to_dict(),
                          config_hash=config.fingerprint(), state="queued")
            values = cached_values(session, trial.config_hash, objectives)
            if values is None:
                session.add(trial)
                session.flush()
                return trial
            _optuna(session, optuna.tell, study.optuna_name, spec, number, [values[o.key] for o in objectives],
                    constraint_violations(spec, values))
            trial.state, trial.values, trial.cached, trial.finished_at = "complete", values, True, utcnow()
            session.add(trial)
            session.flush()
            _finish_study_if_done(session, optuna, study)
    return None


@dataclass(frozen=True)
class Lease:
    trial: Trial
    objectives: list[dict]
    task_paths: list[str]


def _running_studies(session: Session, team_id: int | None, study_id: int | None) -> list[Study]:
    """Running studies in round-robin order: the one that waited longest for a lease first."""
    query = select(Study).where(Study.status == "running")
    if team_id is not None:
        query = query.where(Study.team_id == team_id)
    if study_id is not None:
        query = query.where(Study.id == study_id)
    return list(session.scalars(query.order_by(Study.last_leased_at.asc().nulls_first(), Study.id)))


def lease_next(session: Session, optuna: OptunaStudies, policy: QueuePolicy, worker: str, *,
               team_id: int | None = None, study_id: int | None = None) -> Lease | None:
    """The next trial to run: a queued one, else a new one, of the running study (of ``team_id``'s
    studies, or of every team's if None; of ``study_id`` only, if given) that was served longest ago."""
    now = utcnow()
    sweep_expired(session, optuna, policy, now)
    grace = max(policy.lease_seconds, 60.0)
    for study in _running_studies(session, team_id, study_id):
        trial = session.scalars(
            select(Trial).where(Trial.study_id == study.id, Trial.state == "queued")
            .order_by(Trial.id).limit(1).with_for_update(skip_locked=True)
        ).first() or _new_trial(session, optuna, study, orphan_grace_s=grace)
        if trial is None:
            continue
        grant(trial, worker, policy, now)
        trial.started_at = now
        study.last_leased_at = now
        session.commit()
        spec = _spec(study)
        return Lease(trial, [o.__dict__ for o in objectives_of(spec)], list(spec.task_paths))
    session.commit()
    return None


def _held(session: Session, token: str) -> Trial:
    trial = session.scalars(select(Trial).where(Trial.lease_token == token).with_for_update()).first()
    if trial is None or trial.state != "leased":
        raise StaleLease("this lease is no longer held (expired, re-leased or finished)")
    return trial


def heartbeat(session: Session, optuna: OptunaStudies, policy: QueuePolicy, token: str) -> Trial:
    """Extend the lease. A cancelled study's trial fails here: its worker should stop."""
    trial = _held(session, token)
    if trial.lease_expires_at >= utcnow() and trial.study.status == "cancelled":
        _fail(session, optuna, trial, "study cancelled", utcnow())
        session.commit()
        raise StaleLease("the study was cancelled: stop this trial")
    renew(trial, policy)
    session.commit()
    return trial


def requeue_leases_of(session: Session, study_id: int, worker: str) -> int:
    """Return a dead worker's leases of a study to the queue at once (``mmmo study resume``)."""
    held = session.scalars(select(Trial).where(Trial.study_id == study_id, Trial.state == "leased",
                                               Trial.worker == worker)).all()
    for trial in held:
        trial.state, trial.lease_token, trial.lease_expires_at = "queued", None, None
    session.commit()
    return len(held)


def release(session: Session, token: str) -> Trial:
    """A worker hands back a lease it will not run: the trial is queued again, the attempt not counted."""
    trial = _held(session, token)
    trial.state, trial.lease_token, trial.lease_expires_at = "queued", None, None
    trial.attempts = max(0, trial.attempts - 1)
    session.commit()
    return trial


def complete(session: Session, optuna: OptunaStudies, token: str, values: dict[str, float]) -> Trial:
    trial = _held(session, token)
    spec = _spec(trial.study)
    keys = [o.key for o in objectives_of(spec)]
    if sorted(values) != sorted(keys):
        raise BadResult(f"values must have exactly the keys {keys}, got {sorted(values)}")
    now = utcnow()
    _optuna(session, optuna.tell, trial.study.optuna_name, spec, trial.number, [float(values[k]) for k in keys],
            constraint_violations(spec, values))
    _store_results(session, trial.config_hash, objectives_of(spec), values)
    trial.state, trial.values, trial.lease_token, trial.finished_at = "complete", values, None, now
    trial.duration_s = (now - trial.started_at).total_seconds() if trial.started_at else None
    _finish_study_if_done(session, optuna, trial.study)
    session.commit()
    return trial


def fail(session: Session, optuna: OptunaStudies, token: str, error: str) -> Trial:
    """A worker reports that the trial cannot be evaluated (bad merge, NaN score): no retry."""
    trial = _held(session, token)
    _fail(session, optuna, trial, error, utcnow())
    session.commit()
    return trial

