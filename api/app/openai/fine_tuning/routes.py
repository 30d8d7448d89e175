"""/v1/fine_tuning/jobs of OpenAI's fine-tuning API, on lmq fit jobs.

Create makes one fit job, `validating_files` while a thread of this server reads
the training (and validation) file (validation.py), then hands it to the workers;
its fine-tuned model is registered in the preset store as
`ft:<base>:<suffix>:<id>`, a name that /v1/models, batches and /v1/jobs take.
Jobs are a tenant's own: another tenant's job is a 404, as one that never existed.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy.orm import Session

from lmq.api.app.dependencies import DispatchDep, SessionDep, SettingsDep, TenantDep
from lmq.api.app.dispatch import BrokerUnavailable
from lmq.api.app.openai.common import OPENAI_ERRORS, OpenAIError, OpenAIRoute, not_found, page
from lmq.api.app.openai.fine_tuning.service import (
    CHECKPOINT_EVENTS,
    FILE_PURPOSE,
    SHOWN_EVENTS,
    checkpoint_object,
    event_cursor,
    event_object,
    job_object,
)
from lmq.api.app.openai.fine_tuning.validation import VALIDATION_LEASE_S, start_validation
from lmq.core.config import Limits, Settings
from lmq.core.domain.fields import MAX_SEED, Strict, text
from lmq.core.domain.fine_tuning import (
    FINE_TUNING,
    SUFFIX_PATTERN,
    fine_tuned_model_name,
    lmq_job_id,
    openai_status,
)
from lmq.core.domain.jobs import OutputPresetTaken, check_output_name, preset_task_kind
from lmq.core.domain.presets import PresetNotAllowed, authorized_preset
from lmq.core.names import TERMINAL_STATES, JobKind, JobState, TaskKind
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.core.store.batches import get_file
from lmq.core.store.models import Job
from lmq.core.store.presets import store_resolver

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)

Auto = Literal["auto"]


class Hyperparameters(Strict):
    """OpenAI's hyperparameters, each a value or "auto" (fine_tuning.fit_hyperparameters says what
    auto is), and lmq's own: `lora_rank` (train LoRA adapters of that rank, merged into the saved
    model) and `sequence_length` (the tokens an example is cut to)."""

    n_epochs: Auto | Annotated[int, Field(ge=1)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    lora_rank: int | None = Field(None, ge=1, le=1024)
    sequence_length: int | None = Field(None, ge=2)


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class Method(Strict):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class FineTuningJobIn(Strict):
    model: text(512, label=True)
    training_file: text(64, label=True)
    validation_file: text(64, label=True) | None = None
    suffix: Annotated[str, Field(pattern=f"^{SUFFIX_PATTERN}$")] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[text(64, label=True), text(512, min_length=0)] | None = Field(None, max_length=16)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None


@router.post("")
def create_fine_tuning_job(
    body: FineTuningJobIn, tenant: str = TenantDep, settings: Settings = SettingsDep, dispatch=DispatchDep
):
    """A fine-tuning job, `validating_files` while this server reads its files (validation.py):
    then `queued`, or `failed` naming their bad lines."""
    given = chosen_hyperparameters(body, settings.limits)
    with session_scope(sessions(settings)) as session:
        preset = trainable_preset(session, settings, body.model, tenant)
        for param in ("training_file", "validation_file"):
            require_file(session, getattr(body, param), tenant, param)
        shown = {
            "model": body.model,
            "training_file": body.training_file,
            "validation_file": body.validation_file,
            "suffix": body.suffix,
            "seed": body.seed if body.seed is not None else secrets.randbelow(MAX_SEED),
            "metadata": body.metadata,
            "hyperparameters": given,  # "auto" resolved once the files are read
        }
        job = queries.create_job(session, kind=JobKind.fit, preset=preset, params={FINE_TUNING: shown}, tenant=tenant)
        name = fine_tuned_model_name(body.model, body.suffix, job.id)
        try:
            check_output_name(session, name, tenant)
        except OutputPresetTaken as error:
            raise OpenAIError(409, str(error), param="suffix", code="model_exists") from None
        job.output_preset = name
        leases.hold_validation(job, leases.holder_name(), VALIDATION_LEASE_S)
        files = f"training file {body.training_file}" + (f" and validation file {body.validation_file}" if body.validation_file else "")
        queries.add_event(session, job.id, "state", state=JobState.validating.value, files=files)
        created, job_id = job_object(session, job), job.id
    start_validation(settings, dispatch, job_id)
    return created


def chosen_hyperparameters(body: FineTuningJobIn, limits: Limits) -> dict:
    """The hyperparameters given, at the top level or in `method` (not both), within this deployment's limits."""
    inside = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if inside is not None and body.hyperparameters is not None:
        raise OpenAIError(
            400, "give hyperparameters in method.supervised or at the top level, not both", param="hyperparameters",
            code="invalid_request",
        )
    given = (inside or body.hyperparameters or Hyperparameters()).model_dump(exclude_none=True)
    for name, most in (("n_epochs", limits.epochs), ("batch_size", limits.batch_size), ("sequence_length", limits.max_length)):
        if isinstance(given.get(name), int) and given[name] > most:
            message = f"hyperparameters.{name} is {given[name]}, more than this server allows ({most})"
            raise OpenAIError(400, message, param=f"hyperparameters.{name}", code="invalid_request")
    return given


def trainable_preset(session: Session, settings: Settings, model: str, tenant: str) -> str:
    """The preset the fit job records for `model`: one this tenant may use, and a causal LM."""
    try:
        preset = authorized_preset(session, settings, model, tenant)
    except PresetNotAllowed:
        raise not_found("model", model, "model") from None
    if preset_task_kind(store_resolver(session, tenant=tenant).locate(preset)) is TaskKind.seq2seq_lm:
        message = (
            f"model {model!r} is a sequence-to-sequence model: fine-tune it through POST /v1/jobs "
            "with encoder_text and decoder_text rows"
        )
        raise OpenAIError(400, message, param="model", code="model_not_supported")
    return preset


def require_file(session: Session, file_id: str | None, tenant: str, param: str) -> None:
    if file_id is None:
        return
    record = get_file(session, file_id, tenant)
    if record is None or record.batch_id is not None:
        raise not_found("file", file_id, param)
    if record.purpose != FILE_PURPOSE:
        message = f"file {file_id!r} was uploaded for {record.purpose!r}: upload training examples with purpose 'fine-tune'"
        raise OpenAIError(400, message, param=param, code="invalid_file_purpose")


@router.get("")
def list_fine_tuning_jobs(
    after: str | None = Query(None, description="the last id of the previous page"),
    limit: int = Query(20, ge=1, le=100),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """Your fine-tuning jobs (every fit job of yours), newest first."""
    before = None
    if after is not None:
        cursor = find_job(session, after, tenant)
        if cursor is None:
            raise OpenAIError(400, f"after: {after!r} is not one of yours", param="after", code="invalid_request")
        before = cursor.id
    jobs = queries.list_jobs(session, tenant=tenant, kind=JobKind.fit.value, limit=limit + 1, before=before)
    return page([job_object(session, job) for job in jobs], limit)


@router.get("/{fine_tuning_job_id}")
def retrieve_fine_tuning_job(fine_tuning_job_id: str, tenant: str = TenantDep, session: Session = SessionDep):
    return job_object(session, require_job(session, fine_tuning_job_id, tenant))


@router.get("/{fine_tuning_job_id}/events")
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    after: str | None = Query(None, description="the last event id of the previous page"),
    limit: int = Query(20, ge=1, le=1000),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """The job's events, newest first: its states, validation, each step's loss and each checkpoint."""
    job = require_job(session, fine_tuning_job_id, tenant)
    events = queries.job_events_newest_first(
        session, job.id, before=cursor(after, "ftevent-"), limit=limit + 1, types=SHOWN_EVENTS
    )
    return page([event_object(job, event) for event in events], limit)


@router.get("/{fine_tuning_job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    after: str | None = Query(None, description="the last checkpoint id of the previous page"),
    limit: int = Query(10, ge=1, le=100),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """A checkpoint per epoch, newest first, with its training and validation loss and token accuracy."""
    job = require_job(session, fine_tuning_job_id, tenant)
    events = queries.job_events_newest_first(
        session, job.id, before=cursor(after, "ftckpt-"), limit=limit + 1, types=CHECKPOINT_EVENTS
    )
    return page([checkpoint_object(job, event) for event in events], limit)


@router.post("/{fine_tuning_job_id}/cancel")
def cancel_fine_tuning_job(fine_tuning_job_id: str, tenant: str = TenantDep, settings: Settings = SettingsDep):
    """Stop the job: a queued or paused one at once, a running one at its next step."""
    with session_scope(sessions(settings)) as session:
        job = require_job(session, fine_tuning_job_id, tenant)
        refuse_unless(job, fine_tuning_job_id, "cancelled", (s for s in JobState if s.value not in TERMINAL_STATES))
        queries.request_cancel(session, job.id)
        return job_object(session, job)


@router.post("/{fine_tuning_job_id}/pause")
def pause_fine_tuning_job(fine_tuning_job_id: str, tenant: str = TenantDep, settings: Settings = SettingsDep):
    """Pause the job: a running one stops at its next step, keeping its checkpoints; resume continues
    from the last one (the steps of an unfinished epoch are trained again)."""
    with session_scope(sessions(settings)) as session:
        job = require_job(session, fine_tuning_job_id, tenant)
        refuse_unless(job, fine_tuning_job_id, "paused", (JobState.queued, JobState.running, JobState.pausing, JobState.paused))
        queries.request_pause(session, job.id)
        return job_object(session, job)


@router.post("/{fine_tuning_job_id}/resume")
def resume_fine_tuning_job(
    fine_tuning_job_id: str, tenant: str = TenantDep, settings: Settings = SettingsDep, dispatch=DispatchDep
):
    """Resume a paused job: queued again, it continues from its last checkpoint."""
    with session_scope(sessions(settings)) as session:
        job = require_job(session, fine_tuning_job_id, tenant)
        refuse_unless(job, fine_tuning_job_id, "resumed", (JobState.pausing, JobState.paused))
        queued, lmq_id = job.state == JobState.paused.value, job.id
        queries.request_resume(session, job.id)
        resumed = job_object(session, job)
    if queued:
        try:
            dispatch.submit(lmq_id, JobKind.fit.value)
        except BrokerUnavailable as error:
            raise OpenAIError(503, str(error), code="service_unavailable") from None
    return resumed


def refuse_unless(job: Job, job_id: str, wanted: str, states) -> None:
    if job.state not in {state.value for state in states}:
        message = f"fine-tuning job {job_id!r} is {openai_status(job.state)}: it cannot be {wanted}"
        raise OpenAIError(409, message, param="fine_tuning_job_id", code="invalid_state")


def find_job(session: Session, job_id: str, tenant: str) -> Job | None:
    found = lmq_job_id(job_id)
    job = None if found is None else queries.get_job(session, found, tenant)
    return job if job is not None and job.kind == JobKind.fit.value else None


def require_job(session: Session, job_id: str, tenant: str) -> Job:
    job = find_job(session, job_id, tenant)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def cursor(after: str | None, prefix: str) -> int | None:
    try:
        return event_cursor(after, prefix)
    except ValueError as error:
        raise OpenAIError(400, str(error), param="after", code="invalid_request") from None
