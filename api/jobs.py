"""A checked job request becomes a queued job in the store: POST /v1/jobs and `lmq generate|fit|submit` alike."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from lmq.api.schemas import GENERATE_TEXT_FIELDS, job_params
from lmq.core.names import JobKind, JobState
from lmq.core.plugins import get_registry
from lmq.core.presets import PresetNotFound
from lmq.core.presets.resolver import REMOTE_SCHEMES
from lmq.core.store import Job, queries
from lmq.core.store.presets import preset_architecture, store_resolver

SEQ2SEQ = "seq2seq_lm"
# What each task reads from an input and a training row, as a message names it.
TASK_INPUTS = {
    ("generate", "causal_lm"): "'prompt' (or 'messages')",
    ("generate", SEQ2SEQ): "'encoder_text'",
    ("fit", "causal_lm"): "'text'",
    ("fit", SEQ2SEQ): "'encoder_text' and 'decoder_text'",
}
TASK_WORDS = {"causal_lm": "a causal LM", SEQ2SEQ: "a sequence-to-sequence model"}


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
    """Write `job` (from `lmq.api.schemas.parse_job`) for `preset`, the handle as the runners will load it."""
    try:
        location = store_resolver(session, tenant=tenant).locate(preset)
    except PresetNotFound:
        location = None  # the caller checked the handle; a runner names what it cannot load
    check_inputs_fit(job, location)
    digest = request_digest(job) if idempotency_key else None
    if job.kind == JobKind.generate.value:
        return queries.create_generate_job(
            session,
            preset=preset,
            inputs=[item.model_dump(mode="json", exclude_none=True) for item in job.inputs],
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
        wanted = TASK_INPUTS[job.kind, expected]
        if preset_task is not None:
            message = f"preset {job.preset!r} is {TASK_WORDS[expected]}: give {wanted}, not {field!r}"
        else:
            message = (
                f"the job's first input is for {TASK_WORDS[expected]} ({rows[0][2]!r}); every input of a "
                f"job is for the same kind of model: give {wanted}, not {field!r}"
            )
        raise InputsDontFitPreset((name, index, field), message)


def _input_tasks(job: BaseModel):
    """(list, index, the field holding the text, the task that reads it) for each input or row."""
    if job.kind == JobKind.generate.value:
        for index, item in enumerate(job.inputs):
            field = next(name for name in GENERATE_TEXT_FIELDS if getattr(item, name) is not None)
            yield "inputs", index, field, SEQ2SEQ if field == "encoder_text" else "causal_lm"
        return
    for name in ("training_data", "validation_data"):
        for index, row in enumerate(getattr(job, name) or []):
            paired = row.encoder_text is not None
            yield name, index, "encoder_text" if paired else "text", SEQ2SEQ if paired else "causal_lm"


def preset_task_kind(location: str) -> str | None:
    """"causal_lm" or "seq2seq_lm" for a built-in preset name or a local preset directory
    (from its config.json); None when that cannot be told without fetching it."""
    registry = get_registry()
    builtin = registry.find_preset(location)
    if builtin is not None:
        return builtin[0].task_kind
    if location.startswith(REMOTE_SCHEMES):
        return None
    architecture = preset_architecture(Path(location))
    return None if architecture is None else registry.get(architecture).task_kind


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
