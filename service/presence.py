"""Who is connected: workers as the server last saw them, and what each is running now."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Job, Study, Trial, WorkerSeen, utcnow
from service.schemas import WorkerPublic, WorkerTask
from service.states import JobState, TrialState

SHOWN_FOR = timedelta(hours=24)  # workers unseen for longer drop off the page
_WRITE_EVERY = timedelta(seconds=5)  # idle workers poll every second: record them at most this often


def seen(session: Session, name: str, team_id: int | None) -> None:
    """Record a call from ``name`` (a lease, heartbeat or result); committed at once."""
    now = utcnow()
    row = session.scalar(select(WorkerSeen).where(WorkerSeen.name == name))
    if row is None:
        session.add(WorkerSeen(name=name, team_id=team_id, first_seen_at=now, last_seen_at=now))
        try:
            session.commit()
            return
        except IntegrityError:  # another server recorded it first
            session.rollback()
            row = session.scalar(select(WorkerSeen).where(WorkerSeen.name == name))
    if now - row.last_seen_at < _WRITE_EVERY and row.team_id == team_id:
        return
    row.last_seen_at, row.team_id = now, team_id
    session.commit()


def listing(session: Session, team_id: int, lease_seconds: float) -> list[WorkerPublic]:
    """The team's workers and the worker pool's, busiest and most recent first."""
    now = utcnow()
    rows = session.scalars(
        select(WorkerSeen).where(or_(WorkerSeen.team_id == team_id, WorkerSeen.team_id.is_(None)),
                                 WorkerSeen.last_seen_at > now - SHOWN_FOR)
    ).all()
    names = [w.name for w in rows]
    tasks: dict[str, list[WorkerTask]] = {n: [] for n in names}
    for t in session.scalars(select(Trial).join(Study).where(Trial.state == TrialState.LEASED, Trial.worker.in_(names),
                                                             Study.team_id == team_id)):
        tasks[t.worker].append(WorkerTask(kind="trial", study_id=t.study_id, trial_number=t.number,
                                          since=t.started_at, lease_expires_at=t.lease_expires_at))
    for j in session.scalars(select(Job).join(Study).where(Job.state == JobState.LEASED, Job.worker.in_(names),
                                                           Study.team_id == team_id)):
        tasks[j.worker].append(WorkerTask(kind="materialize", study_id=j.study_id, trial_number=j.trial_number,
                                          since=None, lease_expires_at=j.lease_expires_at))
    alive = timedelta(seconds=max(2 * lease_seconds, 30.0))
    out = [WorkerPublic(name=w.name, pool=w.team_id is None, first_seen_at=w.first_seen_at,
                        last_seen_at=w.last_seen_at, running=tasks[w.name],
                        status="busy" if tasks[w.name] else "idle" if now - w.last_seen_at < alive else "gone")
           for w in rows]
    return sorted(out, key=lambda w: (w.status != "busy", w.status == "gone", -w.last_seen_at.timestamp()))
