from typing import Literal

import yaml
from fastapi import APIRouter, HTTPException, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse

from merging.config import MergeConfig
from merging.errors import MergeError
from merging.mergekit_yaml import to_mergekit
from search.spec import StudySpec
from service import studies
from service.deps import ServicesDep, SessionDep
from service.schemas import HypervolumePoint, ParetoPublic, StudyDetail, StudyPublic

router = APIRouter(prefix="/studies", tags=["studies"])


def _found(session, study_id: int):
    study = studies.get_study(session, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    return study


@router.post("", status_code=status.HTTP_201_CREATED)
def create_study(spec: StudySpec, services: ServicesDep, session: SessionDep) -> StudyPublic:
    try:
        with services.lock:
            study = studies.create_study(session, services.optuna, services.catalog, spec)
    except studies.InvalidSpec as exc:
        raise RequestValidationError(
            [{"loc": ("body", *p.loc), "msg": p.msg, "type": "value_error"} for p in exc.problems]
        ) from None
    return studies.study_public(study)


@router.get("")
def list_studies(session: SessionDep, status: str | None = None, method: str | None = None,
                 model: str | None = None, q: str | None = None) -> list[StudyPublic]:
    """The study history; filter by status, method, a model path fragment, or free text."""
    found = studies.list_studies(session, status=status, method=method, model=model, text=q)
    return [studies.study_public(s) for s in found]


@router.post("/{study_id}/cancel")
def cancel_study(study_id: int, services: ServicesDep, session: SessionDep) -> StudyPublic:
    with services.lock:
        return studies.study_public(studies.cancel_study(session, services.optuna, _found(session, study_id)))


@router.delete("/{study_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_study(study_id: int, services: ServicesDep, session: SessionDep) -> None:
    with services.lock:
        studies.delete_study(session, services.optuna, _found(session, study_id))


@router.post("/{study_id}/clone", status_code=status.HTTP_201_CREATED)
def clone_study(study_id: int, services: ServicesDep, session: SessionDep) -> StudyPublic:
    """A new study with the same spec (its evaluated configurations come from the results cache)."""
    spec = StudySpec.model_validate(_found(session, study_id).spec)
    return create_study(spec, services, session)


@router.get("/{study_id}")
def get_study(study_id: int, session: SessionDep) -> StudyDetail:
    return studies.study_detail(_found(session, study_id))


@router.get("/{study_id}/pareto")
def get_pareto(study_id: int, session: SessionDep) -> ParetoPublic:
    return studies.pareto(_found(session, study_id))


@router.get("/{study_id}/hypervolume")
def get_hypervolume_history(study_id: int, session: SessionDep) -> list[HypervolumePoint]:
    return studies.hypervolume_history(_found(session, study_id))


@router.get("/{study_id}/trials/{number}/export")
def export_trial(study_id: int, number: int, session: SessionDep,
                 format: Literal["spec", "mergekit"] = "mergekit") -> PlainTextResponse:
    """A trial as mergekit YAML (methods mergekit has; OBIM is written for mmmo) or as our merge config."""
    trial = studies.get_trial(_found(session, study_id), number)
    if trial is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} has no trial {number}")
    config = MergeConfig.from_dict(trial.merge_config)
    if format == "spec":
        return PlainTextResponse(yaml.safe_dump(config.to_dict(), sort_keys=False), media_type="application/yaml")
    try:
        return PlainTextResponse(to_mergekit(config), media_type="application/yaml")
    except MergeError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
