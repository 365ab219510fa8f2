"""What a worker leases and where from: a ``Lease``, the ``LeaseSource`` it comes from (over HTTP:
``client.HttpLeaseSource``; in process: ``local.LocalLeaseSource``), and the errors a source raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class LeaseLost(Exception):
    """The lease is no longer held (expired, re-leased, finished, study stopped): abandon the work
    and post nothing."""


class Refused(Exception):
    """The server refused a report for a reason other than a lost lease (a malformed result)."""


class Transient(OSError):
    """The server could not answer now (a 5xx: restarting behind a proxy, overloaded): try again.
    An ``OSError``, like an unreachable server, so every caller that retries those retries this."""


@dataclass(frozen=True)
class Cost:
    """What scoring a trial took: lm-eval items evaluated and seconds spent evaluating them."""

    items: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Lease:
    """A piece of work as a worker sees it (the API's ``LeasePublic``)."""

    token: str
    study_id: int
    trial_number: int
    merge_config: dict[str, Any]
    lease_seconds: float
    kind: str = "trial"  # or "materialize"
    objectives: list[dict[str, Any]] = field(default_factory=list)
    task_paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    window: dict[str, tuple[int, int]] | None = None  # multi-fidelity: per task, the items to score

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Lease:
        return cls(token=data["token"], study_id=data["study_id"], trial_number=data["trial_number"],
                   merge_config=data["merge_config"], lease_seconds=float(data["lease_seconds"]),
                   kind=data.get("kind", "trial"), objectives=list(data.get("objectives", [])),
                   task_paths=list(data.get("task_paths", [])), options=dict(data.get("options") or {}),
                   window={t: tuple(w) for t, w in data["window"].items()} if data.get("window") else None)


class LeaseSource(Protocol):
    """Where a worker gets work and reports it. Transient trouble (server unreachable, a 5xx)
    raises ``OSError`` (``Transient`` for a 5xx); a lost lease ``LeaseLost``; any other refusal ``Refused``.

    ``memory``: the worker's memory plan of the last models it loaded (one line, None before any),
    for the workers page. ``fatal``: the study cannot run at all; ``load_failure``: the worker
    could not load the study's models (a few identical ones fail the study)."""

    def lease(self, worker: str, *, memory: str | None = None) -> Lease | None: ...
    def heartbeat(self, token: str, *, memory: str | None = None) -> None: ...
    def complete(self, token: str, values: dict[str, float], cost: Cost | None = None) -> None: ...
    def fail(self, token: str, error: str, *, fatal: bool = False, load_failure: bool = False) -> None: ...
    def release(self, token: str) -> None: ...
    def upload(self, token: str, archive: Path) -> None: ...
