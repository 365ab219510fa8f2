"""The Alembic migrations create exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import optuna
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.db.migrate import VERSION_TABLE, current, upgrade
from service.db.models import Base


def test_upgrade_matches_the_models_and_leaves_optuna_alone(database_url):
    optuna.create_study(storage=database_url, study_name="theirs")  # Optuna's tables and version first
    upgrade(database_url)
    upgrade(database_url)  # idempotent
    assert current(database_url) == "0007"
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE,
                                                    "include_object": lambda o, n, t, r, c: t != "table"
                                                    or n.startswith("mmmo_")})
        assert compare_metadata(ctx, Base.metadata) == []
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert {"mmmo_studies", "mmmo_trials", "mmmo_results", "mmmo_teams", "mmmo_tokens", "mmmo_jobs",
            VERSION_TABLE} <= tables
    assert {"studies", "trials", "alembic_version"} <= tables  # Optuna's, untouched
    assert optuna.load_study(study_name="theirs", storage=database_url).study_name == "theirs"


def test_studies_made_before_teams_move_to_the_local_team(database_url):
    upgrade(database_url, "0001")
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mmmo_studies (name, spec, optuna_name, status, budget, created_at) "
                             "VALUES ('old', '{}', 'mmmo-old', 'done', 4, CURRENT_TIMESTAMP)"))
    upgrade(database_url)
    with engine.connect() as conn:
        team = conn.execute(sa.text("SELECT t.name FROM mmmo_studies s JOIN mmmo_teams t ON t.id = s.team_id "
                                    "WHERE s.name = 'old'")).scalar_one()
    engine.dispose()
    assert team == "local"
