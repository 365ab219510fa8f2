"""Engine and session factory; SQLite gets a busy timeout and WAL so readers never block the writer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """``pool_size`` should match the request threads (FastAPI runs sync routes on 40): a request
    holds its connection until its response is built, and a smaller pool queues them."""
    pool = {"pool_size": pool_size, "max_overflow": 10, "pool_timeout": 60}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def migrated_session(url: str) -> Iterator[Session]:
    """One session on the database at ``url``, migrated first: for commands that need no server."""
    from service.db.migrate import upgrade

    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()
