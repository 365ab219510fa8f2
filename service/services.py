"""What a server process holds: the database, Optuna, the task catalog, the clock, and the lock
that serialises lease operations within the process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from evals.catalog import TaskCatalog
from search.optuna_store import OptunaStudies
from service.cache import DerivedCache
from service.db.migrate import upgrade
from service.db.models import utcnow
from service.db.session import make_engine, session_factory
from service.leases import LeasePolicy
from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    optuna: OptunaStudies
    catalog: TaskCatalog
    policy: LeasePolicy
    # Naive UTC, as the database stores it. Tests inject a clock they move by hand: lease expiry
    # and time budgets are then tested without waiting.
    clock: Callable[[], datetime] = utcnow
    lock: threading.Lock = field(default_factory=threading.Lock)
    derived: DerivedCache = field(default_factory=DerivedCache)

    @classmethod
    def start(cls, settings: Settings, clock: Callable[[], datetime] = utcnow) -> Services:
        url = settings.resolved_database_url()
        upgrade(url)  # the service's tables are always at the newest migration before serving
        engine = make_engine(url, pool_size=settings.db_pool_size)
        return cls(settings=settings, engine=engine, sessions=session_factory(engine), optuna=OptunaStudies(url),
                   catalog=TaskCatalog(), policy=LeasePolicy(settings.lease_seconds, settings.max_attempts),
                   clock=clock)

    def close(self) -> None:
        self.engine.dispose()
        self.optuna.storage.engine.dispose()
