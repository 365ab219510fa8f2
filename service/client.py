"""A small typed client of the HTTP API, used by the demo and the CLI, and the workers' lease
source over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.lease_source import Cost, Lease, LeaseLost, Refused, Transient
from service.schemas import MAX_MEMORY_SUMMARY

LEASE_TOKEN_HEADER = "X-Lease-Token"  # the lease routes read the lease token from it, not from the URL


class ServerUnreachable(ConnectionError):
    """The server could not be reached (down, restarting, network): an OSError, so callers retry."""


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text
    if isinstance(detail, list):  # a 422's problems; a problem of the whole body has no field to name
        named = (('.'.join(str(p) for p in d.get('loc', [])[1:]), d.get('msg')) for d in detail)
        return "; ".join(f"{field}: {msg}" if field else str(msg) for field, msg in named)
    return str(detail)


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return None if response.status_code == 204 else response.json()

    def create_study(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/studies", json=spec)

    def list_studies(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/studies")

    def study(self, study_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/studies/{study_id}")

    def pareto(self, study_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/studies/{study_id}/pareto")

    def hypervolume(self, study_id: int) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/v1/studies/{study_id}/hypervolume")

    def export(self, study_id: int, number: int, fmt: str = "mergekit") -> str:
        response = self.http.get(f"/api/v1/studies/{study_id}/trials/{number}/export", params={"format": fmt})
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return response.text

    def trials(self, study_id: int) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/v1/studies/{study_id}/trials")

    def cancel(self, study_id: int) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/studies/{study_id}/cancel")

    def materialize(self, study_id: int, number: int, dtype: str | None = None) -> dict[str, Any]:
        body = {"dtype": dtype} if dtype else {}
        return self._call("POST", f"/api/v1/studies/{study_id}/trials/{number}/materialize", json=body)

    def job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}")

    def download(self, job_id: int, out: Path) -> Path:
        """Stream a finished job's archive to ``out``."""
        with self.http.stream("GET", f"/api/v1/jobs/{job_id}/download") as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, _message(response))
            with out.open("wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
        return out

    def materialize_into(self, study_id: int, number: int, out: Path, dtype: str | None = None, *,
                         poll_seconds: float = 1.0,
                         on_queued: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Have a worker write a trial's model (a job), wait for it, and unpack its archive into
        ``out``; returns the finished job."""
        import tarfile
        import tempfile
        import time

        from service.states import PENDING_JOB, JobState

        if out.exists() and any(out.iterdir()):
            raise ValueError(f"output directory '{out}' exists and is not empty")
        job = self.materialize(study_id, number, dtype)
        if on_queued:
            on_queued(job)
        while job["state"] in PENDING_JOB:
            time.sleep(poll_seconds)
            job = self.job(job["id"])
        if job["state"] != JobState.DONE:
            raise RuntimeError(f"job {job['id']} failed: {job['error']}")
        with tempfile.TemporaryDirectory() as tmp:
            archive = self.download(job["id"], Path(tmp) / "model.tar")
            out.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(out, filter="data")
        return job

    def upload_artifact(self, token: str, archive: Path) -> dict[str, Any]:
        def chunks():
            with archive.open("rb") as f:
                while block := f.read(1 << 20):
                    yield block

        return self._call("PUT", "/api/v1/leases/current/artifact", content=chunks(),
                          headers={"Content-Type": "application/x-tar", LEASE_TOKEN_HEADER: token})

    def lease(self, worker: str, *, memory: str | None = None) -> dict[str, Any] | None:
        body = {"worker": worker} | ({"memory": memory[:MAX_MEMORY_SUMMARY]} if memory else {})
        return self._call("POST", "/api/v1/leases", json=body)

    def heartbeat(self, token: str, *, memory: str | None = None) -> dict[str, Any]:
        body = {"memory": memory[:MAX_MEMORY_SUMMARY]} if memory else None
        return self._call("POST", "/api/v1/leases/current/heartbeat", json=body, headers={LEASE_TOKEN_HEADER: token})

    def complete(self, token: str, values: dict[str, float], cost: Cost | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"values": values}
        if cost is not None:
            body |= {"items": cost.items, "eval_seconds": cost.seconds}
        return self._call("POST", "/api/v1/leases/current/result", json=body, headers={LEASE_TOKEN_HEADER: token})

    def release(self, token: str) -> dict[str, Any]:
        return self._call("POST", "/api/v1/leases/current/release", headers={LEASE_TOKEN_HEADER: token})

    def fail(self, token: str, error: str, *, fatal: bool = False, load_failure: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"error": error[:10_000]}
        if fatal:
            body["fatal"] = True
        if load_failure:
            body["load_failure"] = True
        return self._call("POST", "/api/v1/leases/current/result", json=body, headers={LEASE_TOKEN_HEADER: token})


class HttpLeaseSource:
    """``worker.LeaseSource`` over the API: 409 and 404 mean the lease was lost; a 5xx (a
    restarting server behind a proxy answers 502 or 503) is ``Transient``, worth retrying."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def _call(self, call, *args, **kwargs) -> Any:
        try:
            return call(*args, **kwargs)
        except ApiError as exc:
            if exc.status >= 500:
                raise Transient(str(exc)) from exc
            raise (LeaseLost if exc.status in (404, 409) else Refused)(str(exc)) from exc

    def lease(self, worker: str, *, memory: str | None = None) -> Lease | None:
        data = self._call(self.client.lease, worker, memory=memory)
        return None if data is None else Lease.from_api(data)

    def heartbeat(self, token: str, *, memory: str | None = None) -> None:
        self._call(self.client.heartbeat, token, memory=memory)

    def complete(self, token: str, values: dict[str, float], cost: Cost | None = None) -> None:
        self._call(self.client.complete, token, values, cost)

    def fail(self, token: str, error: str, *, fatal: bool = False, load_failure: bool = False) -> None:
        self._call(self.client.fail, token, error, fatal=fatal, load_failure=load_failure)

    def release(self, token: str) -> None:
        self._call(self.client.release, token)

    def upload(self, token: str, archive: Path) -> None:
        self._call(self.client.upload_artifact, token, archive)
