"""Workers lease trials (and materialise jobs) over HTTP, renew them with heartbeats and post
results with the lease token. A team's token leases its team's work; a worker-pool token, any team's."""

import tarfile
import uuid

from fastapi import APIRouter, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service import dispatch, jobs, presence
from service.db.models import Job
from service.deps import CallerDep, ServicesDep, SessionDep
from service.schemas import JobPublic, LeasePublic, LeaseRequest, TrialPublic, TrialResult
from service.services import Services
from service.studies import trial_public

router = APIRouter(prefix="/leases", tags=["leases"])


@router.post("", response_model=LeasePublic, responses={204: {"description": "no work to run now"}})
def lease(body: LeaseRequest, who: CallerDep, services: ServicesDep, session: SessionDep) -> LeasePublic | Response:
    presence.seen(session, body.worker, who.team_id)
    with services.lock:
        leased = dispatch.next_work(session, services.optuna, services.policy, body.worker, services.clock(),
                                    team_id=who.team_id)
    return leased or Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{token}/heartbeat")
def heartbeat(token: str, who: CallerDep, services: ServicesDep, session: SessionDep) -> dict:
    """Extend the lease; 409 when it is no longer held, or its study was cancelled: stop the work."""
    with services.lock:
        held = dispatch.heartbeat(session, services.optuna, services.policy, token, services.clock())
    expires, name = held.lease_expires_at, held.worker
    presence.seen(session, name, who.team_id)
    return {"expires_at": expires}


@router.post("/{token}/release", response_model=TrialPublic | JobPublic)
def release(token: str, _who: CallerDep, services: ServicesDep, session: SessionDep) -> TrialPublic | JobPublic:
    """Hand back a lease the worker will not run: queued again at once, the attempt not counted."""
    with services.lock:
        row = dispatch.release(session, token)
    return jobs.public(row) if isinstance(row, Job) else trial_public(row)


@router.post("/{token}/result", response_model=TrialPublic | JobPublic)
def post_result(token: str, result: TrialResult, _who: CallerDep, services: ServicesDep,
                session: SessionDep) -> TrialPublic | JobPublic:
    """A trial's objective values, or the reason it (or a job) failed. A job's success is its upload."""
    if (result.values is None) == (result.error is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give exactly one of 'values' or 'error'")
    with services.lock:
        if result.values is not None:
            row = dispatch.complete(session, services.optuna, token, result.values, services.clock())
        else:
            row = dispatch.fail(session, services.optuna, token, result.error, services.clock(), fatal=result.fatal)
    return jobs.public(row) if isinstance(row, Job) else trial_public(row)


def _job_of(services: Services, token: str) -> Job:
    with services.sessions() as session:
        return jobs.held(session, token)


def _finish_upload(services: Services, token: str, tmp, size: int) -> JobPublic:
    """Keep the streamed archive (the caller removes ``tmp`` whatever happens here)."""
    if not tarfile.is_tarfile(tmp):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the upload is not a tar archive")
    with services.sessions() as session, services.lock:
        job = jobs.held(session, token)
        path = jobs.artifact_path(services.settings.resolved_artifact_dir(), job)
        tmp.replace(path)
        return jobs.public(jobs.finish(session, job, path, size, services.clock()))


@router.put("/{token}/artifact", openapi_extra={
    "requestBody": {"required": True, "content": {"application/x-tar": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}})
async def upload_artifact(token: str, request: Request, _who: CallerDep, services: ServicesDep) -> JobPublic:
    """A materialise job's result: the merged model directory as a tar archive (streamed to disk)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-tar":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the archive as application/x-tar")
    await run_in_threadpool(_job_of, services, token)
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
        return await run_in_threadpool(_finish_upload, services, token, tmp, size)
    finally:
        tmp.unlink(missing_ok=True)
