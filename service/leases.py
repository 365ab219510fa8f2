"""One lease state machine for trials and materialise jobs.

``queued --grant--> leased --renew--> leased``; a lease that is not renewed in time expires
(back to ``queued``, or failed after ``max_attempts``), a worker may ``release`` it unrun (the
attempt not counted), and a finished row drops its token, so a late heartbeat or result with
that token is refused (``StaleLease``). What finishing means is the caller's: ``results`` for
trials, ``jobs`` for jobs.

A lease belongs to its holder, the API token that leased it (None: the in-process ``mmmo study
run``): a call with another holder's lease token is refused exactly as a stale one, so a lease
token that leaked (another team, a log) can neither report, renew nor release the work.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Job, Trial
from service.states import JobState, TrialState

Leasable = Trial | Job
_QUEUED = {Trial: TrialState.QUEUED, Job: JobState.QUEUED}
_LEASED = {Trial: TrialState.LEASED, Job: JobState.LEASED}


class StaleLease(Exception):
    """A heartbeat or result for a lease that is no longer held (expired, re-leased or finished)."""


@dataclass(frozen=True)
class LeasePolicy:
    lease_seconds: float
    max_attempts: int


def grant(row: Leasable, worker: str, holder: int | None, policy: LeasePolicy, now: datetime) -> None:
    """Lease ``row`` to ``worker`` calling with token ``holder``: a fresh lease token, one more attempt."""
    row.state, row.worker, row.attempts = _LEASED[type(row)], worker, row.attempts + 1
    row.lease_holder_id = holder
    row.lease_token = secrets.token_urlsafe(24)
    row.lease_expires_at = now + timedelta(seconds=policy.lease_seconds)


def renew(row: Leasable, policy: LeasePolicy, now: datetime) -> None:
    """Extend a held lease, unless it already ran out."""
    if row.lease_expires_at < now:
        raise StaleLease("this lease expired before the heartbeat arrived")
    row.lease_expires_at = now + timedelta(seconds=policy.lease_seconds)


def requeue(row: Leasable) -> None:
    """Back to the queue: its lease token is void from now on."""
    row.state, row.lease_token, row.lease_expires_at = _QUEUED[type(row)], None, None
    row.lease_holder_id = None


def release(row: Leasable) -> None:
    """A worker hands back a lease it will not run: queued again, the attempt not counted."""
    requeue(row)
    row.attempts = max(0, row.attempts - 1)


def out_of_attempts(row: Leasable, policy: LeasePolicy) -> str | None:
    """Why an expired lease's row must fail instead of going back to the queue; None if it may retry."""
    if row.attempts >= policy.max_attempts:
        return f"lease expired {row.attempts} times (last worker: {row.worker})"
    return None


def expired(session: Session, kind: type[Leasable], now: datetime) -> list[Leasable]:
    """Rows of ``kind`` whose lease ran out, locked for this transaction (others skip them)."""
    return list(session.scalars(select(kind).where(kind.state == _LEASED[kind], kind.lease_expires_at < now)
                                .with_for_update(skip_locked=True)))


def held(session: Session, token: str, holder: int | None) -> Leasable:
    """The trial or job leased under ``token`` by ``holder``, locked for this transaction; another
    holder's lease is refused with the very answer a stale one gets."""
    for kind in (Trial, Job):
        row = session.scalars(select(kind).where(kind.lease_token == token).with_for_update()).first()
        if row is not None:
            if row.state != _LEASED[kind] or row.lease_holder_id != holder:
                break
            return row
    raise StaleLease("this lease is no longer held (expired, re-leased or finished)")
