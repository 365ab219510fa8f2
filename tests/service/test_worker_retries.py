"""A worker keeps a result through a server restart: a 5xx (what nginx answers while a replica
restarts) is retried with growing waits, and only a lost lease, or one that ran out, ends it.

The "nginx" is a small ASGI proxy in front of the real app; the worker is the real worker loop
with the real runner on the tiny zoo (a sparsity objective: no lm-eval needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import ApiClient, HttpLeaseSource
from service.runner import TrialRunner
from service.worker import Worker
from tests.conftest import authorize, zoo_spec


class _Gateway:
    """Forwards to ``app``, but answers 502 to the first ``refuse`` requests whose path ends with
    one of ``paths`` (and to every one of them if ``refuse`` is None)."""

    def __init__(self, app, paths: tuple[str, ...], refuse: int | None) -> None:
        self.app, self.state, self.paths, self.refuse = app, app.state, paths, refuse
        self.refused = self.forwarded = 0
        self.refused_results = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(self.paths):
            if self.refuse is None or self.refused < self.refuse:
                self.refused += 1
                self.refused_results += scope["path"].endswith("/result")
                await send({"type": "http.response.start", "status": 502,
                            "headers": [(b"content-type", b"text/html")]})
                await send({"type": "http.response.body", "body": b"<html><h1>502 Bad Gateway</h1></html>"})
                return
            self.forwarded += 1
        await self.app(scope, receive, send)


def _spec(tiny_zoo) -> dict:
    return zoo_spec(tiny_zoo, trials=1) | {"objectives": [{"kind": "sparsity"}]}


def _worker(client: TestClient, cache_dir) -> Worker:
    class _Through(ApiClient):  # the worker's HTTP calls go through the gateway
        def __init__(self) -> None:
            self.http = client

    return Worker(HttpLeaseSource(_Through()), TrialRunner(cache_dir=cache_dir), name="w", prefetch=False,
                  retry_seconds=0.001, max_retry_seconds=0.01)


def test_a_result_refused_with_502_is_posted_again_and_the_trial_runs_once(settings, tiny_zoo, cache_dir):
    gateway = _Gateway(create_app(settings), ("/result",), refuse=3)
    with TestClient(gateway) as client:
        authorize(client)
        study = client.post("/api/v1/studies", json=_spec(tiny_zoo)).json()
        worker = _worker(client, cache_dir)
        assert worker.run_one()
        assert (gateway.refused, gateway.forwarded) == (3, 1)
        trial = client.get(f"/api/v1/studies/{study['id']}/trials/0").json()
        assert (trial["state"], trial["attempts"], trial["worker"]) == ("complete", 1, "w")
        assert trial["values"]["sparsity"] > 0
        assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "done"
        assert not worker.run_one(), "nothing to lease again: the trial was never re-leased"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_worker_gives_up_on_a_result_once_its_lease_ran_out(settings, tiny_zoo, cache_dir):
    """The server answers 502 to everything of the lease (heartbeats too) for longer than the
    lease: the worker stops trying when it runs out instead of forever."""
    settings = settings.model_copy(update={"lease_seconds": 0.5})
    gateway = _Gateway(create_app(settings), ("/result", "/heartbeat"), refuse=None)
    with TestClient(gateway) as client:
        authorize(client)
        study = client.post("/api/v1/studies", json=_spec(tiny_zoo)).json()
        assert _worker(client, cache_dir).run_one()  # returns: the worker gave up
        assert gateway.refused_results >= 1 and gateway.forwarded == 0
        assert client.get(f"/api/v1/studies/{study['id']}/trials/0").json()["state"] == "leased"
