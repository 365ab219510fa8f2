"""The service's own tables. Prefixed ``mmmo_`` so Optuna's tables can share the database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql import false


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "mmmo_teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    """A person of a team; studies record who created them (through the token they used)."""

    __tablename__ = "mmmo_users"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("mmmo_teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    """An API token, stored as its SHA-256 (tokens are 256 random bits: no salt or slow hash needed).

    ``team_id`` None is a worker-pool token: it may lease trials of every team and do nothing else.
    """

    __tablename__ = "mmmo_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int | None] = mapped_column(ForeignKey("mmmo_teams.id", ondelete="CASCADE"), nullable=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("mmmo_users.id", ondelete="CASCADE"), nullable=True)
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell tokens apart
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    team: Mapped[Team | None] = relationship()
    user: Mapped[User | None] = relationship()


class Study(Base):
    __tablename__ = "mmmo_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("mmmo_teams.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    optuna_name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # service.states.StudyStatus
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why a failed study cannot run
    budget: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_leased_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # round-robin order

    team: Mapped[Team] = relationship()
    trials: Mapped[list[Trial]] = relationship(back_populates="study", cascade="all, delete-orphan",
                                               order_by="Trial.number")


class Trial(Base):
    """One Optuna trial and its lease. ``state``: ``service.states.TrialState``."""

    __tablename__ = "mmmo_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("mmmo_studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    merge_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)  # answered from the results cache
    origin: Mapped[str] = mapped_column(String(20), default="sampler")  # sampler | warm_start (outside budget)
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The ApiToken id whose caller holds the lease (None: the in-process ``mmmo study run``); only
    # that caller may renew, report or release it.
    lease_holder_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A queued trial whose configuration a pending trial of the team (this id) is evaluating: it is
    # not leased, and is answered from that trial's result (or queued for real if that one fails).
    waiting_on: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    values: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Failed because its worker could not load the study's models: a few identical ones fail the study.
    load_failure: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What its evaluation cost, as its worker reported: lm-eval items scored and seconds scoring them
    # (0 and None for a result answered from the results cache).
    items: Mapped[int | None] = mapped_column(Integer, nullable=True)
    eval_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Multi-fidelity (``search.fidelity``): the rung ``values`` were measured at, and the values at
    # each rung it reached (promotions compare a rung's values). None without fidelity.
    rung: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rungs: Mapped[list[dict[str, float]] | None] = mapped_column(JSON, nullable=True)

    study: Mapped[Study] = relationship(back_populates="trials")


class Result(Base):
    """The results cache: one objective's value for one merge configuration, across a team's
    studies (a team sees only the values its own workers posted)."""

    __tablename__ = "mmmo_results"
    __table_args__ = (UniqueConstraint("team_id", "config_hash", "objective_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("mmmo_teams.id", ondelete="CASCADE"))
    config_hash: Mapped[str] = mapped_column(String(64))
    objective_hash: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """Work for a worker other than a trial: ``materialize`` writes a trial's merged model, which
    the worker uploads as a tar archive to ``artifact`` (a path in the server's home).
    ``state``: ``service.states.JobState``."""

    __tablename__ = "mmmo_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("mmmo_studies.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20), default="materialize")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_holder_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # as Trial's
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    artifact: Mapped[str | None] = mapped_column(Text, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    study: Mapped[Study] = relationship()


class WorkerSeen(Base):
    """A worker as the server last saw it (any lease or heartbeat call), for the workers page. A
    worker is its name under the token it calls with: another token's worker of the same name
    is another worker."""

    __tablename__ = "mmmo_workers"
    __table_args__ = (UniqueConstraint("token_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("mmmo_tokens.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    team_id: Mapped[int | None] = mapped_column(ForeignKey("mmmo_teams.id", ondelete="CASCADE"), nullable=True)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    memory: Mapped[str | None] = mapped_column(String(200), nullable=True)  # its last reported memory plan


class WebSession(Base):
    """A dashboard login. The cookie holds a random id, this row its SHA-256 and the API token it was
    opened with: logging out revokes the row, and revoking the token ends every session it opened."""

    __tablename__ = "mmmo_web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("mmmo_tokens.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    token: Mapped[ApiToken] = relationship()
