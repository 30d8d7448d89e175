"""SQL tables: jobs, their items and events, and the preset store.

SQL is the source of truth for a job; Celery only carries its id. The schema
itself is created by the alembic migrations in ``migrations/``; keep the two
in step (``tests/test_store.py`` checks they agree).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from lmq.core.names import JobState


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued.value, index=True)
    preset: Mapped[str] = mapped_column(String(512))
    # generate: sampling params; fit: hyperparameters.
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # fit only: training and validation texts (generate inputs live in job_items).
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    output_preset: Mapped[str | None] = mapped_column(String(128), nullable=True)
    tenant: Mapped[str] = mapped_column(String(128), default="local")
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # sha256 of the request that came with the key: a different one under the same key is refused.
    request_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # The lease (core/store/leases.py): who runs the job now, until when, and
    # the attempt number, which is the fencing token of the holder's writes.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # When its id was last handed to the broker (the sweep re-sends lost ones).
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    items: Mapped[list[JobItem]] = relationship(
        back_populates="job", order_by="JobItem.index", cascade="all, delete-orphan"
    )


class JobItem(Base):
    """One input of a generate job and, once done, its result."""

    __tablename__ = "job_items"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_job_items_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    input: Mapped[dict] = mapped_column(JSON)
    # JSON, not text: generated text may hold NUL characters, which PostgreSQL
    # text columns refuse and its json type keeps (as \u0000).
    output: Mapped[str | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What a result holds beyond its text: {"choices": [...]} (n > 1, log-probabilities); None for plain text.
    details: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # Set exactly once, by the first run to finish the item; a redelivered run skips it.
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    job: Mapped[Job] = relationship(back_populates="items")


class JobEvent(Base):
    """Something that happened to a job: a state change, a model load, a fit step."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Preset(Base):
    """A preset directory in the store, with where it came from and the tenant it belongs to."""

    __tablename__ = "presets"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), default="local", server_default="local", index=True)
    architecture: Mapped[str | None] = mapped_column(String(128), nullable=True)
    path: Mapped[str] = mapped_column(String(1024))
    source: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    parent: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


EVERYONE = "*"


class PresetShare(Base):
    """A preset's owner let `tenant` use it; the tenant EVERYONE ("*") means every tenant."""

    __tablename__ = "preset_shares"

    preset: Mapped[str] = mapped_column(ForeignKey("presets.name", ondelete="CASCADE"), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    shared_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- the OpenAI Batch API (lmq.api.app.openai)


class OpenAIFile(Base):
    """A file of the Batch API: an upload (its bytes under LMQ_HOME/files), or a batch's output or
    error file, which is rendered from its job's items when read and so is never stored twice."""

    __tablename__ = "openai_files"
    __table_args__ = (Index("ix_openai_files_tenant_created", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # None for an upload; a batch's "output" or "error" lines otherwise.
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lines: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A batch's output or error file is gone from then on (its batch's output_expires_after); None: kept.
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)


class OpenAIBatch(Base):
    """A batch of the Batch API. Once its input file is validated it is one generate job (job_id),
    whose state its status is read from; before that, or when validation failed, it stands alone."""

    __tablename__ = "openai_batches"
    __table_args__ = (
        Index("ix_openai_batches_tenant_created", "tenant", "created_at"),
        Index("ix_openai_batches_job_id", "job_id"),  # the runner finds a job's batch by it
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    # "metadata" is the declarative base's own attribute.
    user_metadata: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    # Seconds its output and error files stay after they are made (OpenAI's output_expires_after); None: kept.
    output_expires_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    # Why validation failed: OpenAI's [{"code", "message", "line", "param"}].
    errors: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # When the validation now running started: a server that died validating leaves it to be taken up.
    validation_started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Set once, when the job has ended and its output and error files were made.
    finalized_at: Mapped[datetime | None] = mapped_column(nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job | None] = relationship()
