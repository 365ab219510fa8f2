"""Server-sent events: a study's trials as they finish, read from the database.

Polling the database (not an in-process queue) keeps every server of a team deployment able
to serve any client: whichever server told Optuna, all of them see the rows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import studies
from service.deps import MemberDep, ServicesDep, StudyId
from service.services import Services
from service.states import StudyStatus

router = APIRouter(prefix="/studies", tags=["studies"])
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def _snapshot(services: Services, study_id: int, team_id: int) -> tuple[str, dict[int, dict]] | None:
    with services.sessions() as session:
        study = studies.get_study(session, study_id, team_id)
        if study is None:
            return None
        return study.status, {t.number: studies.trial_public(t).model_dump(mode="json") for t in study.trials}


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _stream(services: Services, study_id: int, team_id: int, poll: float) -> AsyncIterator[str]:
    sent: dict[int, str] = {}
    last_status = None
    idle = 0.0
    yield "retry: 2000\n\n"
    while True:
        snapshot = await run_in_threadpool(_snapshot, services, study_id, team_id)
        if snapshot is None:
            yield _event("deleted", {"study": study_id})
            return
        status_now, trials = snapshot
        for number, trial in sorted(trials.items()):
            if sent.get(number) != trial["state"]:
                sent[number] = trial["state"]
                idle = 0.0
                yield _event("trial", trial)
        if status_now != last_status:
            last_status = status_now
            yield _event("study", {"study": study_id, "status": status_now})
            if status_now != StudyStatus.RUNNING:
                return
        await asyncio.sleep(poll)
        idle += poll
        if idle >= KEEPALIVE_SECONDS:
            idle = 0.0
            yield ": keep-alive\n\n"


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


def _event_schema(kind: str, data: dict) -> dict:
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": kind},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}}}


# One event of the stream (OpenAPI before 3.2 has the schema of an event stream describe each event).
EVENT_SCHEMA = {"type": "object", "oneOf": [
    _event_schema("trial", {"$ref": "#/components/schemas/TrialPublic"}),
    _event_schema("study", {"type": "object", "required": ["study", "status"],
                            "properties": {"study": {"type": "integer"}, "status": {"type": "string"}}}),
    _event_schema("deleted", {"type": "object", "required": ["study"], "properties": {"study": {"type": "integer"}}}),
]}


@router.get("/{study_id}/events", response_class=EventStream, responses={200: {
    "description": "server-sent events: `trial` (a trial, as `GET .../trials/{number}` shows it) when a trial "
                   "changes state, `study` (`{study, status}`) when the study does, `deleted`; the stream ends "
                   "when the study stops running", "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}}})
async def study_events(study_id: StudyId, who: MemberDep, services: ServicesDep) -> StreamingResponse:
    """``trial`` events (a trial's state changed), ``study`` events (status); ends when the study does."""
    if await run_in_threadpool(_snapshot, services, study_id, who.team_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    return StreamingResponse(_stream(services, study_id, who.team_id, POLL_SECONDS), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
