"""Issue #15, as an adversarial team member found it: one team's results never answer another
team's trials, a lease is only ever used by the API token that holds it (its token travels in a
header, not the URL), a worker's name belongs to its token, and a non-finite result changes nothing.
SQLite and PostgreSQL."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service import auth
from service.app import create_app
from service.db.migrate import upgrade
from tests.conftest import authorize, objective_keys, zoo_spec


@pytest.fixture
def app(settings):
    application = create_app(settings)
    with TestClient(application):
        yield application


def _client(app, team: str | None = None) -> TestClient:
    """A client of ``team`` with a token of its own (a new token per call); the pool's if None."""
    c = TestClient(app)
    if team:
        authorize(c, team)
    else:
        with app.state.services.sessions() as session:
            c.headers["Authorization"] = f"Bearer {auth.create_token(session, None).token}"
    return c


def _trial(client: TestClient, study_id: int, number: int) -> dict:
    return client.get(f"/api/v1/studies/{study_id}/trials/{number}").json()


def test_another_teams_scores_never_answer_a_teams_trials(app, tiny_zoo):
    """Team B leased its own trials and posted all-1.0 scores; team A's identical study must
    evaluate its configurations itself, not take B's values from the cache."""
    a, b = _client(app, "team-a"), _client(app, "team-b")
    spec = zoo_spec(tiny_zoo, trials=2)
    theirs = b.post("/api/v1/studies", json=spec).json()
    for _ in range(2):
        lease = b.post("/api/v1/leases", json={"worker": "b"}).json()
        b.post(f"/api/v1/leases/{lease['token']}/result", json={"values": dict.fromkeys(objective_keys(spec), 1.0)})
    assert b.get(f"/api/v1/studies/{theirs['id']}").json()["status"] == "done"

    ours = a.post("/api/v1/studies", json=spec).json()  # same seed and sampler: the same configurations
    leased = [a.post("/api/v1/leases", json={"worker": "a"}) for _ in range(2)]
    assert [r.status_code for r in leased] == [200, 200], "team A's trials must go to A's workers"
    trials = a.get(f"/api/v1/studies/{ours['id']}/trials").json()
    assert [(t["state"], t["cached"], t["values"]) for t in trials] == [("leased", False, None)] * 2
    for r in leased:
        a.post(f"/api/v1/leases/{r.json()['token']}/result", json={"values": dict.fromkeys(objective_keys(spec), 0.25)})
    # ...and A's own values answer A's next identical study (the team's cache still works)
    again = a.post("/api/v1/studies", json=spec).json()
    assert a.post("/api/v1/leases", json={"worker": "a"}).status_code == 204
    trials = a.get(f"/api/v1/studies/{again['id']}/trials").json()
    assert [(t["cached"], set(t["values"].values())) for t in trials] == [(True, {0.25})] * 2
    pareto = a.get(f"/api/v1/studies/{again['id']}/pareto").json()
    assert {v for t in pareto["front"] for v in t["values"].values()} == {0.25}


def test_a_pending_trial_of_another_team_is_not_waited_on(app, tiny_zoo):
    a, b = _client(app, "team-a"), _client(app, "team-b")
    spec = zoo_spec(tiny_zoo, trials=1)
    b.post("/api/v1/studies", json=spec)
    assert b.post("/api/v1/leases", json={"worker": "b"}).status_code == 200
    a.post("/api/v1/studies", json=spec)
    assert a.post("/api/v1/leases", json={"worker": "a"}).status_code == 200


def _expiry(app, token: str):
    from service.db.models import Trial

    with app.state.services.sessions() as session:
        return session.query(Trial.lease_expires_at).where(Trial.lease_token == token).scalar()


def _all_lease_calls(token: str, holder: str) -> list[tuple[str, str, dict]]:
    """Every call that uses a lease token, by header (current) and by path (deprecated)."""
    header = {"X-Lease-Token": token}
    calls = []
    for action, body in (("heartbeat", None), ("release", None), ("result", {"values": {"k": 1.0}}),
                         ("result", {"error": f"{holder} says it failed"}),
                         ("result", {"error": "fatal", "fatal": True})):
        calls.append(("POST", f"/api/v1/leases/current/{action}", {"headers": header, "json": body}))
        calls.append(("POST", f"/api/v1/leases/{token}/{action}", {"json": body}))
    tar = {"content": b"x" * 1024, "headers": {"Content-Type": "application/x-tar"}}
    calls.append(("PUT", "/api/v1/leases/current/artifact", {**tar, "headers": {**tar["headers"], **header}}))
    calls.append(("PUT", f"/api/v1/leases/{token}/artifact", tar))
    return calls


def test_a_lease_token_used_by_another_caller_answers_as_a_stale_one_and_changes_nothing(app, tiny_zoo):
    a, b = _client(app, "team-a"), _client(app, "team-b")
    a_other = _client(app, "team-a")  # the same team, another token: not the holder either
    pool = _client(app)
    spec = zoo_spec(tiny_zoo, trials=2)
    study = a.post("/api/v1/studies", json=spec).json()
    lease = a.post("/api/v1/leases", json={"worker": "a"}).json()
    before = _trial(a, study["id"], lease["trial_number"]), _expiry(app, lease["token"])
    for intruder in (b, a_other, pool):
        for method, url, kwargs in _all_lease_calls(lease["token"], "intruder"):
            theirs = intruder.request(method, url, **kwargs)
            bogus = intruder.request(method, url.replace(lease["token"], "no-such-lease"),
                                     **{**kwargs, "headers": {k: ("no-such-lease" if k == "X-Lease-Token" else v)
                                                              for k, v in kwargs.get("headers", {}).items()}})
            assert theirs.status_code == bogus.status_code == 409, (method, url, theirs.text)
            assert theirs.json() == bogus.json()
    after = _trial(a, study["id"], lease["trial_number"]), _expiry(app, lease["token"])
    assert after == before  # not renewed, failed, released or completed
    storage = optuna.storages.RDBStorage(app.state.services.settings.resolved_database_url())
    name = optuna.get_all_study_names(storage)[0]
    assert optuna.load_study(study_name=name, storage=storage).trials[0].state == optuna.trial.TrialState.RUNNING

    # the holder's own calls still work, by header and by the deprecated path
    header = {"X-Lease-Token": lease["token"]}
    assert a.post("/api/v1/leases/current/heartbeat", headers=header).status_code == 200
    assert a.post(f"/api/v1/leases/{lease['token']}/heartbeat").status_code == 200
    done = a.post("/api/v1/leases/current/result", headers=header,
                  json={"values": dict.fromkeys(objective_keys(spec), 0.5)})
    assert done.status_code == 200 and done.json()["state"] == "complete"

    # a materialise job's upload too
    job = a.post(f"/api/v1/studies/{study['id']}/trials/{lease['trial_number']}/materialize").json()
    held = a.post("/api/v1/leases", json={"worker": "a"}).json()
    assert held["kind"] == "materialize" and held["job_id"] == job["id"]
    for method, url, kwargs in _all_lease_calls(held["token"], "intruder")[-2:]:
        assert b.request(method, url, **kwargs).status_code == 409
    assert a.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "leased"


def test_lease_tokens_travel_in_a_header_and_the_path_routes_are_deprecated(app, tiny_zoo, cache_dir):
    from service.client import ApiClient, HttpLeaseSource

    paths = app.openapi()["paths"]
    for action, method in (("heartbeat", "post"), ("release", "post"), ("result", "post"), ("artifact", "put")):
        current = paths[f"/api/v1/leases/current/{action}"][method]
        assert not current.get("deprecated")
        assert any(p["in"] == "header" and p["name"] == "X-Lease-Token" for p in current["parameters"])
        assert paths[f"/api/v1/leases/{{token}}/{action}"][method]["deprecated"] is True

    a = _client(app, "team-a")
    spec = zoo_spec(tiny_zoo, trials=3)
    study = a.post("/api/v1/studies", json=spec).json()
    urls: list[str] = []
    a.event_hooks["request"].append(lambda request: urls.append(str(request.url)))

    class _Through(ApiClient):  # the worker's HTTP calls through the test client
        def __init__(self) -> None:
            self.http = a

    source = HttpLeaseSource(_Through())
    tokens = []
    for _ in range(3):
        lease = source.lease("w")
        tokens.append(lease.token)
        source.heartbeat(lease.token)
    source.complete(tokens[0], dict.fromkeys(objective_keys(spec), 0.5))
    source.fail(tokens[1], "broken")
    source.release(tokens[2])
    states = [t["state"] for t in a.get(f"/api/v1/studies/{study['id']}/trials").json()]
    assert states == ["complete", "failed", "queued"]
    lease_urls = [u for u in urls if "/leases" in u]
    assert len(lease_urls) == 9 and not any(t in url for t in tokens for url in urls)


def test_a_workers_name_belongs_to_its_token(app, tiny_zoo):
    """Team B calling its worker by team A's worker's name neither hides nor takes it over."""
    a, b = _client(app, "team-a"), _client(app, "team-b")
    study = a.post("/api/v1/studies", json=zoo_spec(tiny_zoo)).json()
    lease = a.post("/api/v1/leases", json={"worker": "gpu-1"}).json()
    assert b.post("/api/v1/leases", json={"worker": "gpu-1"}).status_code == 204
    b.post(f"/api/v1/leases/{lease['token']}/heartbeat")  # refused, and seen as nobody's worker
    b.post("/api/v1/leases/current/heartbeat", headers={"X-Lease-Token": lease["token"]})
    ours = a.get("/api/v1/workers").json()
    assert [(w["name"], w["pool"], w["status"]) for w in ours] == [("gpu-1", False, "busy")]
    assert [(r["study_id"], r["trial_number"]) for r in ours[0]["running"]] == [(study["id"], lease["trial_number"])]
    theirs = b.get("/api/v1/workers").json()
    assert [(w["name"], w["pool"], w["status"], w["running"]) for w in theirs] == [("gpu-1", False, "idle", [])]
    # a pool worker of that name is a third worker, listed for both teams
    assert _client(app).post("/api/v1/leases", json={"worker": "gpu-1"}).status_code == 200
    assert sorted(w["pool"] for w in a.get("/api/v1/workers").json()) == [False, True]
    assert sorted(w["pool"] for w in b.get("/api/v1/workers").json()) == [False, True]


@pytest.mark.parametrize("raw", [b'{"values": {"k": NaN}}', b'{"values": {"%s": NaN, "%s": 0.5}}',
                                 b'{"values": {"%s": Infinity, "%s": 0.5}}',
                                 b'{"values": {"%s": 0.5, "%s": -Infinity}}'])
def test_a_non_finite_result_is_422_and_leaves_the_trial_leased(client, settings, tiny_zoo, raw):
    spec = zoo_spec(tiny_zoo, trials=2)
    study = client.post("/api/v1/studies", json=spec).json()
    lease = client.post("/api/v1/leases", json={"worker": "w"}).json()
    body = raw % tuple(k.encode() for k in objective_keys(spec)) if b"%s" in raw else raw
    r = client.post("/api/v1/leases/current/result", content=body,
                    headers={"Content-Type": "application/json", "X-Lease-Token": lease["token"]})
    assert r.status_code == 422, r.text
    trial = _trial(client, study["id"], lease["trial_number"])
    assert (trial["state"], trial["values"], trial["error"]) == ("leased", None, None)
    storage = optuna.storages.RDBStorage(settings.resolved_database_url())
    name = optuna.get_all_study_names(storage)[0]
    assert optuna.load_study(study_name=name, storage=storage).trials[0].state == optuna.trial.TrialState.RUNNING
    engine = sa.create_engine(settings.resolved_database_url())
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM mmmo_results")).scalar() == 0
    engine.dispose()
    ok = client.post("/api/v1/leases/current/result", headers={"X-Lease-Token": lease["token"]},
                     json={"values": dict.fromkeys(objective_keys(spec), 0.5)})
    assert ok.status_code == 200 and ok.json()["state"] == "complete"


def test_migration_0004_gives_no_team_a_cached_value_it_may_not_have_evaluated(database_url):
    upgrade(database_url, "0003")
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        run = conn.execute
        for team_id, name in ((1, "a"), (2, "b")):
            run(sa.text("INSERT INTO mmmo_teams (id, name, created_at) VALUES (:i, :n, CURRENT_TIMESTAMP)"),
                {"i": team_id, "n": name})
            run(sa.text("INSERT INTO mmmo_studies (id, team_id, name, spec, optuna_name, status, budget, created_at) "
                        "VALUES (:i, :i, 's', '{}', :o, 'done', 4, CURRENT_TIMESTAMP)"),
                {"i": team_id, "o": f"o{name}"})
        trials = [  # (study, config, cached): x evaluated by a only (b's was from the cache), y by both
            (1, "x", False), (2, "x", True), (1, "y", False), (2, "y", False)]
        for number, (study_id, config, cached) in enumerate(trials):
            run(sa.text("INSERT INTO mmmo_trials (study_id, number, params, merge_config, config_hash, cached, origin, "
                        "state, attempts, created_at) VALUES (:s, :n, '{}', '{}', :c, :k, 'sampler', 'complete', 1, "
                        "CURRENT_TIMESTAMP)"), {"s": study_id, "n": number, "c": config, "k": cached})
        for config, value in (("x", 0.5), ("y", 0.7), ("z", 0.1)):  # z: its study was deleted
            run(sa.text("INSERT INTO mmmo_results (config_hash, objective_hash, value, created_at) "
                        "VALUES (:c, 'o', :v, CURRENT_TIMESTAMP)"), {"c": config, "v": value})
        run(sa.text("INSERT INTO mmmo_workers (name, team_id, first_seen_at, last_seen_at) "
                    "VALUES ('gpu', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    upgrade(database_url, "0004")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT team_id, config_hash, objective_hash, value FROM mmmo_results")).all()
        workers = conn.execute(sa.text("SELECT count(*) FROM mmmo_workers")).scalar()
        holders = conn.execute(sa.text("SELECT lease_holder_id, waiting_on FROM mmmo_trials")).all()
    engine.dispose()
    assert rows == []  # none can be attributed safely: the cache is rebuilt as teams evaluate
    assert workers == 0 and set(holders) == {(None, None)}
