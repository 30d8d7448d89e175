"""A checked job request becomes a queued job in the store: POST /v1/jobs and `lmq generate|fit|submit` alike."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.schemas import job_params
from core.names import JobKind, JobState
from core.plugins import get_registry
from core.store import Job, queries


class OutputPresetTaken(ValueError):
    """A fit job's (or an import's) output name is reserved, in the store, or another queued fit's."""


def store_job(
    session: Session, job: BaseModel, preset: str, *, tenant: str, idempotency_key: str | None = None
) -> Job:
    """Write `job` (from `api.schemas.parse_job`) for `preset`, the handle as the runners will load it."""
    digest = request_digest(job) if idempotency_key else None
    if job.kind == JobKind.generate.value:
        return queries.create_generate_job(
            session,
            preset=preset,
            inputs=[item.model_dump(exclude_none=True) for item in job.inputs],
            params=job_params(job.params),
            tenant=tenant,
            idempotency_key=idempotency_key,
            request_digest=digest,
        )
    check_output_name(session, job.output_preset)
    return queries.create_fit_job(
        session,
        preset=preset,
        training_data=[row.model_dump(exclude_none=True) for row in job.training_data],
        validation_data=[row.model_dump(exclude_none=True) for row in job.validation_data or []],
        hyperparameters=job_params(job.hyperparameters),
        output_preset=job.output_preset,
        tenant=tenant,
        idempotency_key=idempotency_key,
        request_digest=digest,
    )


def check_output_name(session: Session, name: str) -> None:
    """OutputPresetTaken unless `name` is free for a new store preset: not a built-in preset's or an
    architecture's name (in any case: they would shadow or be confused with them), not in the store
    (whoever's it is), and not the output of a fit job that is still to finish."""
    registry = get_registry()
    reserved = {n.lower() for a in registry.architectures() for n in (a.name, *a.presets)}
    if name.lower() in reserved:
        raise OutputPresetTaken(f"preset name {name!r} is reserved: it names a built-in preset or an architecture")
    pending = select(Job.id).where(
        Job.output_preset == name, Job.state.not_in([JobState.failed.value, JobState.cancelled.value])
    )
    if queries.get_preset(session, name) is not None or session.scalar(pending.limit(1)) is not None:
        raise OutputPresetTaken(f"preset {name!r} already exists in the store, or a fit job is making it")


def request_digest(job: BaseModel) -> str:
    """What a request asked for, as a sha256: a retry under the same Idempotency-Key must match it."""
    canonical = json.dumps(job.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
