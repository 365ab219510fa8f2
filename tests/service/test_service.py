"""The service's queue under pressure and its edges: cancellation, bad input, several servers on
one PostgreSQL database, materialise jobs, and a schemathesis run over the OpenAPI schema."""

from __future__ import annotations

import os
import tarfile
import threading
import time

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import authorize, objective_keys, zoo_spec


def test_cancel_stops_running_trials_at_their_next_heartbeat(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=4)
    study = client.post("/api/v1/studies", json=spec).json()
    held = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert client.post(f"/api/v1/leases/{held['token']}/heartbeat").status_code == 200
    client.post(f"/api/v1/studies/{study['id']}/cancel")
    beat = client.post(f"/api/v1/leases/{held['token']}/heartbeat")
    assert beat.status_code == 409 and "cancelled" in beat.json()["detail"]
    trial = client.get(f"/api/v1/studies/{study['id']}/trials/{held['trial_number']}").json()
    assert trial["state"] == "failed" and trial["error"] == "study cancelled"
    assert client.post("/api/v1/leases", json={"worker": "w"}).status_code == 204


@pytest.mark.parametrize("send,code", [
    (dict(content=b'{"name": ', headers={"Content-Type": "application/json"}), 422),  # malformed JSON
    (dict(content=b"name: x", headers={"Content-Type": "text/plain"}), 422),  # wrong content type
    (dict(json={"unknown_field": 1}), 422),
    (dict(content=b"[" + b"1," * 700_000 + b"1]", headers={"Content-Type": "application/json"}), 413),  # huge
])
def test_bad_requests_are_4xx_with_a_message_and_store_nothing(client, tiny_zoo, send, code):
    r = client.post("/api/v1/studies", **send)
    assert r.status_code == code, r.text
    assert r.json()["detail"]
    assert client.get("/api/v1/studies").json() == []


def test_bad_lease_requests_are_refused(client, tiny_zoo):
    spec = zoo_spec(tiny_zoo, trials=2)
    client.post("/api/v1/studies", json=spec)
    assert client.post("/api/v1/leases", json={"worker": ""}).status_code == 422
    assert client.post("/api/v1/leases", json={"worker": "w", "extra": 1}).status_code == 422
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    both = {"values": dict.fromkeys(objective_keys(spec), 0.5), "error": "x"}
    assert client.post(f"/api/v1/leases/{lease['token']}/result", json=both).status_code == 422
    nan = client.post(f"/api/v1/leases/{lease['token']}/result", content=b'{"values": {"a": NaN}}',
                      headers={"Content-Type": "application/json"})
    assert nan.status_code == 422
    assert client.post("/api/v1/leases/not-a-token/heartbeat").status_code == 409
    assert client.get(f"/api/v1/studies/{lease['study_id']}/trials/0").json()["state"] == "leased"


def test_materialize_is_a_job_for_a_worker_and_its_model_downloads(client, settings, tiny_zoo, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from service.client import ApiClient, HttpLeaseSource
    from service.runner import TrialRunner
    from service.worker import Worker

    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    client.post(f"/api/v1/leases/{lease['token']}/result", json={"values": dict.fromkeys(objective_keys(spec), 0.5)})
    number = lease["trial_number"]
    assert client.post(f"/api/v1/studies/{study['id']}/trials/99/materialize").status_code == 404
    job = client.post(f"/api/v1/studies/{study['id']}/trials/{number}/materialize", json={"dtype": "bfloat16"})
    assert job.status_code == 202 and job.json()["state"] == "queued"
    job_id = job.json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/download").status_code == 409

    class _Through(ApiClient):  # the worker's HTTP calls go through the test client's app
        def __init__(self) -> None:
            self.http = client

    worker = Worker(HttpLeaseSource(_Through()), TrialRunner(cache_dir=cache_dir), name="materializer")
    assert worker.run_one()  # jobs come before trials
    done = client.get(f"/api/v1/jobs/{job_id}").json()
    assert done["state"] == "done" and done["worker"] == "materializer" and done["size_bytes"] > 0
    archive = tmp_path / "model.tar"
    archive.write_bytes(client.get(done["download"]).content)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "model", filter="data")
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert str(model.dtype) == "torch.bfloat16"
    assert [j["id"] for j in client.get(f"/api/v1/studies/{study['id']}/jobs").json()] == [job_id]

    # an upload that is not a tar archive, or to a finished job, is refused and changes nothing
    again = client.post(f"/api/v1/studies/{study['id']}/trials/{number}/materialize").json()
    held = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert held["kind"] == "materialize" and held["job_id"] == again["id"]
    url = f"/api/v1/leases/{held['token']}/artifact"
    assert client.put(url, content=b"not a tar", headers={"Content-Type": "application/x-tar"}).status_code == 422
    assert client.put(url, content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.get(f"/api/v1/jobs/{again['id']}").json()["state"] == "leased"
    assert client.put(f"/api/v1/leases/{lease['token']}/artifact", content=archive.read_bytes(),
                      headers={"Content-Type": "application/x-tar"}).status_code == 409
    stored = list(settings.resolved_artifact_dir().glob("*.tar"))
    assert len(stored) == 1
    assert client.delete(f"/api/v1/studies/{study['id']}").status_code == 204
    assert not stored[0].exists(), "deleting a study deletes its models' archives"
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404


def test_two_servers_on_one_postgres_never_lease_a_trial_twice_or_exceed_the_budget(postgres_url, tmp_path,
                                                                                     tiny_zoo, cache_dir):
    from service.settings import Settings

    settings = Settings(home=tmp_path, cache_dir=cache_dir, database_url=postgres_url, lease_seconds=300)
    apps = [create_app(settings), create_app(settings)]  # two processes' worth of state: engines, locks
    clients = [TestClient(a) for a in apps]
    for c in clients:
        c.__enter__()
    try:
        token = authorize(clients[0])
        for c in clients:
            c.headers["Authorization"] = f"Bearer {token}"
        budget = 16
        study_id = clients[0].post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=budget)).json()["id"]
        leased: list[tuple[int, int, str]] = []
        guard = threading.Lock()

        def hammer(c: TestClient, worker: str) -> None:
            # a server skips a study another server is asking for (204): keep asking for a while,
            # until the whole budget is proposed (leased, or waiting on a leased twin)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(leased) < budget + 2:
                r = c.post("/api/v1/leases", json={"worker": worker})
                if r.status_code == 200:
                    with guard:
                        leased.append((r.json()["study_id"], r.json()["trial_number"], r.json()["token"]))
                elif sum(c.get(f"/api/v1/studies/{study_id}").json()["counts"].values()) >= budget:
                    return

        threads = [threading.Thread(target=hammer, args=(clients[i % 2], f"w{i}")) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        numbers = [n for _, n, _ in leased]
        assert len(numbers) == len(set(numbers)), "a trial was leased twice"
        assert all(c.post("/api/v1/leases", json={"worker": "late"}).status_code == 204 for c in clients)
        trials = clients[1].get(f"/api/v1/studies/{study_id}/trials").json()
        assert len(trials) == budget
        # NSGA-II repeats configurations still running: those wait on their twin, never leased
        from service.db.models import Trial

        with apps[0].state.services.sessions() as session:
            waiting = {t.number for t in session.query(Trial).where(Trial.waiting_on.is_not(None))}
        assert sorted(numbers) == sorted({t["number"] for t in trials} - waiting)
        assert all(t["state"] == ("queued" if t["number"] in waiting else "leased") for t in trials)
    finally:
        for c in clients:
            c.__exit__(None, None, None)


# Schemathesis as `--checks all`. A spec valid by its schema still names files, tasks and metrics that
# the server checks against what it has, so a generated one is rightly a 422 (with the field); the
# Authorization header is ours, not generated (a request without it is the `ignored_auth` check's).
FUZZ_CONFIG = {
    "generation": {"with-security-parameters": False},
    "operations": [{"include-operation-id": ["create_study_api_v1_studies_post",
                                             "create_study_from_yaml_api_v1_studies_yaml_post"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404",
                                                                                   "409", "422"]}}}],
}


def _all_checks() -> list:
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    return CHECKS.get_all()


@pytest.mark.slow  # about 20 s a database: `make test` runs it, `make test-fast` does not
def test_openapi_schema_fuzzed_with_all_checks(settings, tiny_zoo):
    """Every check schemathesis has: no 5xx; statuses, content types, headers and bodies as the schema
    says; schema-valid input accepted, invalid refused; tokens enforced. First on real answers (a
    finished study with its trials, a job and its lease, a worker), then on generated requests
    (bounded examples, positive and negative) of another team, which has no running study whose
    event stream would wait."""
    app = create_app(settings)
    with TestClient(app) as c:
        schemathesis.serializer.alias("application/x-tar", "application/octet-stream")  # arbitrary bytes
        schema = schemathesis.openapi.from_asgi("/openapi.json", app,
                                                config=schemathesis.Config.from_dict(FUZZ_CONFIG))
        checks = _all_checks()
        assert len(checks) >= 14
        owner = {"Authorization": f"Bearer {authorize(c, 'owner')}"}
        spec = zoo_spec(tiny_zoo, trials=2)
        sid = c.post("/api/v1/studies", json=spec).json()["id"]
        for _ in range(2):
            lease = c.post("/api/v1/leases", json={"worker": "w"}).json()
            c.post(f"/api/v1/leases/{lease['token']}/result", json={"values": dict.fromkeys(objective_keys(spec),
                                                                                               0.5)})
        job = c.post(f"/api/v1/studies/{sid}/trials/0/materialize").json()["id"]
        study, trial = {"study_id": sid}, {"study_id": sid, "number": 0}
        real = [("GET", "/api/v1/studies", {}, None), ("GET", "/api/v1/studies/{study_id}", study, None),
                ("GET", "/api/v1/studies/{study_id}/trials", study, None),
                ("GET", "/api/v1/studies/{study_id}/trials/{number}", trial, None),
                ("GET", "/api/v1/studies/{study_id}/pareto", study, None),
                ("GET", "/api/v1/studies/{study_id}/hypervolume", study, None),
                ("GET", "/api/v1/studies/{study_id}/events", study, None),
                ("GET", "/api/v1/studies/{study_id}/trials/{number}/export", trial, {"format": "mergekit"}),
                ("GET", "/api/v1/studies/{study_id}/trials/{number}/export", trial, {"format": "spec"}),
                ("GET", "/api/v1/studies/{study_id}/jobs", study, None), ("GET", "/api/v1/jobs/{job_id}",
                                                                           {"job_id": job}, None),
                ("POST", "/api/v1/leases", {}, None), ("GET", "/api/v1/workers", {}, None)]
        for method, path, params, query in real:
            case = schema[path][method].Case(path_parameters=params, query=query,
                                             **({"body": {"worker": "w"}} if method == "POST" else {}))
            assert case.call_and_validate(headers=owner, checks=checks).status_code == 200, (method, path)

        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        fuzzer = {"Authorization": f"Bearer {authorize(c, 'fuzzer')}"}
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                _fuzz(operation, mode, fuzzer, checks)


NO_SHRINK = [hypothesis.Phase.explicit, hypothesis.Phase.generate]  # a failure is reported as found: fast


def _fuzz(operation, mode, headers: dict[str, str], checks: list) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=int(os.environ.get("MMMO_FUZZ_EXAMPLES", "15")), deadline=None, database=None,
                         phases=NO_SHRINK,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def as_documented(case) -> None:
        case.call_and_validate(headers=headers, checks=checks)

    try:
        as_documented()
    except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (e.g. no parameters, no body)
        assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label


@pytest.mark.parametrize("field,value", [("warm_start", [2**63]), ("seed", 2**40), ("seed", -1)])
def test_out_of_range_numbers_in_a_spec_are_422(client, tiny_zoo, field, value):
    """Found by the schemathesis run: a warm-start id beyond the database's integers was a 500."""
    r = client.post("/api/v1/studies", json=zoo_spec(tiny_zoo) | {field: value})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", field]
    assert client.get("/api/v1/studies").json() == []


def test_a_heartbeat_does_not_wait_behind_a_long_ask(client, tiny_zoo):
    """An ask holds the process lock while the sampler thinks (seconds on real searches); renewals
    must still get through, or every other worker's lease runs out meanwhile."""
    import threading

    client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=2))
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    answers: list[int] = []
    beat = threading.Thread(target=lambda: answers.append(
        client.post("/api/v1/leases/current/heartbeat", headers={"X-Lease-Token": lease["token"]}).status_code))
    with client.app.state.services.lock:  # as a long ask would
        beat.start()
        beat.join(timeout=60)
        assert not beat.is_alive() and answers == [200]
