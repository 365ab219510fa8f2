"""Materialise jobs: a worker writes a trial's merged model and uploads it as a tar archive.

Workers reach the server over HTTP only, so the model travels back through the API and lands
in the artifact directory, which every server of a deployment must share. Jobs are leased
before trials (someone is waiting for the download) with the same lease rules as trials (``leases``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import leases
from service.db.models import Job, Study
from service.leases import StaleLease
from service.schemas import JobPublic
from service.states import JobState


def request(session: Session, study: Study, trial_number: int, options: dict, created_by: str | None) -> Job:
    job = Job(study_id=study.id, trial_number=trial_number, kind="materialize", options=options,
              state=JobState.QUEUED, created_by=created_by)
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


def next_queued(session: Session, team_id: int | None) -> Job | None:
    """The oldest queued job (of ``team_id``'s studies, of every team's if None), locked."""
    query = select(Job).join(Study).where(Job.state == JobState.QUEUED)
    if team_id is not None:
        query = query.where(Study.team_id == team_id)
    return session.scalars(query.order_by(Job.id).limit(1).with_for_update(skip_locked=True)).first()


def held(session: Session, token: str, holder: int | None) -> Job:
    """The job leased under ``token`` by ``holder``, for calls only a job's lease can make (its upload)."""
    row = leases.held(session, token, holder)
    if not isinstance(row, Job):
        raise StaleLease("no materialise job holds this lease")
    return row


def artifact_path(artifact_dir: Path, job: Job) -> Path:
    return artifact_dir / f"study-{job.study_id}-trial-{job.trial_number}-job-{job.id}.tar"


def finish(session: Session, job: Job, path: Path, size: int, now: datetime) -> Job:
    job.state, job.artifact, job.size_bytes = JobState.DONE, str(path), size
    job.lease_token, job.finished_at = None, now
    session.commit()
    return job


def fail(session: Session, job: Job, error: str, now: datetime) -> Job:
    job.state, job.error, job.lease_token, job.finished_at = JobState.FAILED, error, None, now
    session.commit()
    return job


def public(job: Job) -> JobPublic:
    return JobPublic(id=job.id, study_id=job.study_id, trial_number=job.trial_number, kind=job.kind,
                     state=job.state, worker=job.worker, size_bytes=job.size_bytes, error=job.error,
                     created_by=job.created_by, created_at=job.created_at, finished_at=job.finished_at,
                     download=f"/api/v1/jobs/{job.id}/download" if job.state == JobState.DONE else None)
