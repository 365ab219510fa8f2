"""Who is connected: workers as the server last saw them, and what each is running now.

A worker is its name under the API token it calls with: a worker of another token (another
team's) with the same name is another worker, and can neither rename nor hide this one.
"""

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


def seen(session: Session, name: str, token_id: int, team_id: int | None, *, memory: str | None = None) -> None:
    """Record a call from worker ``name`` with token ``token_id`` (of ``team_id``; None: the
    worker pool's) (a lease or heartbeat); committed at once. ``memory``: the memory plan it
    reports (None: it reported none, and the last one stays)."""
    now = utcnow()
    mine = select(WorkerSeen).where(WorkerSeen.token_id == token_id, WorkerSeen.name == name)
    row = session.scalar(mine)
    if row is None:
        session.add(WorkerSeen(token_id=token_id, name=name, team_id=team_id, first_seen_at=now, last_seen_at=now,
                               memory=memory))
        try:
            session.commit()
            return
        except IntegrityError:  # another server recorded it first
            session.rollback()
            row = session.scalar(mine)
    changed = memory is not None and memory != row.memory
    if now - row.last_seen_at < _WRITE_EVERY and not changed:
        return
    row.last_seen_at = now
    if changed:
        row.memory = memory
    session.commit()


def listing(session: Session, team_id: int, lease_seconds: float) -> list[WorkerPublic]:
    """The team's workers and the worker pool's, busiest and most recent first."""
    now = utcnow()
    rows = session.scalars(
        select(WorkerSeen).where(or_(WorkerSeen.team_id == team_id, WorkerSeen.team_id.is_(None)),
                                 WorkerSeen.last_seen_at > now - SHOWN_FOR)
    ).all()
    tokens = {w.token_id for w in rows}
    tasks: dict[tuple[int | None, str | None], list[WorkerTask]] = {(w.token_id, w.name): [] for w in rows}
    for t in session.scalars(select(Trial).join(Study).where(Trial.state == TrialState.LEASED,
                                                             Trial.lease_holder_id.in_(tokens),
                                                             Study.team_id == team_id)):
        tasks.get((t.lease_holder_id, t.worker), []).append(
            WorkerTask(kind="trial", study_id=t.study_id, trial_number=t.number, since=t.started_at,
                       lease_expires_at=t.lease_expires_at))
    for j in session.scalars(select(Job).join(Study).where(Job.state == JobState.LEASED,
                                                           Job.lease_holder_id.in_(tokens),
                                                           Study.team_id == team_id)):
        tasks.get((j.lease_holder_id, j.worker), []).append(
            WorkerTask(kind="materialize", study_id=j.study_id, trial_number=j.trial_number, since=None,
                       lease_expires_at=j.lease_expires_at))
    alive = timedelta(seconds=max(2 * lease_seconds, 30.0))
    out = []
    for w in rows:
        running = tasks[(w.token_id, w.name)]
        out.append(WorkerPublic(name=w.name, pool=w.team_id is None, first_seen_at=w.first_seen_at,
                                last_seen_at=w.last_seen_at, running=running, memory=w.memory,
                                status="busy" if running else "idle" if now - w.last_seen_at < alive else "gone"))
    return sorted(out, key=lambda w: (w.status != "busy", w.status == "gone", -w.last_seen_at.timestamp()))
