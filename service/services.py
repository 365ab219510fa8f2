"""What a server process holds: the database, Optuna, the task catalog, and the lock that
serialises queue operations within the process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from evals.catalog import TaskCatalog
from search.study import OptunaStudies
from service.cache import DerivedCache
from service.db.migrate import upgrade
from service.db.session import make_engine, session_factory
from service.queue import QueuePolicy
from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    optuna: OptunaStudies
    catalog: TaskCatalog
    policy: QueuePolicy
    lock: threading.Lock = field(default_factory=threading.Lock)
    derived: DerivedCache = field(default_factory=DerivedCache)

    @classmethod
    def start(cls, settings: Settings) -> Services:
        url = settings.resolved_database_url()
        upgrade(url)  # the service's tables are always at the newest migration before serving
        engine = make_engine(url, pool_size=settings.db_pool_size)
        return cls(settings=settings, engine=engine, sessions=session_factory(engine), optuna=OptunaStudies(url),
                   catalog=TaskCatalog(), policy=QueuePolicy(settings.lease_seconds, settings.max_attempts))

    def close(self) -> None:
        self.engine.dispose()
        self.optuna.storage.engine.dispose()
