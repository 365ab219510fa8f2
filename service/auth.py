"""Teams, users and API tokens.

A token is shown once, at creation; the database keeps its SHA-256 only. A team token opens its
own team's studies (and may run workers for them); a worker-pool token (no team) may only lease
trials, of every team. Studies of other teams are invisible: the routes answer 404 for them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, joinedload

from service.db.models import ApiToken, Team, User, WebSession, utcnow

TOKEN_PREFIX = "mmmo_"
LOCAL_TEAM = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TOUCH_EVERY = timedelta(seconds=60)  # last_used_at is a hint: one write a minute per token at most


class AuthError(ValueError):
    """Bad admin input: an unknown or duplicate team, a malformed name, an unknown token."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a team member (``team_id`` set) or the worker pool (``team_id`` None)."""

    token_id: int
    team_id: int | None
    team: str | None
    user: str | None

    @property
    def is_pool(self) -> bool:
        return self.team_id is None


@dataclass(frozen=True)
class IssuedToken:
    id: int
    token: str  # the secret; shown once
    team: str | None
    name: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise AuthError(f"{kind} name {name!r}: use letters, digits, '_', '.', '-' (at most 100, not starting "
                        "with a symbol)")
    return name


def create_team(session: Session, name: str) -> Team:
    _check_name("team", name)
    if session.scalar(select(Team).where(Team.name == name)) is not None:
        raise AuthError(f"team {name!r} already exists")
    team = Team(name=name)
    session.add(team)
    session.commit()
    return team


def find_team(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise AuthError(f"no team {name!r} (create it with `mmmo admin create-team {name}`)")
    return team


def local_team(session: Session) -> Team:
    """The embedded default's team, made on first use."""
    team = session.scalar(select(Team).where(Team.name == LOCAL_TEAM))
    return team if team is not None else create_team(session, LOCAL_TEAM)


def list_teams(session: Session) -> list[Team]:
    return list(session.scalars(select(Team).order_by(Team.name)))


def _user(session: Session, team: Team, name: str) -> User:
    _check_name("user", name)
    user = session.scalar(select(User).where(User.team_id == team.id, User.name == name))
    if user is None:
        user = User(team_id=team.id, name=name)
        session.add(user)
        session.flush()
    return user


def create_token(session: Session, team_name: str | None, name: str | None = None,
                 user: str | None = None) -> IssuedToken:
    """A new token of ``team_name`` (for ``user``, made if new), or a worker-pool token if None."""
    team = find_team(session, team_name) if team_name is not None else None
    label = name or (user if user else "workers" if team is None else "api")
    if team is None and user:
        raise AuthError("a worker-pool token has no team, so it has no user either")
    owner = _user(session, team, user) if team is not None and user else None
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(team_id=team.id if team else None, user_id=owner.id if owner else None, name=label[:100],
                   digest=digest(secret), prefix=secret[: len(TOKEN_PREFIX) + 6])
    session.add(row)
    session.commit()
    return IssuedToken(row.id, secret, team.name if team else None, row.name)


def revoke_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise AuthError(f"no token with id {token_id} (see `mmmo admin list-tokens`)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_tokens(session: Session, team_name: str | None = None) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if team_name is not None:
        query = query.where(ApiToken.team_id == find_team(session, team_name).id)
    return list(session.scalars(query))


def authenticate(session: Session, secret: str | None) -> Principal | None:
    if not secret or not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    row = session.scalar(select(ApiToken).options(joinedload(ApiToken.team), joinedload(ApiToken.user))
                         .where(ApiToken.digest == digest(secret)))
    return None if row is None or row.revoked_at is not None else _principal(session, row)


def _principal(session: Session, row: ApiToken) -> Principal:
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:
        row.last_used_at = now
        session.commit()
    return Principal(token_id=row.id, team_id=row.team_id, team=row.team.name if row.team else None,
                     user=row.user.name if row.user else row.name)


# Dashboard logins. The cookie holds a random session id (never the API token); the database keeps
# its SHA-256. A page's CSRF token is derived from the id, so only a page of this site that was
# served to the cookie's holder knows it, and it needs no storage of its own.

def open_web_session(session: Session, principal: Principal, now: datetime, lifetime: timedelta) -> str:
    """A new dashboard session for ``principal``'s token; returns the id for the cookie. (Expired
    sessions, anyone's, are deleted here: logins are rare, and nothing else needs them.)"""
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    secret = secrets.token_urlsafe(32)
    session.add(WebSession(digest=digest(secret), token_id=principal.token_id, created_at=now,
                           expires_at=now + lifetime))
    session.commit()
    return secret


def _web_session(session: Session, secret: str | None) -> WebSession | None:
    if not secret or len(secret) > 200:
        return None
    return session.scalar(select(WebSession).where(WebSession.digest == digest(secret)))


def web_principal(session: Session, secret: str | None, now: datetime) -> Principal | None:
    """The owner of a live dashboard session: not logged out, not expired, its token not revoked."""
    row = _web_session(session, secret)
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    token = session.scalar(select(ApiToken).options(joinedload(ApiToken.team), joinedload(ApiToken.user))
                           .where(ApiToken.id == row.token_id))
    return None if token is None or token.revoked_at is not None else _principal(session, token)


def close_web_session(session: Session, secret: str | None, now: datetime) -> None:
    """Log out: the session's id opens nothing from now on."""
    row = _web_session(session, secret)
    if row is not None and row.revoked_at is None:
        row.revoked_at = now
        session.commit()


def csrf_token(secret: str) -> str:
    """The CSRF token of a dashboard session: a one-way function of its id (and not its digest)."""
    return hashlib.sha256(f"mmmo-csrf:{secret}".encode()).hexdigest()


def csrf_ok(secret: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(csrf_token(secret).encode(), sent.encode())


def ensure_local_token(session: Session, token_file: Path) -> tuple[str, bool]:
    """The embedded default's access: a ``local`` team and a token kept in ``token_file`` (mode 600).

    Reuses the stored token while it is valid; returns (token, whether a new one was made).
    """
    if token_file.is_file():
        stored = token_file.read_text().strip()
        if authenticate(session, stored) is not None:
            return stored, False
    local_team(session)
    login = os.environ.get("USER", "")
    issued = create_token(session, LOCAL_TEAM, name="local", user=login if _NAME.match(login) else "local")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = token_file.with_suffix(".tmp")
    tmp.write_text(issued.token + "\n")
    tmp.chmod(0o600)
    tmp.replace(token_file)
    return issued.token, True
