from alembic import context
from sqlalchemy import create_engine, text

from service.db.migrate import VERSION_TABLE
from service.db.models import Base


def _ours(obj, name, type_, reflected, compare_to) -> bool:
    # Optuna's tables share the database: never touch them.
    return type_ != "table" or name.startswith("mmmo_")


def run() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                          include_object=_ours, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Servers, a migration job and `mmmo db upgrade` may start together: one migrates,
                # the others wait here and then find nothing left to do.
                connection.execute(text("SELECT pg_advisory_xact_lock(7236818431)"))
            context.run_migrations()
    engine.dispose()


run()
