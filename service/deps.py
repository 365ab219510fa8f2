"""Typed dependencies for the routes: the services, a session, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import auth
from service.schemas import NO_NUL
from service.services import Services

SESSION_COOKIE = "mmmo_session"  # a dashboard session's id (auth.open_web_session), never an API token
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_bearer = HTTPBearer(auto_error=False, description="an API token: `mmmo admin create-token --team NAME`")


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]


def caller(request: Request, services: ServicesDep,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> auth.Principal:
    """The token's owner, from the Bearer header; else the dashboard's session cookie, whose unsafe
    requests must also come from this origin and carry the page's CSRF token (see ``check_csrf``)."""
    if credentials is None and request.cookies.get(SESSION_COOKIE):
        return _cookie_caller(request, services)
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    with services.sessions() as session:
        principal = auth.authenticate(session, credentials.credentials)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def _cookie_caller(request: Request, services: Services) -> auth.Principal:
    secret = request.cookies[SESSION_COOKIE]
    with services.sessions() as session:
        principal = auth.web_principal(session, secret, services.clock())
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the dashboard session has ended: log in again",
                            headers={"WWW-Authenticate": "Bearer"})
    if request.method in UNSAFE_METHODS:
        check_csrf(request, secret, request.headers.get(CSRF_HEADER), services.settings.secure_cookies)
    return principal


def _origin(url: str) -> tuple[str, str, int | None] | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return None
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def same_origin(request: Request, secure: bool) -> bool:
    """The browser sent this from a page of this very origin: ``Sec-Fetch-Site: same-origin`` (all
    current browsers send it), else an ``Origin`` equal to the request's own scheme, host and port
    (``https`` too when the operator says the service is behind TLS). Another port of the same
    host is another origin, though the same site: SameSite cookies do not stop it, this does."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    sent, host = request.headers.get("origin"), request.headers.get("host")
    if not sent or not host:
        return False
    schemes = {request.url.scheme, "https"} if secure else {request.url.scheme}
    return _origin(sent) in {_origin(f"{scheme}://{host}") for scheme in schemes} - {None}


def check_csrf(request: Request, secret: str, sent_token: str | None, secure: bool) -> None:
    """A cookie-authenticated unsafe request: from this origin, with the session's CSRF token (403)."""
    if not same_origin(request, secure):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused: the dashboard's session "
                            "works from its own pages only (API clients send 'Authorization: Bearer <token>')")
    if not auth.csrf_ok(secret, sent_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header: reload the page")


def member(principal: Annotated[auth.Principal, Depends(caller)]) -> auth.Principal:
    """A team's token: worker-pool tokens may lease trials and nothing else."""
    if principal.is_pool:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a worker-pool token may only lease trials")
    return principal


CallerDep = Annotated[auth.Principal, Depends(caller)]
MemberDep = Annotated[auth.Principal, Depends(member)]

# Ids in paths are bounded like the database's integers: a larger one is a 422, not a driver error.
_MAX_ID = 2**31 - 1
StudyId = Annotated[int, Path(ge=1, le=_MAX_ID, description="a study's id")]
TrialNumber = Annotated[int, Path(ge=0, le=_MAX_ID, description="a trial's number within its study")]
JobId = Annotated[int, Path(ge=1, le=_MAX_ID, description="a job's id")]
# A query filter: text the database compares (no NUL, which PostgreSQL's text cannot hold).
QueryText = Annotated[str | None, Query(max_length=1000, pattern=NO_NUL)]
