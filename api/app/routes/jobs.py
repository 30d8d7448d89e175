"""/v1/jobs: submit a job, list them, follow one (summary, results, events) and cancel it.

SQL is the source of truth: a job is written there first and then handed to
a runner (lmq.api.app.dispatch). Another tenant's job is as absent as one that never
existed: 404 either way.
"""

import logging
import re
from collections.abc import Iterator

from fastapi import APIRouter, Body, Header, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lmq.api import schemas
from lmq.api.app.auth import AUTH_ERRORS
from lmq.api.app.dependencies import DispatchDep, SessionDep, SettingsDep, TenantDep
from lmq.api.app.dispatch import BrokerUnavailable
from lmq.api.suggest import did_you_mean, preset_names
from lmq.core.config import Limits, Settings
from lmq.core.domain.jobs import (
    InputsDontFitPreset,
    JobSummary,
    OutputPresetTaken,
    job_summary,
    request_digest,
    store_job,
)
from lmq.core.domain.presets import PresetNotAllowed, authorized_preset
from lmq.core.domain.requests import job_request
from lmq.core.logfmt import logfmt
from lmq.core.names import JobKind, JobState
from lmq.core.store import queries, session_scope, sessions
from lmq.core.store.presets import PresetRefused, check_preset_for_job, store_resolver

JOB_ID = re.compile(r"[0-9a-f]{32}")
NDJSON = "application/x-ndjson"
JOB_ERRORS = {**AUTH_ERRORS, 404: {"description": "no such job, or another tenant's"}}
SUBMIT_ERRORS = {
    **AUTH_ERRORS,
    409: {"description": "the fit job's output_preset is reserved, already in the store, or another fit's"},
    503: {"description": "the broker could not take the job (it is recorded as failed)"},
}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger("lmq.api")


def submit_router(limits: Limits) -> APIRouter:
    """POST /v1/jobs, whose body model carries this deployment's LMQ_MAX_* limits (so OpenAPI shows them)."""
    submitting = APIRouter(tags=["jobs"])
    # FastAPI reads this annotation at once (so this module has no `from __future__ import annotations`).
    JobRequest = job_request(limits)

    @submitting.post("/v1/jobs", status_code=202, response_model=JobSummary, responses=SUBMIT_ERRORS)
    def submit_job(
        response: Response,
        job: JobRequest = Body(discriminator="kind"),
        idempotency_key: str | None = Header(
            None, min_length=1, max_length=128, description="resubmitting with the same key returns the same job"
        ),
        tenant: str = TenantDep,
        settings: Settings = SettingsDep,
        dispatch=DispatchDep,
    ):
        """Queue a generate or fit job; 202 with the job, which then runs on a worker."""
        return submit(job, response, idempotency_key, tenant, settings, dispatch)

    return submitting


def submit(job: BaseModel, response: Response, idempotency_key: str | None, tenant: str, settings, dispatch):
    try:
        with session_scope(sessions(settings)) as session:
            if idempotency_key:
                earlier = queries.find_job_by_idempotency_key(session, tenant, idempotency_key)
                if earlier is not None:
                    return replayed(response, earlier, job, idempotency_key)
            preset = checked_preset(session, settings, job.preset, tenant)
            check_item_models(session, settings, job, tenant)
            try:
                check_preset_for_job(store_resolver(session, tenant=tenant).locate(preset), preset, settings, job)
            except PresetRefused as error:
                raise field_error(("body", "preset"), str(error)) from None
            try:
                stored = store_job(session, job, preset, tenant=tenant, idempotency_key=idempotency_key)
            except OutputPresetTaken as error:
                raise HTTPException(409, detail=f"output_preset: {error}") from None
            except InputsDontFitPreset as error:
                raise field_error(("body", *error.location), str(error)) from None
            summary = job_summary(stored)
    except IntegrityError:
        # The same key arrived twice at once: the request that wrote first made the job.
        if idempotency_key is None:
            raise
        with session_scope(sessions(settings)) as session:
            earlier = queries.find_job_by_idempotency_key(session, tenant, idempotency_key)
        if earlier is None:
            raise
        return replayed(response, earlier, job, idempotency_key)
    logger.info(logfmt("job_state", job=summary["id"], state=summary["status"], kind=summary["kind"], tenant=tenant))
    try:
        dispatch.submit(summary["id"], summary["kind"])
    except BrokerUnavailable as error:
        logger.warning(logfmt("job_state", job=summary["id"], state=JobState.failed.value, error=str(error)))
        raise HTTPException(503, detail=str(error)) from None
    response.headers["Location"] = f"/v1/jobs/{summary['id']}"
    return summary


@router.get("", response_model=schemas.JobPage, responses=AUTH_ERRORS)
def list_jobs(
    status: JobState | None = None,
    kind: JobKind | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """This tenant's jobs, newest first, a page at a time."""
    if cursor is not None and find_job(session, cursor, tenant) is None:
        raise field_error(("query", "cursor"), f"cursor {cursor!r} is not a job of yours")
    jobs = queries.list_jobs(
        session,
        tenant=tenant,
        state=status and status.value,
        kind=kind and kind.value,
        limit=limit + 1,
        before=cursor,
    )
    page = jobs[:limit]
    return {
        "jobs": [job_summary(job) for job in page],
        "next_cursor": page[-1].id if len(jobs) > limit else None,
    }


@router.get("/{job_id}", response_model=JobSummary, responses=JOB_ERRORS)
def show_job(job_id: str, tenant: str = TenantDep, session: Session = SessionDep):
    """State, counts, progress, timings and error of one job."""
    return job_summary(require_job(session, job_id, tenant))


@router.get(
    "/{job_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {"content": {NDJSON: {}}, "description": "one JSON line per input, in input order"},
        409: {"description": "a fit job, which has no results"},
        **JOB_ERRORS,
    },
)
def job_results(job_id: str, tenant: str = TenantDep, session: Session = SessionDep, settings: Settings = SettingsDep):
    """Results so far, streamed: an input not yet done has a null output and no error."""
    job = require_job(session, job_id, tenant)
    if job.kind != JobKind.generate.value:
        raise HTTPException(409, detail=f"job {job_id} is a {job.kind} job: only generate jobs have results")
    return StreamingResponse(result_lines(settings, job_id), media_type=NDJSON)


@router.get("/{job_id}/events", response_model=schemas.EventPage, responses=JOB_ERRORS)
def job_events(
    job_id: str,
    after: int = Query(0, ge=0, le=2**62, description="only events with a larger id"),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """State changes, model loads and, for fit jobs, every step's loss and tokens/s."""
    require_job(session, job_id, tenant)
    return {"events": [schemas.event_line(event) for event in queries.job_events(session, job_id, after)]}


@router.post("/{job_id}/cancel", response_model=JobSummary, responses=JOB_ERRORS)
def cancel_job(job_id: str, tenant: str = TenantDep, session: Session = SessionDep):
    """A queued job is cancelled at once; a running one stops within about a second, between two decode
    steps (or fit steps): the runner asks for cancellation at most once a second."""
    require_job(session, job_id, tenant)
    summary = job_summary(queries.request_cancel(session, job_id))
    logger.info(logfmt("job_state", job=job_id, state=summary["status"], cancel_requested=True, tenant=tenant))
    return summary


# ---------------------------------------------------------------- helpers


def replayed(response: Response, earlier, job: BaseModel, key: str) -> dict:
    """The job first made under `key`, if this request is the one that made it; else 422
    (as Stripe's API and the IETF Idempotency-Key draft answer a key reused for another request)."""
    if earlier.request_digest is not None and earlier.request_digest != request_digest(job):
        raise field_error(
            ("header", "idempotency-key"),
            f"Idempotency-Key {key!r} was already used for a different request; use a new key for a new job",
        )
    response.headers["Location"] = f"/v1/jobs/{earlier.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return job_summary(earlier)


def checked_preset(session: Session, settings: Settings, handle: str, tenant: str) -> str:
    """The preset a job records (`authorized_preset`), or a 422 on `preset` naming the closest names."""
    try:
        return authorized_preset(session, settings, handle, tenant)
    except PresetNotAllowed as refusal:
        suggestion = did_you_mean(handle, preset_names(session, tenant))
        raise field_error(("body", "preset"), f"{refusal}{suggestion}") from None


def check_item_models(session: Session, settings: Settings, job: BaseModel, tenant: str) -> None:
    """A 422 on the first input whose own `model` the tenant may not use (each model checked once).
    That it is an adapter of the job's base, the worker checks, input by input."""
    allowed = set()
    for index, item in enumerate(getattr(job, "inputs", None) or []):
        if item.model is None or item.model in allowed:
            continue
        try:
            authorized_preset(session, settings, item.model, tenant)
        except PresetNotAllowed as refusal:
            raise field_error(("body", "inputs", index, "model"), str(refusal)) from None
        allowed.add(item.model)


def field_error(location: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": location, "msg": message, "type": "value_error"}])


def find_job(session: Session, job_id: str, tenant: str):
    """A malformed id is simply no job (and never reaches SQL)."""
    return queries.get_job(session, job_id, tenant) if JOB_ID.fullmatch(job_id) else None


def require_job(session: Session, job_id: str, tenant: str):
    job = find_job(session, job_id, tenant)
    if job is None:
        raise HTTPException(404, detail=f"no job {job_id!r}")
    return job


def result_lines(settings: Settings, job_id: str) -> Iterator[bytes]:
    """Streamed from a session of its own, which lives as long as the response."""
    with session_scope(sessions(settings)) as session:
        for item in queries.job_items(session, job_id):
            yield schemas.jsonl(schemas.result_line(item)).encode()
