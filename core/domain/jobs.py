"""A checked job request becomes a queued job in the store (POST /v1/jobs and `lmq generate|fit|submit`
alike), and a job's row becomes the summary every front end shows."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from lmq.core.domain.fit import fit_steps
from lmq.core.domain.requests import job_params
from lmq.core.names import JobKind, JobState, TaskKind
from lmq.core.plugins import get_registry
from lmq.core.presets import PresetNotFound
from lmq.core.presets.resolver import REMOTE_SCHEMES
from lmq.core.store import Job, queries
from lmq.core.store.presets import preset_architecture, store_resolver


class OutputPresetTaken(ValueError):
    """A fit job's (or an import's) output name is reserved, in the store, or another queued fit's."""


class InputsDontFitPreset(ValueError):
    """Inputs of another task than the preset's, or of two tasks in one job; `location` is the
    field's, as pydantic's (("inputs", 3, "encoder_text")), so the refusal names it as any other."""

    def __init__(self, location: tuple, message: str):
        super().__init__(message)
        self.location = location


def store_job(
    session: Session, job: BaseModel, preset: str, *, tenant: str, idempotency_key: str | None = None
) -> Job:
    """Write `job` (from `requests.parse_job`) for `preset`, the handle as the runners will load it."""
    try:
        location = store_resolver(session, tenant=tenant).locate(preset)
    except PresetNotFound:
        location = None  # the caller checked the handle; a runner names what it cannot load
    check_inputs_fit(job, location)
    digest = request_digest(job) if idempotency_key else None
    row = {"preset": preset, "tenant": tenant, "idempotency_key": idempotency_key, "request_digest": digest}
    if job.kind == JobKind.generate.value:
        inputs = [item.model_dump(mode="json", exclude_none=True) for item in job.inputs]
        return queries.create_generate_job(session, inputs=inputs, params=job_params(job.params), **row)
    check_output_name(session, job.output_preset, tenant)
    return create_fit_job(
        session,
        training_data=[example.model_dump(exclude_none=True) for example in job.training_data],
        validation_data=[example.model_dump(exclude_none=True) for example in job.validation_data or []],
        hyperparameters=job_params(job.hyperparameters),
        output_preset=job.output_preset,
        **row,
    )


def create_fit_job(
    session: Session, *, training_data: list[dict], validation_data: list[dict] | None, hyperparameters: dict, **job
) -> Job:
    """A queued fit job, counted in training steps from the start; `job` as queries.create_job takes it."""
    return queries.create_job(
        session,
        kind=JobKind.fit,
        params=hyperparameters,
        data={"training_data": training_data, "validation_data": validation_data or []},
        total=fit_steps(len(training_data), hyperparameters).total,
        **job,
    )


def check_inputs_fit(job: BaseModel, location: str | None) -> None:
    """InputsDontFitPreset for the first input (or training row) that the preset's task does not
    read: the task as the preset's config.json names it, without loading anything; for a preset
    not on this machine (hf://, kaggle://), the task of the job's first input."""
    rows = list(_input_tasks(job))
    preset_task = preset_task_kind(location) if location else None
    expected = preset_task or rows[0][3]
    for name, index, field, task in rows:
        if task == expected:
            continue
        wanted = expected.fields_read(job.kind)
        if preset_task is not None:
            message = f"preset {job.preset!r} is {expected.description}: give {wanted}, not {field!r}"
        else:
            message = (
                f"the job's first input is for {expected.description} ({rows[0][2]!r}); every input of a "
                f"job is for the same kind of model: give {wanted}, not {field!r}"
            )
        raise InputsDontFitPreset((name, index, field), message)


def _input_tasks(job: BaseModel):
    """(list, index, the field holding the text, the task that reads it) for each input or row."""
    if job.kind == JobKind.generate.value:
        for index, item in enumerate(job.inputs):
            yield "inputs", index, item.text_field, TaskKind.reading(item.text_field)
        return
    for name in ("training_data", "validation_data"):
        for index, row in enumerate(getattr(job, name) or []):
            task = TaskKind.seq2seq_lm if row.encoder_text is not None else TaskKind.causal_lm
            yield name, index, task.training_fields[0], task


def preset_task_kind(location: str) -> TaskKind | None:
    """The task of a built-in preset name or a local preset directory (from its config.json);
    None when that cannot be told without fetching it."""
    registry = get_registry()
    builtin = registry.find_preset(location)
    if builtin is not None:
        return builtin[0].task_kind
    if location.startswith(REMOTE_SCHEMES):
        return None
    architecture = preset_architecture(Path(location))
    return None if architecture is None else registry.get(architecture).task_kind


def check_output_name(session: Session, name: str, tenant: str | None = None) -> None:
    """OutputPresetTaken unless `name` is free for a new store preset: not a built-in preset's or an
    architecture's name (for everyone, in any case: they would shadow or be confused with them), not
    in the store, and not the output of a fit job that is still to finish. With `tenant`, only the
    presets and fits that tenant can see count: a name another tenant holds is answered as a free
    one (its fit fails when it cannot register, as when another job takes a name first), so a
    tenant cannot learn another's names. None (the CLI's local user, who sees them all): every one."""
    registry = get_registry()
    reserved = {n.lower() for a in registry.architectures() for n in (a.name, *a.presets)}
    if name.lower() in reserved:
        raise OutputPresetTaken(f"preset name {name!r} is reserved: it names a built-in preset or an architecture")
    pending = select(Job.id).where(
        Job.output_preset == name, Job.state.not_in([JobState.failed.value, JobState.cancelled.value])
    )
    if tenant is not None:
        pending = pending.where(Job.tenant == tenant)
    if queries.get_preset(session, name, tenant) is not None or session.scalar(pending.limit(1)) is not None:
        raise OutputPresetTaken(f"preset {name!r} already exists in the store, or a fit job is making it")


def request_digest(job: BaseModel) -> str:
    """What a request asked for, as a sha256: a retry under the same Idempotency-Key must match it."""
    canonical = json.dumps(job.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- the job as the front ends show it


class Counts(BaseModel):
    total: int
    completed: int
    failed: int


class JobSummary(BaseModel):
    """The job as GET /v1/jobs/{id} answers and the CLI prints it; built from its row by `of`."""

    id: str
    kind: JobKind
    status: JobState
    preset: str
    counts: Counts
    progress: float
    error: str | None
    attempts: int
    tenant: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    output_preset: str | None

    @classmethod
    def of(cls, job: Job) -> JobSummary:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.state,
            preset=job.preset,
            counts=Counts(total=job.total, completed=job.completed, failed=job.failed),
            progress=job.progress,
            error=job.error,
            attempts=job.attempts,
            tenant=job.tenant,
            created_at=isoformat(job.created_at),
            started_at=isoformat(job.started_at),
            finished_at=isoformat(job.finished_at),
            output_preset=job.output_preset,
        )


def job_summary(job: Job) -> dict:
    """The job's summary as JSON: what the server answers and the CLI prints."""
    return JobSummary.of(job).model_dump(mode="json")


def isoformat(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
