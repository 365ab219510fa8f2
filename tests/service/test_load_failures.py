"""A study whose models no worker can load fails early and visibly: each trial fails with the
reason, the study fails after a few identical load failures (not trial after trial until the
budget is spent), and `mmmo study run` prints every reason and exits non-zero."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from evals.tiny_zoo import build_tiny_zoo
from search.spec import StudySpec
from service import cli, local
from service.app import create_app
from service.client import ApiClient, HttpLeaseSource
from service.results import MAX_IDENTICAL_LOAD_FAILURES
from service.runner import TrialRunner
from service.services import Services
from service.worker import Worker
from tests.conftest import authorize, zoo_spec

# What the worker's tokenizer load says of the broken tokenizer.json below (the server's submit-time
# checks read the checkpoints, not the tokenizer, so the study is accepted).
# (The start of it: the path of the tokenizer follows, then the parser's own error.)
REASON = "loading the models failed: ValueError: the tokenizer in '"
STUDY_REASON = f"every worker that tried could not load the models ({MAX_IDENTICAL_LOAD_FAILURES} times): {REASON}"
MEMORY = "resident: base + 2 experts on cpu, 0.1 GiB of 20.0 GiB"


def _break(zoo) -> str:
    """Break the base's tokenizer (as a half-copied checkpoint would be); returns what it held."""
    path = zoo.base / "tokenizer.json"
    whole = path.read_text()
    path.write_text("{ half a tokenizer")
    return whole


def _spec(zoo, trials: int) -> dict:
    return zoo_spec(zoo, trials=trials, samples=4)


def test_a_study_whose_models_cannot_load_fails_after_three_identical_load_failures(settings, tmp_path):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    services = Services.start(settings)
    try:
        study_id = local.create(services, StudySpec.model_validate(_spec(zoo, trials=8)))
        _break(zoo)  # after the submit: what the worker finds is not what the server checked
        final = local.run(services, study_id, TrialRunner(cache_dir=tmp_path / "cache"))
    finally:
        services.close()
    assert final["status"] == "failed"
    assert final["error"].startswith(STUDY_REASON)
    trials = final["trials"]
    assert len(trials) == MAX_IDENTICAL_LOAD_FAILURES, "the study stops leasing at the third identical failure"
    assert all(t["state"] == "failed" and t["error"].startswith(REASON) for t in trials)
    assert all("/base' cannot be loaded: JSONDecodeError: Expecting property name" in t["error"] for t in trials)
    assert final["error"] == f"every worker that tried could not load the models (3 times): {trials[0]['error']}"

    with TestClient(create_app(settings)) as api:  # the API shows the same, to the study's team
        authorize(api, "local")
        shown = api.get(f"/api/v1/studies/{study_id}").json()
        assert shown["status"] == "failed" and shown["error"] == final["error"]
        assert [t["error"] for t in shown["trials"]] == [t["error"] for t in trials]
        assert api.get("/api/v1/studies").json()[0]["error"] == final["error"]


def test_over_http_a_worker_reports_load_failures_and_its_memory_plan(client, tmp_path):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    study = client.post("/api/v1/studies", json=_spec(zoo, trials=8)).json()
    _break(zoo)

    class _Through(ApiClient):  # the worker's HTTP calls go through the test client's app
        def __init__(self) -> None:
            self.http = client

    class _Loaded(TrialRunner):  # a worker that loaded another study's models before
        @property
        def placement_summary(self) -> str:
            return MEMORY

        @placement_summary.setter
        def placement_summary(self, _value) -> None:
            pass

    runner = _Loaded(cache_dir=tmp_path / "cache")
    Worker(HttpLeaseSource(_Through()), runner, name="gpu-box-3", prefetch=False).run(threading.Event(),
                                                                                       until_idle=True)
    shown = client.get(f"/api/v1/studies/{study['id']}").json()
    assert shown["status"] == "failed" and shown["error"].startswith(STUDY_REASON)
    assert len(shown["trials"]) == 3
    assert all(t["state"] == "failed" and t["error"].startswith(REASON) for t in shown["trials"])
    worker = next(w for w in client.get("/api/v1/workers").json() if w["name"] == "gpu-box-3")
    assert worker["memory"] == MEMORY


def test_different_load_failures_and_other_failures_do_not_add_up(client, tiny_zoo):
    study = client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=12)).json()

    def fail(error: str, **flags) -> None:
        lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
        assert client.post(f"/api/v1/leases/{lease['token']}/result", json={"error": error, **flags}).status_code == 200

    fail("loading the models failed: OSError: /models/a is missing", load_failure=True)
    fail("loading the models failed: OSError: /models/a is missing", load_failure=True)
    fail("loading the models failed: OSError: /models/b is missing", load_failure=True)  # another machine's
    fail("loading the models failed: OSError: /models/a is missing")  # the same text, not a load failure
    assert client.get(f"/api/v1/studies/{study['id']}").json()["status"] == "running"
    fail("loading the models failed: OSError: /models/a is missing", load_failure=True)
    shown = client.get(f"/api/v1/studies/{study['id']}").json()
    assert shown["status"] == "failed"
    assert shown["error"] == ("every worker that tried could not load the models (3 times): "
                              "loading the models failed: OSError: /models/a is missing")
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204


def test_lease_requests_and_heartbeats_carry_the_memory_plan_to_the_workers_page(client, tiny_zoo):
    client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=4))

    def memory_of(name: str) -> str | None:
        return next(w for w in client.get("/api/v1/workers").json() if w["name"] == name)["memory"]

    idle = client.post("/api/v1/leases", json={"worker": "w", "memory": "x" * 201})
    assert idle.status_code == 422
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert memory_of("w") is None, "none until the worker reports one"
    beat = "/api/v1/leases/current/heartbeat"
    headers = {"X-Lease-Token": lease["token"]}
    assert client.post(beat, headers=headers).status_code == 200  # no body: as older workers renew
    assert client.post(beat, headers=headers, json={"memory": MEMORY}).status_code == 200
    assert memory_of("w") == MEMORY, "a new plan is recorded at once, however recent the last call"
    assert client.post(beat, headers=headers, json={"memory": "a\x00b"}).status_code == 422
    assert client.post(beat, headers=headers, json={}).status_code == 200
    assert memory_of("w") == MEMORY, "a call without one leaves the last one"
    assert client.post("/api/v1/leases", json={"worker": "w", "memory": "resident: nothing"}).status_code == 200
    assert memory_of("w") == "resident: nothing"


def _study_run(tmp_path, database_url: str, spec: dict) -> int:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return cli.main(["study", "run", str(path), "--db", database_url, "--home", str(tmp_path / "home")])


def test_study_run_prints_each_failed_trial_and_exits_non_zero_when_the_study_fails(database_url, tmp_path,
                                                                                      capsys):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    original = TrialRunner._load_set

    def break_after_the_check(self, *args, **kwargs):  # `study run` checks and runs in one go
        if not getattr(self, "_broke", False):
            self._broke = True
            _break(zoo)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrialRunner, "_load_set", break_after_the_check)
        assert _study_run(tmp_path, database_url, _spec(zoo, trials=6)) == 1
    err = capsys.readouterr().err
    for number in range(3):
        assert f"mmmo: trial {number} failed: {REASON}" in err
    assert "trial 3 failed" not in err
    assert f"mmmo: error: study 1 failed: {STUDY_REASON}" in err


def test_study_run_exits_non_zero_when_no_trial_completed(database_url, tmp_path, capsys):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    original = TrialRunner._load_set

    def break_after_the_check(self, *args, **kwargs):
        _break(zoo)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrialRunner, "_load_set", break_after_the_check)
        # two trials: the budget is spent before the load failures could fail the study
        assert _study_run(tmp_path, database_url, _spec(zoo, trials=2)) == 1
    captured = capsys.readouterr()
    assert "study 1: done" in captured.out
    assert f"mmmo: trial 0 failed: {REASON}" in captured.err and f"mmmo: trial 1 failed: {REASON}" in captured.err
    assert captured.err.strip().splitlines()[-1] == "mmmo: error: study 1: no trial completed (2 failed; their " \
        "reasons are above)"


def test_study_run_exits_zero_when_only_some_trials_fail(database_url, tmp_path, capsys):
    zoo = build_tiny_zoo(tmp_path / "zoo")
    original = TrialRunner._load_set
    loads: list[str] = []

    def fails_once(self, *args, **kwargs):  # the first load finds a broken tokenizer, then it is repaired
        whole = _break(zoo) if not loads else None
        loads.append("broken" if whole else "whole")
        try:
            return original(self, *args, **kwargs)
        finally:
            if whole is not None:
                (zoo.base / "tokenizer.json").write_text(whole)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrialRunner, "_load_set", fails_once)
        assert _study_run(tmp_path, database_url, _spec(zoo, trials=3)) == 0
    captured = capsys.readouterr()
    assert loads == ["broken", "whole"], "the failed set is loaded again; the good one stays resident"
    assert f"mmmo: trial 0 failed: {REASON}" in captured.err
    assert "trial 1 done" in captured.out and "trial 2 done" in captured.out
    assert "study 1: done" in captured.out and "mmmo: error" not in captured.err
