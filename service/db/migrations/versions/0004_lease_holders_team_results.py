"""leases bound to the token that holds them; the results cache scoped to a team

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:10:00

- ``mmmo_trials.lease_holder_id``, ``mmmo_jobs.lease_holder_id``: the API token that holds the
  lease. Leases held while upgrading have none, so their workers' next call is refused (409)
  and the trial is leased again once the lease expires.
- ``mmmo_trials.waiting_on``: a queued trial waiting on a pending twin of the same configuration.
- ``mmmo_results.team_id``: a team sees only its own cached values. Existing values are
  dropped: a value cannot be attributed to a team safely (the study that produced it may have
  been deleted, and a configuration one team evaluated on one objective may have been evaluated
  by another team on another), and the cache only saves work: a configuration asked for again
  is evaluated again.
- ``mmmo_workers`` is keyed by (token, name): the rows, a day of "last seen" times with no
  token, are dropped and refill as workers call.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_results = sa.table("mmmo_results", sa.column("team_id", sa.Integer), sa.column("config_hash", sa.String),
                    sa.column("objective_hash", sa.String), sa.column("value", sa.Float),
                    sa.column("created_at", sa.DateTime))
_trials = sa.table("mmmo_trials", sa.column("study_id", sa.Integer), sa.column("config_hash", sa.String),
                   sa.column("state", sa.String), sa.column("cached", sa.Boolean))
_studies = sa.table("mmmo_studies", sa.column("id", sa.Integer), sa.column("team_id", sa.Integer))


def _create_results(team_scoped: bool) -> None:
    columns = [sa.Column("id", sa.Integer(), nullable=False)]
    if team_scoped:
        columns.append(sa.Column("team_id", sa.Integer(), nullable=False))
    columns += [
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("objective_hash", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    ]
    if team_scoped:
        columns += [sa.ForeignKeyConstraint(["team_id"], ["mmmo_teams.id"], ondelete="CASCADE"),
                    sa.UniqueConstraint("team_id", "config_hash", "objective_hash")]
    else:
        columns.append(sa.UniqueConstraint("config_hash", "objective_hash"))
    op.create_table("mmmo_results", *columns)
    if not team_scoped:
        op.create_index("ix_mmmo_results_config_hash", "mmmo_results", ["config_hash"])


def _create_workers(by_token: bool) -> None:
    columns = [sa.Column("id", sa.Integer(), nullable=False)]
    if by_token:
        columns.append(sa.Column("token_id", sa.Integer(), nullable=False))
    columns += [
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["mmmo_teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    ]
    if by_token:
        columns += [sa.ForeignKeyConstraint(["token_id"], ["mmmo_tokens.id"], ondelete="CASCADE"),
                    sa.UniqueConstraint("token_id", "name")]
    else:
        columns.append(sa.UniqueConstraint("name"))
    op.create_table("mmmo_workers", *columns)


def upgrade() -> None:
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.add_column(sa.Column("lease_holder_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("waiting_on", sa.Integer(), nullable=True))
    with op.batch_alter_table("mmmo_jobs") as batch:
        batch.add_column(sa.Column("lease_holder_id", sa.Integer(), nullable=True))

    op.drop_index("ix_mmmo_results_config_hash", table_name="mmmo_results")
    op.drop_table("mmmo_results")
    _create_results(team_scoped=True)

    op.drop_table("mmmo_workers")
    _create_workers(by_token=True)


def downgrade() -> None:
    conn = op.get_bind()
    first: dict[tuple[str, str], dict] = {}
    for row in conn.execute(sa.select(_results.c.config_hash, _results.c.objective_hash, _results.c.value,
                                      _results.c.created_at).order_by(_results.c.created_at)).mappings():
        first.setdefault((row["config_hash"], row["objective_hash"]), dict(row))
    op.drop_table("mmmo_results")
    _create_results(team_scoped=False)
    if first:
        op.bulk_insert(sa.table("mmmo_results", *(sa.column(c) for c in
                                                  ("config_hash", "objective_hash", "value", "created_at"))),
                       list(first.values()))
    op.drop_table("mmmo_workers")
    _create_workers(by_token=False)
    with op.batch_alter_table("mmmo_jobs") as batch:
        batch.drop_column("lease_holder_id")
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.drop_column("waiting_on")
        batch.drop_column("lease_holder_id")
