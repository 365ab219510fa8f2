"""The states of studies, trials and jobs. ``StrEnum`` so rows, JSON and SQL compare them as the
strings the database and the API have always held."""

from __future__ import annotations

from enum import StrEnum


class StudyStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"  # it cannot run at all (e.g. its base is not the experts' ancestor): ``Study.error``


class TrialState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    COMPLETE = "complete"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class TrialOrigin(StrEnum):
    SAMPLER = "sampler"  # asked of the study's sampler: counts against the budget
    WARM_START = "warm_start"  # copied from an earlier study: outside the budget


FINISHED_TRIAL = (TrialState.COMPLETE, TrialState.FAILED)
PENDING_TRIAL = (TrialState.QUEUED, TrialState.LEASED)
PENDING_JOB = (JobState.QUEUED, JobState.LEASED)
