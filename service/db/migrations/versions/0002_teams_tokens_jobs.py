"""teams, users, tokens, jobs, workers; studies belong to a team

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 16:10:00

Studies made before teams existed move to the ``local`` team, which the embedded default uses.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mmmo_teams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "mmmo_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["mmmo_teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("team_id", "name"),
    )
    op.create_index("ix_mmmo_users_team_id", "mmmo_users", ["team_id"])
    op.create_table(
        "mmmo_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["team_id"], ["mmmo_teams.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["mmmo_users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    op.create_table(
        "mmmo_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("artifact", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["mmmo_studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("lease_token"),
    )
    op.create_table(
        "mmmo_workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["mmmo_teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_mmmo_jobs_study_id", "mmmo_jobs", ["study_id"])
    op.create_index("ix_mmmo_jobs_state", "mmmo_jobs", ["state"])

    with op.batch_alter_table("mmmo_studies") as batch:
        batch.add_column(sa.Column("team_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("last_leased_at", sa.DateTime(), nullable=True))

    conn = op.get_bind()
    if conn.execute(sa.text("SELECT count(*) FROM mmmo_studies")).scalar():
        conn.execute(sa.text("INSERT INTO mmmo_teams (name, created_at) VALUES ('local', CURRENT_TIMESTAMP)"))
        conn.execute(sa.text("UPDATE mmmo_studies SET team_id = (SELECT id FROM mmmo_teams WHERE name = 'local')"))

    with op.batch_alter_table("mmmo_studies") as batch:
        batch.alter_column("team_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_mmmo_studies_team_id", "mmmo_teams", ["team_id"], ["id"], ondelete="CASCADE")
        batch.create_index("ix_mmmo_studies_team_id", ["team_id"])


def downgrade() -> None:
    with op.batch_alter_table("mmmo_studies") as batch:
        batch.drop_index("ix_mmmo_studies_team_id")
        batch.drop_constraint("fk_mmmo_studies_team_id", type_="foreignkey")
        batch.drop_column("last_leased_at")
        batch.drop_column("created_by")
        batch.drop_column("team_id")
    op.drop_table("mmmo_workers")
    op.drop_table("mmmo_jobs")
    op.drop_table("mmmo_tokens")
    op.drop_table("mmmo_users")
    op.drop_table("mmmo_teams")
