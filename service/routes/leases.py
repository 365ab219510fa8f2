"""Workers lease trials over HTTP, renew them with heartbeats and post results with the token."""

from fastapi import APIRouter, HTTPException, Response, status

from service import queue
from service.deps import ServicesDep, SessionDep
from service.schemas import LeasePublic, LeaseRequest, TrialPublic, TrialResult
from service.studies import trial_public

router = APIRouter(prefix="/leases", tags=["leases"])


@router.post("", response_model=LeasePublic, responses={204: {"description": "no trial to run now"}})
def lease(body: LeaseRequest, services: ServicesDep, session: SessionDep) -> LeasePublic | Response:
    with services.lock:
        leased = queue.lease_next(session, services.optuna, services.policy, body.worker)
    if leased is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    t = leased.trial
    return LeasePublic(token=t.lease_token, study_id=t.study_id, trial_number=t.number, merge_config=t.merge_config,
                       objectives=leased.objectives, task_paths=leased.task_paths, expires_at=t.lease_expires_at,
                       lease_seconds=services.policy.lease_seconds)


@router.post("/{token}/heartbeat")
def heartbeat(token: str, services: ServicesDep, session: SessionDep) -> dict:
    try:
        with services.lock:
            expires = queue.heartbeat(session, services.policy, token)
    except queue.StaleLease as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return {"expires_at": expires}


@router.post("/{token}/release")
def release(token: str, services: ServicesDep, session: SessionDep) -> TrialPublic:
    try:
        with services.lock:
            trial = queue.release(session, token)
    except queue.StaleLease as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return trial_public(trial)


@router.post("/{token}/result")
def post_result(token: str, result: TrialResult, services: ServicesDep, session: SessionDep) -> TrialPublic:
    if (result.values is None) == (result.error is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give exactly one of 'values' or 'error'")
    try:
        with services.lock:
            if result.values is not None:
                trial = queue.complete(session, services.optuna, token, result.values)
            else:
                trial = queue.fail(session, services.optuna, token, result.error)
    except queue.StaleLease as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except queue.BadResult as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return trial_public(trial)
