"""A checked job request becomes a queued job in the store: POST /v1/jobs and `lmq generate|fit|submit` alike."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.schemas import job_params
from core.names import JobKind
from core.store import Job, queries


class OutputPresetTaken(ValueError):
    """A fit job's output_preset names a preset the store already has."""


def store_job(
    session: Session, job: BaseModel, preset: str, *, tenant: str, idempotency_key: str | None = None
) -> Job:
    """Write `job` (from `api.schemas.parse_job`) for `preset`, the handle as the runners will load it."""
    if job.kind == JobKind.generate.value:
        return queries.create_generate_job(
            session,
            preset=preset,
            inputs=[item.model_dump(exclude_none=True) for item in job.inputs],
            params=job_params(job.params),
            tenant=tenant,
            idempotency_key=idempotency_key,
        )
    if queries.get_preset(session, job.output_preset) is not None:
        raise OutputPresetTaken(f"preset {job.output_preset!r} already exists in the store")
    return queries.create_fit_job(
        session,
        preset=preset,
        training_data=[row.model_dump(exclude_none=True) for row in job.training_data],
        validation_data=[row.model_dump(exclude_none=True) for row in job.validation_data or []],
        hyperparameters=job_params(job.hyperparameters),
        output_preset=job.output_preset,
        tenant=tenant,
        idempotency_key=idempotency_key,
    )
