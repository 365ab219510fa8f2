from typing import Literal

import yaml
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from merging.config import MergeConfig
from merging.errors import MergeError
from merging.mergekit_yaml import to_mergekit
from search.spec import StudySpec, parse_spec_text
from service import jobs, studies
from service.auth import Principal
from service.db.models import Study, Trial
from service.deps import MemberDep, QueryText, ServicesDep, SessionDep, StudyId, TrialNumber
from service.schemas import (
    HypervolumePoint,
    JobPublic,
    MaterializeRequest,
    ParetoPublic,
    StudyDetail,
    StudyPublic,
    TrialPublic,
)
from service.specs import spec_of
from service.validation import SpecPolicy

router = APIRouter(prefix="/studies", tags=["studies"])


def _found(session, study_id: int, who: Principal) -> Study:
    """The caller's team's study; another team's answers exactly as a missing one."""
    study = studies.get_study(session, study_id, who.team_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    return study


def _trial(study: Study, number: int) -> Trial:
    trial = studies.get_trial(study, number)
    if trial is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study.id} has no trial {number}")
    return trial


@router.post("", status_code=status.HTTP_201_CREATED)
def create_study(spec: StudySpec, who: MemberDep, services: ServicesDep, session: SessionDep) -> StudyPublic:
    with services.lock:
        study = studies.create_study(session, services.optuna, services.catalog, spec,
                                     team_id=who.team_id, created_by=who.user, now=services.clock(),
                                     policy=SpecPolicy.from_settings(services.settings))
    return studies.study_public(study)


@router.post("/yaml", status_code=status.HTTP_201_CREATED, openapi_extra={
    "requestBody": {"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}}})
async def create_study_from_yaml(request: Request, who: MemberDep, services: ServicesDep) -> StudyPublic:
    """The same as ``POST /studies`` with the spec as YAML (or JSON) text, as the dashboard's form sends it.
    No YAML aliases (``*name``), at most ``search.spec.MAX_SPEC_BYTES``."""
    body = await request.body()

    def create() -> StudyPublic:
        try:
            data = parse_spec_text(body.decode())
        except ValueError as exc:  # bad YAML, too large, aliases; UnicodeDecodeError is one too
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        if not isinstance(data, dict):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the spec must be a mapping of fields")
        try:
            spec = StudySpec.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        with services.sessions() as session:
            return create_study(spec, who, services, session)

    return await run_in_threadpool(create)


@router.get("")
def list_studies(who: MemberDep, session: SessionDep, status: QueryText = None, method: QueryText = None,
                 model: QueryText = None, q: QueryText = None) -> list[StudyPublic]:
    """The team's study history; filter by status, method, a model path fragment, or free text."""
    found = studies.list_studies(session, who.team_id, status=status, method=method, model=model, text=q)
    counts = studies.state_counts(session, [s.id for s in found])
    return [studies.study_public(s, counts[s.id]) for s in found]


@router.post("/{study_id}/cancel")
def cancel_study(study_id: StudyId, who: MemberDep, services: ServicesDep, session: SessionDep) -> StudyPublic:
    """No new leases from now; trials being run stop at their worker's next heartbeat."""
    with services.lock:
        study = studies.cancel_study(session, services.optuna, _found(session, study_id, who), services.clock())
    return studies.study_public(study)


@router.delete("/{study_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_study(study_id: StudyId, who: MemberDep, services: ServicesDep, session: SessionDep) -> None:
    with services.lock:
        studies.delete_study(session, services.optuna, _found(session, study_id, who))


@router.post("/{study_id}/clone", status_code=status.HTTP_201_CREATED)
def clone_study(study_id: StudyId, who: MemberDep, services: ServicesDep, session: SessionDep) -> StudyPublic:
    """A new study with the same spec (its evaluated configurations come from the results cache)."""
    return create_study(spec_of(_found(session, study_id, who)), who, services, session)


@router.get("/{study_id}")
def get_study(study_id: StudyId, who: MemberDep, session: SessionDep) -> StudyDetail:
    return studies.study_detail(_found(session, study_id, who))


@router.get("/{study_id}/trials")
def list_trials(study_id: StudyId, who: MemberDep, session: SessionDep) -> list[TrialPublic]:
    return [studies.trial_public(t) for t in _found(session, study_id, who).trials]


@router.get("/{study_id}/trials/{number}")
def get_trial(study_id: StudyId, number: TrialNumber, who: MemberDep, session: SessionDep) -> TrialPublic:
    return studies.trial_public(_trial(_found(session, study_id, who), number))


@router.get("/{study_id}/pareto")
def get_pareto(study_id: StudyId, who: MemberDep, services: ServicesDep, session: SessionDep) -> ParetoPublic:
    study = _found(session, study_id, who)
    key = ("pareto", *studies.results_version(session, study))
    return services.derived.get_or_compute(key, lambda: studies.pareto(study))


@router.get("/{study_id}/hypervolume")
def get_hypervolume_history(study_id: StudyId, who: MemberDep, services: ServicesDep,
                            session: SessionDep) -> list[HypervolumePoint]:
    study = _found(session, study_id, who)
    key = ("hypervolume", *studies.results_version(session, study))
    return services.derived.get_or_compute(key, lambda: studies.hypervolume_history(study))


class YamlResponse(PlainTextResponse):
    media_type = "application/yaml"


@router.get("/{study_id}/trials/{number}/export", response_class=YamlResponse, responses={200: {
    "description": "a YAML mapping: mergekit's config (`format=mergekit`) or our merge config (`format=spec`)",
    "content": {"application/yaml": {"schema": {"type": "object"}}}}})
def export_trial(study_id: StudyId, number: TrialNumber, who: MemberDep, session: SessionDep,
                 format: Literal["spec", "mergekit"] = "mergekit") -> PlainTextResponse:
    """A trial as mergekit YAML (methods mergekit has; OBIM is written for mmmo) or as our merge config."""
    config = MergeConfig.from_dict(_trial(_found(session, study_id, who), number).merge_config)
    if format == "spec":
        return PlainTextResponse(yaml.safe_dump(config.to_dict(), sort_keys=False), media_type="application/yaml")
    try:
        return PlainTextResponse(to_mergekit(config), media_type="application/yaml")
    except MergeError as exc:  # this trial has no mergekit form: the format asked for is the problem
        raise RequestValidationError([{"loc": ("query", "format"), "msg": str(exc), "type": "value_error"}]) from None


@router.post("/{study_id}/trials/{number}/materialize", status_code=status.HTTP_202_ACCEPTED)
def materialize_trial(study_id: StudyId, number: TrialNumber, who: MemberDep, session: SessionDep,
                      body: MaterializeRequest | None = None) -> JobPublic:
    """Queue a job: a worker writes the trial's merged model; download it from the job when done."""
    study = _found(session, study_id, who)
    _trial(study, number)
    options = body.model_dump(exclude_none=True) if body else {}
    return jobs.public(jobs.request(session, study, number, options, who.user))


@router.get("/{study_id}/jobs")
def list_jobs(study_id: StudyId, who: MemberDep, session: SessionDep) -> list[JobPublic]:
    return [jobs.public(j) for j in jobs.list_for_study(session, _found(session, study_id, who).id)]
