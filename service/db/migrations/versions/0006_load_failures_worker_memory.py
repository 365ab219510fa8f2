"""trials that failed because their worker could not load the models; a worker's memory plan

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.add_column(sa.Column("load_failure", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("mmmo_workers") as batch:
        batch.add_column(sa.Column("memory", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mmmo_workers") as batch:
        batch.drop_column("memory")
    with op.batch_alter_table("mmmo_trials") as batch:
        batch.drop_column("load_failure")
