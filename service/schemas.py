"""API shapes (pydantic at the edge). The request body for a new study is ``search.spec.StudySpec``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    error: str | None = Field(default=None, description="why the study failed, when it cannot run at all")
    method: str
    budget: int
    created_at: datetime
    finished_at: datetime | None
    created_by: str | None = None
    base: str
    experts: list[str]
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
    model_config = ConfigDict(extra="forbid")

    worker: str = Field(min_length=1, max_length=200)


class LeasePublic(BaseModel):
    kind: Literal["trial", "materialize"] = Field(
        default="trial", description="a trial to score, or a trial's model to write and upload as a job")
    token: str
    study_id: int
    trial_number: int
    job_id: int | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="a job's options (e.g. dtype)")
    merge_config: dict[str, Any]
    objectives: list[dict[str, Any]]
    task_paths: list[str] = Field(default_factory=list, description="lm-eval YAML directories of the study")
    expires_at: datetime
    lease_seconds: float


class JobPublic(BaseModel):
    id: int
    study_id: int
    trial_number: int
    kind: str
    state: str
    worker: str | None
    size_bytes: int | None
    error: str | None
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None
    download: str | None = Field(description="where the finished model's tar archive is served")


class MaterializeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class TrialResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, float] | None = None
    error: str | None = Field(default=None, max_length=10_000)
    fatal: bool = Field(default=False, description="with an error: the study itself cannot run (e.g. its "
                        "checkpoints are incompatible); it fails with this reason and leases no more trials")


class WorkerTask(BaseModel):
    kind: Literal["trial", "materialize"]
    study_id: int
    trial_number: int
    since: datetime | None
    lease_expires_at: datetime | None


class WorkerPublic(BaseModel):
    name: str
    pool: bool = Field(description="a worker-pool worker (serves every team)")
    status: Literal["busy", "idle", "gone"]
    first_seen_at: datetime
    last_seen_at: datetime = Field(description="last lease request, heartbeat or result")
    running: list[WorkerTask]
