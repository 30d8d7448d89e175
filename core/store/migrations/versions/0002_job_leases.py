"""job leases: lease_expires_at, enqueued_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Running jobs from before this migration have no lease, which counts as
expired: the first sweep after the upgrade hands them to a live worker.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        jobs.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("enqueued_at")
        jobs.drop_column("lease_expires_at")
