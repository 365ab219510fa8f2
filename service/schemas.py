"""API shapes (pydantic at the edge). The request body for a new study is ``search.spec.StudySpec``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class TrialPublic(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    values: dict[str, float] | None
    error: str | None
    worker: str | None
    attempts: int
    cached: bool = False
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None


class ObjectivePublic(BaseModel):
    key: str
    kind: str
    task: str | None
    metric: str
    direction: str


class StudyPublic(BaseModel):
    id: int
    name: str
    status: str
    method: str
    budget: int
    created_at: datetime
    finished_at: datetime | None
    objectives: list[ObjectivePublic]
    counts: dict[str, int] = Field(description="trials by state")


class StudyDetail(StudyPublic):
    spec: dict[str, Any]
    trials: list[TrialPublic]


class ParetoPublic(BaseModel):
    objectives: list[ObjectivePublic]
    front: list[TrialPublic]
    selected: int | None = Field(description="trial number picked by the spec's selection policy")
    hypervolume: float
    reference: list[float]


class HypervolumePoint(BaseModel):
    trial: int
    hypervolume: float


class LeaseRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=200)


class LeasePublic(BaseModel):
    token: str
    study_id: int
    trial_number: int
    merge_config: dict[str, Any]
    objectives: list[dict[str, Any]]
    task_paths: list[str] = Field(default_factory=list, description="lm-eval YAML directories of the study")
    expires_at: datetime
    lease_seconds: float


class TrialResult(BaseModel):
    values: dict[str, float] | None = None
    error: str | None = Field(default=None, max_length=10_000)
