"""Materialise jobs: a worker writes a trial's merged model and uploads it as a tar archive.

Workers reach the server over HTTP only, so the model travels back through the API and lands
in the artifact directory, which every server of a deployment must share. Jobs are leased
before trials (someone is waiting for the download) with the same lease rules as trials.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Job, Study, utcnow
from service.queue import QueuePolicy, StaleLease, grant, renew
from service.schemas import JobPublic


def request(session: Session, study: Study, trial_number: int, options: dict, created_by: str | None) -> Job:
    job = Job(study_id=study.id, trial_number=trial_number, kind="materialize", options=options,
              state="queued", created_by=created_by)
    session.add(job)
    session.commit()
    return job


def get(session: Session, job_id: int, team_id: int | None) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or (team_id is not None and job.study.team_id != team_id):
        return None
    return job


def list_for_study(session: Session, study_id: int) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)))


def _sweep(session: Session, policy: QueuePolicy) -> None:
    now = utcnow()
    for job in session.scalars(select(Job).where(Job.state == "leased", Job.lease_expires_at < now)
                               .with_for_update(skip_locked=True)):
        if job.attempts >= policy.max_attempts:
            job.state, job.lease_token, job.finished_at = "failed", None, now
            job.error = f"lease expired {job.attempts} times (last worker: {job.worker})"
        else:
            job.state, job.lease_token, job.lease_expires_at = "queued", None, None


def lease(session: Session, policy: QueuePolicy, worker: str, team_id: int | None) -> Job | None:
    _sweep(session, policy)
    query = select(Job).join(Study).where(Job.state == "queued")
    if team_id is not None:
        query = query.where(Study.team_id == team_id)
    job = session.scalars(query.order_by(Job.id).limit(1).with_for_update(skip_locked=True)).first()
    if job is None:
        return None
    grant(job, worker, policy, utcnow())
    session.commit()
    return job


def held(session: Session, token: str) -> Job | None:
    """The job leased under ``token``; None if the token is not a job's (it may be a trial's)."""
    job = session.scalars(select(Job).where(Job.lease_token == token).with_for_update()).first()
    if job is not None and job.state != "leased":
        raise StaleLease("this lease is no longer held (expired, re-leased or finished)")
    return job


def held_or_stale(session: Session, token: str) -> Job:
    """The job leased under ``token``, for calls only a job's lease can make (its upload)."""
    job = held(session, token)
    if job is None:
        raise StaleLease("no materialise job holds this lease")
    return job


def heartbeat(session: Session, policy: QueuePolicy, job: Job) -> None:
    renew(job, policy)
    session.commit()


def artifact_path(artifact_dir: Path, job: Job) -> Path:
    return artifact_dir / f"study-{job.study_id}-trial-{job.trial_number}-job-{job.id}.tar"


def finish(session: Session, job: Job, path: Path, size: int) -> Job:
    job.state, job.artifact, job.size_bytes = "done", str(path), size
    job.lease_token, job.finished_at = None, utcnow()
    session.commit()
    return job


def fail(session: Session, job: Job, error: str) -> Job:
    job.state, job.error, job.lease_token, job.finished_at = "failed", error, None, utcnow()
    session.commit()
    return job


def public(job: Job) -> JobPublic:
    return JobPublic(id=job.id, study_id=job.study_id, trial_number=job.trial_number, kind=job.kind,
                     state=job.state, worker=job.worker, size_bytes=job.size_bytes, error=job.error,
                     created_by=job.created_by, created_at=job.created_at, finished_at=job.finished_at,
                     download=f"/api/v1/jobs/{job.id}/download" if job.state == "done" else None)
