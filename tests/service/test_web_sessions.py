"""The dashboard's login is a server-side session: the cookie holds its id (never the API token),
logging out or revoking the token ends it, and its unsafe requests need this origin and the
page's CSRF token. Bearer clients need neither. (The browser's side: tests/service/test_dashboard.py.)"""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service import auth
from service.app import create_app
from service.db.models import WebSession
from service.deps import SESSION_COOKIE
from tests.conftest import authorize, zoo_spec

SELF = "http://testserver"  # the TestClient's own origin


@pytest.fixture
def app(settings):
    application = create_app(settings)
    with TestClient(application):
        yield application


def _log_in(app, token: str) -> TestClient:
    """A browser-like client: logged in through the form, the cookie its only credential."""
    c = TestClient(app, follow_redirects=False)
    r = c.post("/login", data={"token": token, "next": "/"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    return c


def _csrf(c: TestClient, path: str = "/") -> str:
    page = c.get(path)
    assert page.status_code == 200
    return re.search(r'<meta name="mmmo-csrf" content="([0-9a-f]+)">', page.text).group(1)


@pytest.fixture
def team(app, tiny_zoo):
    """A Bearer client of team-a, its token, and a running study of the team."""
    bearer = TestClient(app)
    token = authorize(bearer, "team-a")
    study = bearer.post("/api/v1/studies", json=zoo_spec(tiny_zoo)).json()
    return bearer, token, study["id"]


def test_the_cookie_holds_a_session_id_not_the_api_token(app, settings, team):
    _, token, _ = team
    c = _log_in(app, token)
    session_id = c.cookies[SESSION_COOKIE]
    assert token not in c.cookies.values() and token not in session_id
    with app.state.services.sessions() as session:
        assert auth.authenticate(session, session_id) is None, "the cookie is no API token"
    engine = sa.create_engine(settings.resolved_database_url())
    with engine.connect() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(sa.text("SELECT * FROM mmmo_web_sessions"))]
    engine.dispose()
    assert len(rows) == 1 and auth.digest(session_id) in rows[0]
    assert not any(session_id in cell or token in cell for cell in rows[0]), "stored as its digest only"
    assert c.get("/api/v1/studies").status_code == 200, "the session opens the API for reading"


def test_cookie_posts_need_this_origin_and_the_csrf_token(app, team, tiny_zoo):
    bearer, token, sid = team
    c = _log_in(app, token)
    csrf = _csrf(c, f"/studies/{sid}")
    cancel = f"/api/v1/studies/{sid}/cancel"
    refused = [
        {},                                                          # neither
        {"Origin": SELF},                                            # no token
        {"X-CSRF-Token": csrf},                                      # no origin
        {"Origin": "http://testserver:8000", "X-CSRF-Token": csrf},  # another port: same site, other origin
        {"Sec-Fetch-Site": "same-site", "Origin": SELF, "X-CSRF-Token": csrf},
        {"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": csrf},
        {"Origin": SELF, "X-CSRF-Token": "0" * 64},                  # a wrong token
        {"Origin": SELF, "X-CSRF-Token": auth.digest(c.cookies[SESSION_COOKIE])},  # the stored digest is not it
    ]
    for headers in refused:
        r = c.post(cancel, headers=headers)
        assert r.status_code == 403, (headers, r.status_code)
        assert c.post("/api/v1/studies/yaml", content="name: x", headers=headers).status_code == 403
        assert c.delete(f"/api/v1/studies/{sid}", headers=headers).status_code == 403
    assert bearer.get(f"/api/v1/studies/{sid}").json()["status"] == "running"
    assert len(bearer.get("/api/v1/studies").json()) == 1

    made = c.post("/api/v1/studies", json=zoo_spec(tiny_zoo), headers={"Sec-Fetch-Site": "same-origin",
                                                                       "X-CSRF-Token": csrf})
    assert made.status_code == 201
    r = c.post(cancel, headers={"Origin": SELF, "X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_bearer_requests_need_neither_origin_nor_csrf_token(app, team, tiny_zoo):
    bearer, _, sid = team
    hostile = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert bearer.post("/api/v1/studies", json=zoo_spec(tiny_zoo), headers=hostile).status_code == 201
    assert bearer.post(f"/api/v1/studies/{sid}/cancel").json()["status"] == "cancelled"


def test_logout_revokes_the_session(app, team):
    _, token, _ = team
    c = _log_in(app, token)
    session_id, csrf = c.cookies[SESSION_COOKIE], _csrf(c)
    assert c.post("/logout", data={"csrf": "wrong"}, headers={"Origin": SELF}).status_code == 403
    assert c.get("/api/v1/studies").status_code == 200, "a forged logout ends nothing"
    r = c.post("/logout", data={"csrf": csrf}, headers={"Origin": SELF})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert SESSION_COOKIE not in c.cookies
    replay = TestClient(app, follow_redirects=False, cookies={SESSION_COOKIE: session_id})
    r = replay.get("/api/v1/studies")
    assert r.status_code == 401 and "log in again" in r.json()["detail"]
    assert replay.get("/").status_code == 303 and replay.get("/").headers["location"].startswith("/login")
    assert replay.post("/api/v1/studies/yaml", content="name: x", headers={"Origin": SELF,
                                                                          "X-CSRF-Token": csrf}).status_code == 401


def test_revoking_the_token_ends_its_sessions(app, team):
    _, token, _ = team
    c = _log_in(app, token)
    with app.state.services.sessions() as session:
        auth.revoke_token(session, auth.authenticate(session, token).token_id)
    assert c.get("/api/v1/studies").status_code == 401
    assert c.get("/").status_code == 303


def test_sessions_expire(settings, clock, tiny_zoo):
    from service.services import Services

    application = create_app(settings, Services.start(settings, clock=clock))
    with TestClient(application):
        token = authorize(TestClient(application), "team-a")
        c = _log_in(application, token)
        clock.advance(29 * 86400)
        assert c.get("/api/v1/studies").status_code == 200
        clock.advance(2 * 86400)
        assert c.get("/api/v1/studies").status_code == 401
        _log_in(application, token)  # a login clears the expired sessions away
        with application.state.services.sessions() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(WebSession)) == 1


def test_login_from_another_origin_is_refused(app, team):
    _, token, _ = team
    c = TestClient(app, follow_redirects=False)
    for headers in ({"Origin": "http://testserver:8000"}, {"Sec-Fetch-Site": "same-site"}):
        r = c.post("/login", data={"token": token}, headers=headers)
        assert r.status_code == 403 and SESSION_COOKIE not in c.cookies
    r = c.post("/login", data={"token": token}, headers={"Origin": SELF, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 303 and SESSION_COOKIE in c.cookies


@pytest.mark.parametrize("secure", [False, True])
def test_cookies_are_secure_when_the_operator_says_tls(settings, secure):
    application = create_app(settings.model_copy(update={"secure_cookies": secure}))
    with TestClient(application, follow_redirects=False) as c:
        token = authorize(TestClient(application), "team-a")
        set_cookie = c.post("/login", data={"token": token}).headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
    assert ("Secure" in set_cookie) is secure
