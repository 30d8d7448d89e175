"""presets belong to tenants: presets.tenant, preset_shares; jobs.request_digest

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Presets from before this migration belong to the local tenant (the only one
a store without tokens has). A share row grants one tenant, or with tenant
"*" every tenant, the use of a preset. A job's request_digest tells a replay
of its Idempotency-Key from a different request under the same key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("presets") as presets:
        presets.add_column(sa.Column("tenant", sa.String(length=128), nullable=False, server_default="local"))
        presets.create_index("ix_presets_tenant", ["tenant"])
    op.create_table(
        "preset_shares",
        sa.Column("preset", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("shared_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["preset"], ["presets.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("preset", "tenant"),
    )
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("request_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("request_digest")
    op.drop_table("preset_shares")
    with op.batch_alter_table("presets") as presets:
        presets.drop_index("ix_presets_tenant")
        presets.drop_column("tenant")
