"""Queries of the OpenAI Batch API: its files and batches, and the one generate job a batch becomes.

A batch's job is an ordinary generate job (queues, workers, leases and
recovery as any other); the batch row only adds what OpenAI's API shows. Its
job is written here from an iterator of items, a few thousand rows at a time,
so that a file of a hundred thousand lines is never all in memory.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta
from typing import Iterable

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from lmq.core.names import JobKind
from lmq.core.store import queries
from lmq.core.store.models import Job, OpenAIBatch, OpenAIFile, utcnow

_ID = re.compile(r"(file-|batch_)[0-9a-f]{24}")
OUTPUT, ERROR = "output", "error"


def new_id(prefix: str) -> str:
    """ "file-..." or "batch_...": OpenAI's prefixes and 24 random hex digits."""
    return prefix + secrets.token_hex(12)


def derived_id(prefix: str, *parts) -> str:
    """An id that is the same every time it is made from the same parts (a batch's output file, a line's request id)."""
    return prefix + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- files


def add_file(session: Session, *, file_id: str, tenant: str, purpose: str, filename: str, size: int) -> OpenAIFile:
    record = OpenAIFile(id=file_id, tenant=tenant, purpose=purpose, filename=filename, bytes=size)
    session.add(record)
    session.flush()
    return record


def not_expired():
    """A batch's output or error file past its `expires_at` is no file (read-only: nothing is deleted)."""
    return or_(OpenAIFile.expires_at.is_(None), OpenAIFile.expires_at > utcnow())


def get_file(session: Session, file_id: str, tenant: str) -> OpenAIFile | None:
    """Another tenant's file is no file: found by one query on both. A malformed id is no file
    either (and never reaches SQL), nor is an expired one."""
    if not _ID.fullmatch(file_id):
        return None
    query = select(OpenAIFile).where(OpenAIFile.id == file_id, OpenAIFile.tenant == tenant, not_expired())
    return session.scalar(query)


def list_files(
    session: Session, tenant: str, *, purpose: str | None, limit: int, after: str | None, newest_first: bool
) -> list[OpenAIFile]:
    query = select(OpenAIFile).where(OpenAIFile.tenant == tenant, not_expired())
    if purpose is not None:
        query = query.where(OpenAIFile.purpose == purpose)
    cursor = None if after is None else _cursor(get_file(session, after, tenant), after)
    return list(session.scalars(queries.keyset_page(query, OpenAIFile, cursor, limit, newest_first=newest_first)))


def delete_file(session: Session, record: OpenAIFile) -> None:
    session.delete(record)
    session.flush()


class UnknownCursor(ValueError):
    """A page's `after` that is not one of the tenant's files or batches."""


def _cursor(found, after: str):
    if found is None:
        raise UnknownCursor(f"after: {after!r} is not one of yours")
    return found


# ---------------------------------------------------------------- batches


def add_batch(
    session: Session,
    *,
    tenant: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict | None,
    output_expires_after: int | None = None,
) -> OpenAIBatch:
    batch = OpenAIBatch(
        id=new_id("batch_"),
        tenant=tenant,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        user_metadata=metadata,
        output_expires_after=output_expires_after,
        validation_started_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, batch_id: str, tenant: str, *, for_update: bool = False) -> OpenAIBatch | None:
    if not _ID.fullmatch(batch_id):
        return None
    query = select(OpenAIBatch).where(OpenAIBatch.id == batch_id, OpenAIBatch.tenant == tenant)
    return session.scalar(query.with_for_update() if for_update else query)


def list_batches(session: Session, tenant: str, *, limit: int, after: str | None) -> list[OpenAIBatch]:
    """Newest first, as OpenAI lists them."""
    cursor = None if after is None else _cursor(get_batch(session, after, tenant), after)
    query = select(OpenAIBatch).where(OpenAIBatch.tenant == tenant)
    return list(session.scalars(queries.keyset_page(query, OpenAIBatch, cursor, limit)))


VALIDATING = (OpenAIBatch.job_id.is_(None), OpenAIBatch.failed_at.is_(None), OpenAIBatch.cancelled_at.is_(None))


def still_validating(batch_id: str) -> tuple:
    """The conditions of an UPDATE that only a batch still validating (no job yet, neither failed
    nor cancelled) takes: whoever changes it first wins, the others change nothing."""
    return (OpenAIBatch.id == batch_id, *VALIDATING)


def stale_validations(session: Session, started_before: datetime) -> list[OpenAIBatch]:
    """Batches still validating whose validation began before `started_before`."""
    return list(
        session.scalars(select(OpenAIBatch).where(*VALIDATING, OpenAIBatch.validation_started_at < started_before))
    )


def take_up_validation(session: Session, batch: OpenAIBatch, started_before: datetime) -> bool:
    """Claim a validation that began before `started_before` and never ended (its server died):
    one conditional UPDATE, so that of two servers reading the batch only one validates it again."""
    claimed = session.execute(
        update(OpenAIBatch)
        .where(
            *still_validating(batch.id),
            OpenAIBatch.validation_started_at == batch.validation_started_at,
            OpenAIBatch.validation_started_at < started_before,
        )
        .values(validation_started_at=utcnow())
    )
    return claimed.rowcount == 1


def fail_validation(session: Session, batch_id: str, errors: list[dict]) -> bool:
    """The batch failed validation (unless it was cancelled, failed or validated meanwhile)."""
    outcome = session.execute(
        update(OpenAIBatch)
        .where(*still_validating(batch_id))
        .values(errors=errors, failed_at=utcnow())
    )
    return outcome.rowcount == 1


def create_batch_job(
    session: Session, batch_id: str, *, preset: str, model: str, params: dict, tenant: str, items: Iterable[dict]
) -> Job | None:
    """The batch's generate job, with one item per line of its input file, in line order
    (`items` as queries.create_job takes them: a line that cannot run goes to the error file).

    None (and nothing to commit) when the batch is no longer waiting for its job: cancelled,
    failed, or validated by another server. The batch row is locked first, so two servers
    validating one batch wait for each other instead of making two jobs.
    """
    if session.scalar(select(OpenAIBatch.id).where(*still_validating(batch_id)).with_for_update()) is None:
        return None
    job = queries.create_job(
        session, kind=JobKind.generate, preset=preset, params=params, items=items, tenant=tenant, batch=batch_id
    )
    linked = session.execute(update(OpenAIBatch).where(*still_validating(batch_id)).values(job_id=job.id, model=model))
    return job if linked.rowcount == 1 else None


def cancel_validation(session: Session, batch: OpenAIBatch) -> bool:
    """Cancel a batch at once while it is still validating (its validation then makes no job);
    False when its job was made meanwhile, or it failed."""
    now = utcnow()
    outcome = session.execute(
        update(OpenAIBatch)
        .where(
            *still_validating(batch.id),
        )
        .values(cancelling_at=now, cancelled_at=now)
    )
    session.refresh(batch)
    return outcome.rowcount == 1


def request_expiry(session: Session, batch: OpenAIBatch, at: datetime) -> None:
    """Past its completion window (which ended `at`): recorded once; its job is then cancelled as a cancel would."""
    session.flush()
    session.execute(
        update(OpenAIBatch)
        .where(OpenAIBatch.id == batch.id, OpenAIBatch.expired_at.is_(None))
        .values(expired_at=at)
    )
    session.refresh(batch)


def finalize(session: Session, batch: OpenAIBatch, sizes: dict[str, int]) -> bool:
    """Record the output and error files of a batch whose job has ended (`sizes`: bytes of each
    file with lines, by OUTPUT or ERROR). Done once: False when another worker did it first.
    The files expire `output_expires_after` seconds after they are made, when the batch asked."""
    session.flush()
    now = utcnow()
    lifetime = batch.output_expires_after
    expires_at = None if lifetime is None else now + timedelta(seconds=lifetime)
    ids = {lines: derived_id("file-", batch.id, lines) for lines in sizes}
    marked = session.execute(
        update(OpenAIBatch)
        .where(OpenAIBatch.id == batch.id, OpenAIBatch.finalized_at.is_(None))
        .values(finalized_at=now, output_file_id=ids.get(OUTPUT), error_file_id=ids.get(ERROR))
    )
    if marked.rowcount != 1:
        session.refresh(batch)
        return False
    for lines, file_id in ids.items():
        session.add(
            OpenAIFile(
                id=file_id,
                tenant=batch.tenant,
                purpose="batch_output",
                filename=f"{batch.id}_{lines}.jsonl",
                bytes=sizes[lines],
                batch_id=batch.id,
                lines=lines,
                created_at=now,
                expires_at=expires_at,
            )
        )
    session.flush()
    session.refresh(batch)
    return True
