"""Workers lease trials (and materialise jobs) over HTTP, renew them with heartbeats and post
results with the lease token. A team's token leases its team's work; a worker-pool token, any team's.

The lease token travels in the ``X-Lease-Token`` header to ``/leases/current/...``, so it stays
out of URLs and access logs, and only the API token that leased the work may use it: with any
other, a lease answers 409 exactly as a stale one. ``/leases/{token}/...`` (the token in the
path) still works for older workers, under the same rule, and is deprecated.
"""

import tarfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service import dispatch, jobs, presence
from service.auth import Principal
from service.db.models import Job
from service.deps import CallerDep, ServicesDep, SessionDep
from service.lease_source import Cost
from service.schemas import (
    HeartbeatRequest,
    JobPublic,
    LeasePublic,
    LeaseRenewal,
    LeaseRequest,
    TrialPublic,
    TrialResult,
)
from service.services import Services
from service.studies import trial_public

router = APIRouter(prefix="/leases", tags=["leases"])

LEASE_TOKEN_HEADER = "X-Lease-Token"
LeaseToken = Annotated[str, Header(alias=LEASE_TOKEN_HEADER, min_length=1, max_length=200,
                                   description="the token of the lease, as `POST /leases` returned it")]
_DEPRECATED = "Deprecated: the lease token in the path ends up in access logs; use `{0}` with the " \
    f"`{LEASE_TOKEN_HEADER}` header."
_TAR_BODY = {"requestBody": {"required": True, "content": {"application/x-tar": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}}}


@router.post("", response_model=LeasePublic, responses={204: {"description": "no work to run now"}})
def lease(body: LeaseRequest, who: CallerDep, services: ServicesDep, session: SessionDep) -> LeasePublic | Response:
    presence.seen(session, body.worker, who.token_id, who.team_id, memory=body.memory)
    with services.lock:
        leased = dispatch.next_work(session, services.optuna, services.policy, body.worker, services.clock(),
                                    holder=who.token_id, team_id=who.team_id)
    return leased or Response(status_code=status.HTTP_204_NO_CONTENT)


def _heartbeat(token: str, body: HeartbeatRequest | None, who: Principal, services: Services,
               session) -> LeaseRenewal:
    # No process lock around a renewal: it must not wait behind a long ask (see dispatch.heartbeat).
    held = dispatch.heartbeat(session, services.optuna, services.policy, token, who.token_id, services.clock(),
                              lock=services.lock)
    expires, name = held.lease_expires_at, held.worker
    presence.seen(session, name, who.token_id, who.team_id, memory=body.memory if body else None)
    return LeaseRenewal(expires_at=expires)


def _release(token: str, who: Principal, services: Services, session) -> TrialPublic | JobPublic:
    with services.lock:
        row = dispatch.release(session, services.optuna, token, who.token_id, services.clock())
    return jobs.public(row) if isinstance(row, Job) else trial_public(row)


def _result(token: str, result: TrialResult, who: Principal, services: Services, session) -> TrialPublic | JobPublic:
    if (result.values is None) == (result.error is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give exactly one of 'values' or 'error'")
    with services.lock:
        if result.values is not None:
            row = dispatch.complete(session, services.optuna, token, who.token_id, result.values, services.clock(),
                                    cost=Cost(result.items, result.eval_seconds))
        else:
            row = dispatch.fail(session, services.optuna, token, who.token_id, result.error, services.clock(),
                                fatal=result.fatal, load_failure=result.load_failure)
    return jobs.public(row) if isinstance(row, Job) else trial_public(row)


def _job_of(services: Services, token: str, holder: int) -> Job:
    with services.sessions() as session:
        return jobs.held(session, token, holder)


def _finish_upload(services: Services, token: str, holder: int, tmp: Path, size: int) -> JobPublic:
    """Keep the streamed archive (the caller removes ``tmp`` whatever happens here)."""
    if not tarfile.is_tarfile(tmp):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the upload is not a tar archive")
    with services.sessions() as session, services.lock:
        job = jobs.held(session, token, holder)
        path = jobs.artifact_path(services.settings.resolved_artifact_dir(), job)
        tmp.replace(path)
        return jobs.public(jobs.finish(session, job, path, size, services.clock()))


async def _upload(token: str, request: Request, who: Principal, services: Services) -> JobPublic:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-tar":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the archive as application/x-tar")
    await run_in_threadpool(_job_of, services, token, who.token_id)
    limit = services.settings.max_upload_bytes
    tmp = services.settings.resolved_artifact_dir() / f".upload-{uuid.uuid4().hex}"
    size = 0
    try:
        with tmp.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"archive larger than {limit} bytes "
                                        "(MMMO_MAX_UPLOAD_BYTES)")
                await run_in_threadpool(out.write, chunk)
        return await run_in_threadpool(_finish_upload, services, token, who.token_id, tmp, size)
    finally:
        tmp.unlink(missing_ok=True)


# The header routes come before the deprecated path routes: "current" is not a lease token.

@router.post("/current/heartbeat")
def heartbeat(token: LeaseToken, who: CallerDep, services: ServicesDep, session: SessionDep,
              body: HeartbeatRequest | None = None) -> LeaseRenewal:
    """Extend the lease; 409 when it is no longer held (or not by this API token), or its study
    was cancelled: stop the work. The body (optional) updates what the workers page shows."""
    return _heartbeat(token, body, who, services, session)


@router.post("/current/release", response_model=TrialPublic | JobPublic)
def release(token: LeaseToken, who: CallerDep, services: ServicesDep, session: SessionDep) -> TrialPublic | JobPublic:
    """Hand back a lease the worker will not run: queued again at once, the attempt not counted."""
    return _release(token, who, services, session)


@router.post("/current/result", response_model=TrialPublic | JobPublic)
def post_result(token: LeaseToken, result: TrialResult, who: CallerDep, services: ServicesDep,
                session: SessionDep) -> TrialPublic | JobPublic:
    """A trial's objective values, or the reason it (or a job) failed. A job's success is its upload."""
    return _result(token, result, who, services, session)


@router.put("/current/artifact", openapi_extra=_TAR_BODY)
async def upload_artifact(token: LeaseToken, request: Request, who: CallerDep, services: ServicesDep) -> JobPublic:
    """A materialise job's result: the merged model directory as a tar archive (streamed to disk)."""
    return await _upload(token, request, who, services)


@router.post("/{token}/heartbeat", deprecated=True, description=_DEPRECATED.format("POST /leases/current/heartbeat"))
def heartbeat_by_path(token: str, who: CallerDep, services: ServicesDep, session: SessionDep,
                      body: HeartbeatRequest | None = None) -> LeaseRenewal:
    return _heartbeat(token, body, who, services, session)


@router.post("/{token}/release", response_model=TrialPublic | JobPublic, deprecated=True,
             description=_DEPRECATED.format("POST /leases/current/release"))
def release_by_path(token: str, who: CallerDep, services: ServicesDep, session: SessionDep) -> TrialPublic | JobPublic:
    return _release(token, who, services, session)


@router.post("/{token}/result", response_model=TrialPublic | JobPublic, deprecated=True,
             description=_DEPRECATED.format("POST /leases/current/result"))
def post_result_by_path(token: str, result: TrialResult, who: CallerDep, services: ServicesDep,
                        session: SessionDep) -> TrialPublic | JobPublic:
    return _result(token, result, who, services, session)


@router.put("/{token}/artifact", openapi_extra=_TAR_BODY, deprecated=True,
            description=_DEPRECATED.format("PUT /leases/current/artifact"))
async def upload_artifact_by_path(token: str, request: Request, who: CallerDep, services: ServicesDep) -> JobPublic:
    return await _upload(token, request, who, services)
