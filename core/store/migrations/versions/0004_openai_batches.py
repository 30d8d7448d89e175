"""the OpenAI Batch API: openai_files, openai_batches

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

An uploaded file's bytes live under LMQ_HOME/files; a batch's output and
error files are rows only, rendered from the items of the batch's job.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "openai_files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=256), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("lines", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_openai_files_tenant_created", "openai_files", ["tenant", "created_at"])
    op.create_table(
        "openai_batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("model", sa.String(length=512), nullable=True),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("validation_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelling_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_file_id", sa.String(length=64), nullable=True),
        sa.Column("error_file_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_openai_batches_tenant_created", "openai_batches", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_openai_batches_tenant_created", "openai_batches")
    op.drop_table("openai_batches")
    op.drop_index("ix_openai_files_tenant_created", "openai_files")
    op.drop_table("openai_files")
