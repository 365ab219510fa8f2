from alembic import context
from sqlalchemy import create_engine

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
            context.run_migrations()
    engine.dispose()


run()
