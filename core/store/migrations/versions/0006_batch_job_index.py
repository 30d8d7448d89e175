"""an index on openai_batches.job_id

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

The runner looks a job's batch up by `job_id` between decode steps (is its window over?)
and as the job ends (its output files); without an index each lookup reads every batch.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_openai_batches_job_id", "openai_batches", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_openai_batches_job_id", table_name="openai_batches")
