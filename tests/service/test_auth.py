"""Teams and tokens: every /api endpoint needs a token; another team's study is a missing one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service import auth
from service.app import create_app
from tests.conftest import authorize, zoo_spec


@pytest.fixture
def app(settings):
    application = create_app(settings)
    with TestClient(application):
        yield application


def _client(app, team: str | None = None, user: str | None = None) -> TestClient:
    c = TestClient(app)
    if team:
        authorize(c, team, user)
    return c


def test_every_api_endpoint_needs_a_valid_token(app):
    anonymous, wrong = _client(app), _client(app)
    wrong.headers["Authorization"] = "Bearer mmmo_not-a-real-token"
    api_routes = [(path, method.upper()) for path, ops in app.openapi()["paths"].items() if path.startswith("/api/")
                  for method in ops]
    assert len(api_routes) >= 15
    for path, method in api_routes:
        url = re.sub(r"\{[^}]+\}", "1", path)
        for c, why in ((anonymous, "missing token"), (wrong, "invalid or revoked token")):
            r = c.request(method, url, json={})
            assert r.status_code == 401, (method, url, r.status_code)
            assert why in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
    assert anonymous.get("/healthz").status_code == 200  # probes and scrapers need no token
    assert anonymous.get("/metrics").status_code == 200


def test_another_teams_study_answers_exactly_as_a_missing_one(app, tiny_zoo):
    a, b = _client(app, "team-a", user="alice"), _client(app, "team-b")
    study = a.post("/api/v1/studies", json=zoo_spec(tiny_zoo)).json()
    assert study["created_by"] == "alice"
    sid = study["id"]
    missing = sid + 1000
    for method, suffix in (("GET", ""), ("GET", "/pareto"), ("GET", "/hypervolume"), ("GET", "/trials"),
                           ("GET", "/events"), ("POST", "/cancel"), ("POST", "/clone"), ("DELETE", ""),
                           ("GET", "/trials/0/export"), ("POST", "/trials/0/materialize"), ("GET", "/jobs")):
        theirs = b.request(method, f"/api/v1/studies/{sid}{suffix}")
        nothing = b.request(method, f"/api/v1/studies/{missing}{suffix}")
        assert theirs.status_code == nothing.status_code == 404, (method, suffix)
        assert theirs.json()["detail"].replace(str(sid), "N") == nothing.json()["detail"].replace(str(missing), "N")
    assert b.get("/api/v1/studies").json() == []
    assert [s["id"] for s in a.get("/api/v1/studies").json()] == [sid]
    assert a.get(f"/api/v1/studies/{sid}").json()["status"] == "running"  # b's cancel and delete did nothing
    # warm starts and leases stay inside the team too
    spec = zoo_spec(tiny_zoo) | {"warm_start": [sid]}
    assert b.post("/api/v1/studies", json=spec).status_code == 422
    assert b.post("/api/v1/leases", json={"worker": "w"}).status_code == 204
    assert a.post("/api/v1/leases", json={"worker": "w"}).json()["study_id"] == sid


def test_tokens_are_stored_hashed_and_revocable(app, settings):
    c = _client(app)
    with app.state.services.sessions() as session:
        auth.create_team(session, "team-a")
        issued = auth.create_token(session, "team-a", name="ci")
    c.headers["Authorization"] = f"Bearer {issued.token}"
    assert c.get("/api/v1/studies").status_code == 200
    engine = sa.create_engine(settings.resolved_database_url())
    with engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(sa.text("SELECT * FROM mmmo_tokens"))]
    engine.dispose()
    assert rows and not any(issued.token in cell for row in rows for cell in row)
    assert any(auth.digest(issued.token) in row for row in rows)
    with app.state.services.sessions() as session:
        auth.revoke_token(session, issued.id)
    assert c.get("/api/v1/studies").status_code == 401


def test_worker_pool_token_leases_every_teams_trials_and_nothing_else(app, tiny_zoo):
    a, b = _client(app, "team-a"), _client(app, "team-b")
    sa_id = a.post("/api/v1/studies", json=zoo_spec(tiny_zoo)).json()["id"]
    sb_id = b.post("/api/v1/studies", json=zoo_spec(tiny_zoo, experts=("sort", "upper"))).json()["id"]
    pool = _client(app)
    with app.state.services.sessions() as session:
        pool.headers["Authorization"] = f"Bearer {auth.create_token(session, None).token}"
    assert pool.get("/api/v1/studies").status_code == 403
    assert pool.get(f"/api/v1/studies/{sa_id}").status_code == 403
    leased = {pool.post("/api/v1/leases", json={"worker": "gpu"}).json()["study_id"] for _ in range(2)}
    assert leased == {sa_id, sb_id}


def test_leases_take_turns_across_studies(app, tiny_zoo):
    """Round-robin: a second study is served at once, not after the first one's whole budget."""
    a, b = _client(app, "team-a"), _client(app, "team-b")
    first = a.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=6)).json()["id"]
    second = b.post("/api/v1/studies", json=zoo_spec(tiny_zoo, trials=6, experts=("sort", "upper"))).json()["id"]
    pool = _client(app)
    with app.state.services.sessions() as session:
        pool.headers["Authorization"] = f"Bearer {auth.create_token(session, None).token}"
    order = [pool.post("/api/v1/leases", json={"worker": "w"}).json()["study_id"] for _ in range(6)]
    assert order == [first, second] * 3


def test_admin_cli_creates_teams_and_tokens_for_scripts(tmp_path, tiny_zoo, cache_dir):
    db = f"sqlite:///{tmp_path / 'admin.db'}"

    def mmmo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "admin", *args, "--db", db],
                              capture_output=True, text=True, timeout=120)

    assert mmmo("create-team", "ml-research").returncode == 0
    again = mmmo("create-team", "ml-research")
    assert again.returncode == 1 and again.stderr.strip() == "mmmo: error: team 'ml-research' already exists"
    bad = mmmo("create-team", "no spaces please")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    made = mmmo("create-token", "--team", "ml-research", "--name", "ci", "--user", "bob")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("mmmo_") and "shown only now" in made.stderr
    assert mmmo("create-token", "--team", "nope").returncode == 1
    listed = mmmo("list-tokens", "--team", "ml-research").stdout
    assert "ci" in listed and token not in listed and token[:11] in listed

    from service.settings import Settings

    app = create_app(Settings(home=tmp_path / "home", cache_dir=cache_dir, database_url=db))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.post("/api/v1/studies", json=zoo_spec(tiny_zoo)).json()["created_by"] == "bob"
        token_id = listed.split()[0]
        assert mmmo("revoke", token_id).returncode == 0
        assert c.get("/api/v1/studies").status_code == 401
        assert "revoked" in mmmo("list-tokens").stdout


def test_embedded_default_makes_a_local_team_and_keeps_its_token(tmp_path, settings):
    token_file = tmp_path / "state" / "token"
    app = create_app(settings)
    with TestClient(app) as c, app.state.services.sessions() as session:
        token, made = auth.ensure_local_token(session, token_file)
        assert made and token_file.stat().st_mode & 0o777 == 0o600
        assert auth.ensure_local_token(session, token_file) == (token, False)  # reused while valid
        c.headers["Authorization"] = f"Bearer {token}"
        assert c.get("/api/v1/studies").status_code == 200
        assert [t.name for t in auth.list_teams(session)] == ["local"]


def test_mmmo_serve_embedded_default_prints_where_its_token_is(tmp_path, cache_dir):
    import os
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MMMO_DATABASE_URL"} | {"MMMO_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--home",
                             str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert str(tmp_path / "token") in line and "team 'local'" in line
        token = (tmp_path / "token").read_text().strip()
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/studies", headers={"Authorization": f"Bearer {token}"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and r.json() == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
