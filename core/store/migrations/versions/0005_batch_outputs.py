"""the Batch API's output fields: a batch's output_expires_after, a file's expires_at, an item's details

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

`openai_batches.output_expires_after` (seconds) is how long the batch's output and
error files stay after they are made; `openai_files.expires_at` is when such a file
goes. `job_items.details` keeps what a result has beyond its text: every choice of
an n > 1 request, and the tokens' log-probabilities.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("openai_batches", sa.Column("output_expires_after", sa.Integer(), nullable=True))
    op.add_column("openai_files", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("job_items", sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("job_items", "details")
    op.drop_column("openai_files", "expires_at")
    op.drop_column("openai_batches", "output_expires_after")
