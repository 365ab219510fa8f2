"""Workers lease trials (and materialise jobs) over HTTP, renew them with heartbeats and post
results with the lease token. A team's token leases its team's work; a worker-pool token, any team's."""

import tarfile
import uuid

from fastapi import APIRouter, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service import jobs, queue, workers
from service.db.models import Job
from service.deps import CallerDep, ServicesDep, SessionDep
from service.schemas import JobPublic, LeasePublic, LeaseRequest, TrialPublic, TrialResult
from service.services import Services
from service.studies import get_trial, trial_public

router = APIRouter(prefix="/leases", tags=["leases"])


def _stale(exc: queue.StaleLease) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.post("", response_model=LeasePublic, responses={204: {"description": "no work to run now"}})
def lease(body: LeaseRequest, who: CallerDep, services: ServicesDep, session: SessionDep) -> LeasePublic | Response:
    workers.seen(session, body.worker, who.team_id)
    with services.lock:
        job = jobs.lease(session, services.policy, body.worker, who.team_id)
        if job is not None:
            trial = get_trial(job.study, job.trial_number)
            return LeasePublic(kind="materialize", token=job.lease_token, study_id=job.study_id,
                               trial_number=job.trial_number, job_id=job.id, options=job.options,
                               merge_config=trial.merge_config, objectives=[], expires_at=job.lease_expires_at,
                               lease_seconds=services.policy.lease_seconds)
        leased = queue.lease_next(session, services.optuna, services.policy, body.worker, team_id=who.team_id)
    if leased is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    t = leased.trial
    return LeasePublic(token=t.lease_token, study_id=t.study_id, trial_number=t.number, merge_config=t.merge_config,
                       objectives=leased.objectives, task_paths=leased.task_paths, expires_at=t.lease_expires_at,
                       lease_seconds=services.policy.lease_seconds)


@router.post("/{token}/heartbeat")
def heartbeat(token: str, who: CallerDep, services: ServicesDep, session: SessionDep) -> dict:
    """Extend the lease; 409 when it is no longer held, or its study was cancelled: stop the work."""
    try:
        with services.lock:
            held = jobs.held(session, token)
            if held is not None:
                jobs.heartbeat(session, services.policy, held)
            else:
                held = queue.heartbeat(session, services.optuna, services.policy, token)
    except queue.StaleLease as exc:
        raise _stale(exc) from None
    expires, name = held.lease_expires_at, held.worker
    workers.seen(session, name, who.team_id)
    return {"expires_at": expires}


@router.post("/{token}/release")
def release(token: str, _who: CallerDep, services: ServicesDep, session: SessionDep) -> TrialPublic:
    try:
        with services.lock:
            trial = queue.release(session, token)
    except queue.StaleLease as exc:
        raise _stale(exc) from None
    return trial_public(trial)


@router.post("/{token}/result", response_model=TrialPublic | JobPublic)
def post_result(token: str, result: TrialResult, _who: CallerDep, services: ServicesDep,
                session: SessionDep) -> TrialPublic | JobPublic:
    """A trial's objective values, or the reason it (or a job) failed. A job's success is its upload."""
    if (result.values is None) == (result.error is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give exactly one of 'values' or 'error'")
    try:
        with services.lock:
            job = jobs.held(session, token)
            if job is not None:
                if result.error is None:
                    raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                        "a materialise job reports success by uploading its archive")
                return jobs.public(jobs.fail(session, job, result.error))
            if result.values is not None:
                trial = queue.complete(session, services.optuna, token, result.values)
            else:
                trial = queue.fail(session, services.optuna, token, result.error)
    except queue.StaleLease as exc:
        raise _stale(exc) from None
    except queue.BadResult as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return trial_public(trial)


def _job_of(services: Services, token: str) -> Job:
    with services.sessions() as session:
        return jobs.held_or_stale(session, token)


def _finish_upload(services: Services, token: str, tmp, size: int) -> JobPublic:
    """Keep the streamed archive (the caller removes ``tmp`` whatever happens here)."""
    if not tarfile.is_tarfile(tmp):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the upload is not a tar archive")
    with services.sessions() as session, services.lock:
        job = jobs.held_or_stale(session, token)
        path = jobs.artifact_path(services.settings.resolved_artifact_dir(), job)
        tmp.replace(path)
        return jobs.public(jobs.finish(session, job, path, size))


@router.put("/{token}/artifact", openapi_extra={
    "requestBody": {"required": True, "content": {"application/x-tar": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}})
async def upload_artifact(token: str, request: Request, _who: CallerDep, services: ServicesDep) -> JobPublic:
    """A materialise job's result: the merged model directory as a tar archive (streamed to disk)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-tar":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the archive as application/x-tar")
    try:
        await run_in_threadpool(_job_of, services, token)
    except queue.StaleLease as exc:
        raise _stale(exc) from None
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
    except queue.StaleLease as exc:
        raise _stale(exc) from None
    finally:
        tmp.unlink(missing_ok=True)
