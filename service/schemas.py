"""API shapes (pydantic at the edge). The request body for a new study is ``search.spec.StudySpec``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The database keeps naive UTC; the API's times say so (``...Z``), as the schema's ``date-time`` requires.
UtcDatetime = Annotated[datetime, PlainSerializer(_utc, return_type=datetime, when_used="json")]


# PostgreSQL's text cannot hold a NUL character: a name, message or filter with one is a 422, not a 500.
NO_NUL = r"^[^\x00]*$"
MAX_MEMORY_SUMMARY = 200  # a worker's one-line memory plan (``WorkerSeen.memory``)


class ErrorMessage(BaseModel):  # an error other than a request's validation (a 422: HTTPValidationError)
    detail: str


_ERRORS = {
    400: "the body cannot be read (e.g. JSON that is not UTF-8)",
    401: "missing, invalid or revoked token (or ended dashboard session)",
    403: "a worker-pool token outside leases; a dashboard request from another origin or without its "
         "CSRF token",
    404: "no such resource in the caller's team",
    409: "the lease is no longer held (expired, re-leased, finished, its study stopped), or the job is "
         "not done",
    413: "request body too large",
    415: "wrong content type",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses: JSON ``{"detail": message}`` (whatever the
    operation's own content type), and for 422 FastAPI's ``HTTPValidationError``."""
    message = {"application/json": {"schema": ErrorMessage.model_json_schema()}}
    invalid = {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}
    return {code: {"description": "Validation Error", "content": invalid} if code == 422 else
            {"description": _ERRORS[code], "content": message} for code in codes}


class TrialPublic(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    values: dict[str, float] | None
    error: str | None
    worker: str | None
    attempts: int
    cached: bool = False
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    duration_s: float | None
    items: int | None = Field(default=None, description="lm-eval items its evaluation scored (0: answered "
                              "from the results cache)")
    eval_seconds: float | None = Field(default=None, description="seconds its worker spent scoring them")
    rung: int | None = Field(default=None, description="multi-fidelity: the rung its values were measured at "
                             "(0 the fewest items; only the top rung enters the front)")


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
    method: str | list[str]  # a list: the methods the study searches among
    budget: int
    created_at: UtcDatetime
    finished_at: UtcDatetime | None
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

    worker: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    memory: str | None = Field(default=None, max_length=MAX_MEMORY_SUMMARY, pattern=NO_NUL,
                               description="the worker's memory plan of the last models it loaded, one line "
                               "(e.g. 'resident: base + 3 experts on cpu, 4.6 GiB of 20.0 GiB'), for the workers page")


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: str | None = Field(default=None, max_length=MAX_MEMORY_SUMMARY, pattern=NO_NUL,
                               description="as in the lease request")


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
    expires_at: UtcDatetime
    lease_seconds: float
    rung: int | None = Field(default=None, description="multi-fidelity: the rung to score")
    window: dict[str, Annotated[list[int], Field(min_length=2, max_length=2)]] | None = Field(
        default=None, description="multi-fidelity: per task, the items to score (first, end) in the "
        "objective's fixed item order; None: every item of its subset")


class LeaseRenewal(BaseModel):
    expires_at: UtcDatetime = Field(description="the lease's new expiry: heartbeat again before it")


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
    created_at: UtcDatetime
    finished_at: UtcDatetime | None
    download: str | None = Field(description="where the finished model's tar archive is served")


class MaterializeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class TrialResult(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [  # exactly one of values, error
        {"required": ["values"], "properties": {"values": {"type": "object"}}},
        {"required": ["error"], "properties": {"error": {"type": "string"}}}]})

    values: dict[str, float] | None = None
    error: str | None = Field(default=None, max_length=10_000)
    fatal: bool = Field(default=False, description="with an error: the study itself cannot run (e.g. its "
                        "checkpoints are incompatible); it fails with this reason and leases no more trials")
    load_failure: bool = Field(default=False, description="with an error: the worker could not load the study's "
                               "models; after a few identical such errors the study fails with the reason")
    items: int | None = Field(default=None, ge=0, le=2**31 - 1, description="with values: lm-eval items scored")
    eval_seconds: float | None = Field(default=None, ge=0, le=1e9, description="with values: seconds scoring them")

    @field_validator("error")
    @classmethod
    def _storable(cls, error: str | None) -> str | None:  # a worker's message is kept, whatever it holds
        return error.replace("\x00", "\ufffd") if error else error

    @model_validator(mode="after")
    def _one_outcome(self) -> TrialResult:
        if (self.values is None) == (self.error is None):
            raise ValueError("give exactly one of 'values' or 'error'")
        return self


class WorkerTask(BaseModel):
    kind: Literal["trial", "materialize"]
    study_id: int
    trial_number: int
    since: UtcDatetime | None
    lease_expires_at: UtcDatetime | None


class WorkerPublic(BaseModel):
    name: str
    pool: bool = Field(description="a worker-pool worker (serves every team)")
    status: Literal["busy", "idle", "gone"]
    first_seen_at: UtcDatetime
    last_seen_at: UtcDatetime = Field(description="last lease request, heartbeat or result")
    running: list[WorkerTask]
    memory: str | None = Field(default=None, description="the memory plan of the last models it loaded, as it "
                               "last reported it (None until it loads some)")
