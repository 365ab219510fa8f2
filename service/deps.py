"""Typed dependencies for the routes: the services, a session, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import auth
from service.services import Services

SESSION_COOKIE = "mmmo_session"
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
    """The token's owner. The dashboard sends the token in its HttpOnly session cookie instead."""
    secret = credentials.credentials if credentials else request.cookies.get(SESSION_COOKIE)
    if not secret:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    with services.sessions() as session:
        principal = auth.authenticate(session, secret)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


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
