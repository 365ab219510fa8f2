"""Shared fixtures. Test models are built once per run (session scope) and cached on disk."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from evals.offline import set_offline

set_offline(True)
os.environ.setdefault("TQDM_DISABLE", "1")

POSTGRES_URL = os.environ.get("MMMO_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the demo zoo is cached; shared with `mmmo demo` unless MMMO_TEST_CACHE_DIR is set."""
    return Path(os.environ.get("MMMO_TEST_CACHE_DIR", Path.home() / ".cache" / "mmmo"))


@pytest.fixture(scope="session", autouse=True)
def data_roots(tmp_path_factory, cache_dir) -> list[Path]:
    """Specs may name files under the data roots only: the tests' models and data live under pytest's
    temporary directory and the cache. Set for every Settings (and server subprocess) of the run."""
    roots = [tmp_path_factory.getbasetemp(), cache_dir]
    previous = os.environ.get("MMMO_DATA_ROOTS")
    os.environ["MMMO_DATA_ROOTS"] = os.pathsep.join(map(str, roots))
    yield roots
    if previous is None:
        os.environ.pop("MMMO_DATA_ROOTS", None)
    else:
        os.environ["MMMO_DATA_ROOTS"] = previous


@pytest.fixture(scope="session")
def zoo(cache_dir):
    from evals.zoo import ensure_zoo

    return ensure_zoo(cache_dir)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """An untrained zoo with the demo zoo's names and layout, built in about a second (no skill)."""
    from evals.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("tiny") / "zoo")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip("MMMO_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped")
    import sqlalchemy as sa

    name = f"mmmo_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mmmo.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def settings(tmp_path, database_url, cache_dir, data_roots):
    from service.settings import Settings

    return Settings(home=tmp_path / "home", cache_dir=cache_dir, database_url=database_url, lease_seconds=30,
                    data_roots=data_roots)


@pytest.fixture
def sqlite_settings(tmp_path, cache_dir, data_roots):
    """For checks that do not depend on the database: one (SQLite) is enough."""
    from service.settings import Settings

    return Settings(home=tmp_path / "home", cache_dir=cache_dir, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                    data_roots=data_roots)


def zoo_spec(zoo, *, trials: int = 6, samples: int = 20, experts: tuple[str, ...] = ("add", "reverse"),
             method: str = "ties") -> dict:
    return {
        "name": "test study",
        "base": str(zoo.base),
        "experts": [{"name": e, "path": str(zoo.experts[e])} for e in experts],
        "method": method,
        "objectives": [{"task": f"mmmo_{e}", "samples": samples} for e in experts],
        "sampler": {"name": "nsga2", "population_size": 4},
        "budget": {"trials": trials},
    }


def authorize(client, team: str = "team-a", user: str | None = None) -> str:
    """Make ``team`` (if new) and a token of it on the app's database; the client sends it from now on."""
    from service import auth

    with client.app.state.services.sessions() as session:
        try:
            auth.find_team(session, team)
        except auth.AuthError:
            auth.create_team(session, team)
        token = auth.create_token(session, team, user=user).token
    client.headers["Authorization"] = f"Bearer {token}"
    return token


@pytest.fixture
def client(settings):
    """The app on this test's database (SQLite and PostgreSQL), with a team token in its headers."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings)) as c:
        authorize(c)
        yield c


def objective_keys(spec: dict) -> list[str]:
    """The objective keys of a ``zoo_spec`` (exact match per task), in order."""
    return [f"{o['task']}:exact_match" for o in spec["objectives"]]


class ManualClock:
    """The service's clock, moved by hand: lease expiry and time budgets tested without waiting."""

    def __init__(self) -> None:
        from service.db.models import utcnow

        self.now = utcnow()

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def clock_client(settings, clock):
    """``client`` on a server whose clock the test moves (``clock.advance``)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.services import Services

    with TestClient(create_app(settings, Services.start(settings, clock=clock))) as c:
        authorize(c)
        yield c
