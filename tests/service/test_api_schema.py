"""The API answers as its OpenAPI schema says: times with their offset, every 422 a list of
problems (HTTPValidationError), and the event stream and YAML exports under their own types.
(tests/service/test_service.py fuzzes the whole schema with schemathesis, all checks.)"""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime

import pytest

from tests.conftest import objective_keys, zoo_spec


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None and value.utcoffset().total_seconds() == 0, f"{text!r} has no UTC offset"
    return value


def _done_study(client, tiny_zoo) -> tuple[dict, dict]:
    """A study of two trials, both reported: done, with timestamps everywhere."""
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    for _ in range(2):
        lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
        _aware(lease["expires_at"])
        r = client.post(f"/api/v1/leases/{lease['token']}/result", json={"values": dict.fromkeys(
            objective_keys(spec), 0.5)})
        assert r.status_code == 200, r.text
    return spec, study


def test_every_time_in_a_response_carries_its_offset(client, tiny_zoo):
    before = datetime.now(UTC)
    _, study = _done_study(client, tiny_zoo)
    sid = study["id"]
    created = _aware(study["created_at"])
    assert abs((created - before).total_seconds()) < 600, "the naive UTC the database keeps, read as UTC"
    detail = client.get(f"/api/v1/studies/{sid}").json()
    assert detail["status"] == "done"
    _aware(detail["created_at"]), _aware(detail["finished_at"])
    for trial in detail["trials"] + client.get(f"/api/v1/studies/{sid}/trials").json():
        _aware(trial["started_at"]), _aware(trial["finished_at"])
    _aware(client.get("/api/v1/studies").json()[0]["created_at"])
    for trial in client.get(f"/api/v1/studies/{sid}/pareto").json()["front"]:
        _aware(trial["finished_at"])
    job = client.post(f"/api/v1/studies/{sid}/trials/0/materialize").json()
    _aware(job["created_at"]), _aware(client.get(f"/api/v1/jobs/{job['id']}").json()["created_at"])
    held = client.post("/api/v1/leases", json={"worker": "w"}).json()  # the job's lease
    _aware(held["expires_at"])
    _aware(client.post(f"/api/v1/leases/{held['token']}/heartbeat").json()["expires_at"])
    worker = client.get("/api/v1/workers").json()[0]
    _aware(worker["first_seen_at"]), _aware(worker["last_seen_at"])
    _aware(worker["running"][0]["lease_expires_at"])
    events = client.get(f"/api/v1/studies/{sid}/events").text  # the study is done: the stream ends
    trials = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {\"number\"")]
    assert len(trials) == 2 and all(_aware(t["finished_at"]) for t in trials)


def _problems(r) -> list[dict]:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    assert all(isinstance(p["loc"], list) and isinstance(p["msg"], str) and p["type"] for p in detail), detail
    return detail


def test_every_422_is_a_list_of_problems(client, tiny_zoo):
    yaml_text = {"Content-Type": "application/yaml"}
    assert "YAML" in _problems(client.post("/api/v1/studies/yaml", content=b"a: [", headers=yaml_text))[0]["msg"]
    assert "mapping" in _problems(client.post("/api/v1/studies/yaml", content=b"- 1", headers=yaml_text))[0]["msg"]
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    result = f"/api/v1/leases/{lease['token']}/result"
    both = {"values": dict.fromkeys(objective_keys(spec), 0.5), "error": "x"}
    assert "exactly one" in _problems(client.post(result, json=both))[0]["msg"]
    assert "exactly one" in _problems(client.post(result, json={}))[0]["msg"]
    assert _problems(client.post(result, json={"values": {"no-such-objective": 1.0}}))  # the study's keys only
    r = client.post(result, json={"values": dict.fromkeys(objective_keys(spec), 0.5)})
    assert r.status_code == 200
    job = client.post(f"/api/v1/studies/{study['id']}/trials/{lease['trial_number']}/materialize").json()
    held = client.post("/api/v1/leases", json={"worker": "w"}).json()
    assert held["kind"] == "materialize" and held["job_id"] == job["id"]
    not_tar = client.put(f"/api/v1/leases/{held['token']}/artifact", content=b"not a tar archive",
                         headers={"Content-Type": "application/x-tar"})
    assert "tar" in _problems(not_tar)[0]["msg"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w"):
        pass
    assert client.put(f"/api/v1/leases/{held['token']}/artifact", content=buffer.getvalue(),
                      headers={"Content-Type": "application/x-tar"}).status_code == 200


def test_the_event_stream_and_yaml_exports_are_documented_as_what_they_are(client, tiny_zoo):
    paths = client.get("/openapi.json").json()["paths"]
    events = paths["/api/v1/studies/{study_id}/events"]["get"]["responses"]
    export = paths["/api/v1/studies/{study_id}/trials/{number}/export"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    assert list(export["200"]["content"]) == ["application/yaml"]
    for responses in (events, export):  # their errors are JSON, as every error is
        assert list(responses["404"]["content"]) == ["application/json"]
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPValidationError")
    yaml_create = paths["/api/v1/studies/yaml"]["post"]["responses"]
    assert yaml_create["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPValidationError")

    _, study = _done_study(client, tiny_zoo)
    sid = study["id"]
    assert client.get(f"/api/v1/studies/{sid}/events").headers["content-type"].startswith("text/event-stream")
    for form in ("mergekit", "spec"):
        r = client.get(f"/api/v1/studies/{sid}/trials/0/export", params={"format": form})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/yaml")


def test_a_nul_character_is_a_422_not_a_database_error(client, tiny_zoo):
    """Found by schemathesis on PostgreSQL, whose text cannot hold NUL: these were 500s."""
    for param in ("q", "status", "method", "model"):
        assert _problems(client.get("/api/v1/studies", params={param: "a\x00b"}))[0]["loc"] == ["query", param]
    assert _problems(client.post("/api/v1/leases", json={"worker": "w\x00"}))[0]["loc"] == ["body", "worker"]
    client.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=2))
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    failed = client.post(f"/api/v1/leases/{lease['token']}/result", json={"error": "boom\x00"})
    assert failed.status_code == 200 and failed.json()["error"] == "boom\ufffd", "a worker's message is kept"


def test_the_client_names_a_problems_field_only_when_it_has_one(client, tiny_zoo):
    from service.client import ApiClient, ApiError

    api = ApiClient("http://testserver")
    api.http = client  # the test client is an httpx.Client: the API client's calls reach the app
    spec = zoo_spec(tiny_zoo, trials=2)
    api.create_study(spec)
    lease = api.lease("w")
    with pytest.raises(ApiError) as refused:
        api.complete(lease["token"], {"no-such-objective": 1.0})
    message = str(refused.value)
    assert refused.value.status == 422 and message.startswith("HTTP 422: ") and not message.startswith("HTTP 422: :")
    with pytest.raises(ApiError) as invalid:
        api.create_study(spec | {"seed": -1})
    assert str(invalid.value).startswith("HTTP 422: seed: ")
