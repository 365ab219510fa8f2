"""what a trial's evaluation cost (the items it evaluated, the seconds it took) and its fidelity rung

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.add_column(sa.Column("items", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("eval_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("rung", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rungs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.drop_column("rungs")
        batch.drop_column("rung")
        batch.drop_column("eval_seconds")
        batch.drop_column("items")
