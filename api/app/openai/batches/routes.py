"""/v1/batches and /v1/models of the OpenAI Batch API.

A batch is one lmq generate job: created `validating`, it becomes its job once
its input file is read (service.validate, run after the answer is
sent), and from then on its status, counts and files are the job's. Batches
are a tenant's own: another tenant's batch is a 404, as one that never existed.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from pydantic import Field
from sqlalchemy.orm import Session

from lmq.api.app.dependencies import DispatchDep, SessionDep, SettingsDep, TenantDep
from lmq.api.app.openai.batches.service import batch_object, batch_status, start_validation
from lmq.api.app.openai.common import OPENAI_ERRORS, OpenAIError, OpenAIRoute, not_found, page, unix
from lmq.api.app.openai.batches.lines import ENDPOINTS
from lmq.core.config import Settings
from lmq.core.domain.fields import Strict, text
from lmq.core.names import is_preset_name
from lmq.core.plugins import get_registry
from lmq.core.store import queries, session_scope, sessions
from lmq.core.store.batch_files import finalize_if_ended, window_hours
from lmq.core.store.batches import UnknownCursor, add_batch, cancel_validation, get_batch, get_file, list_batches
from lmq.core.store.models import OpenAIBatch, utcnow

router = APIRouter(tags=["openai"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)


class OutputExpiresAfter(Strict):
    """OpenAI's expiry of a batch's output and error files: seconds after they are made (1 hour to 30 days)."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class BatchIn(Strict):
    input_file_id: text(64, label=True)
    endpoint: Literal[ENDPOINTS]
    completion_window: text(16, label=True) = "24h"
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[text(64, label=True), text(512, min_length=0)] | None = Field(None, max_length=16)
    output_expires_after: OutputExpiresAfter | None = None


@router.post("/v1/batches")
def create_batch(body: BatchIn, tenant: str = TenantDep, settings: Settings = SettingsDep, dispatch=DispatchDep):
    """A batch of the requests in an uploaded file; `validating` until its file has been read."""
    if window_hours(body.completion_window) is None:
        raise OpenAIError(
            400,
            f"completion_window must be hours such as '24h', got {body.completion_window!r}",
            param="completion_window",
            code="invalid_request",
        )
    with session_scope(sessions(settings)) as session:  # committed before the validation reads it
        record = get_file(session, body.input_file_id, tenant)
        if record is None or record.batch_id is not None:
            raise not_found("file", body.input_file_id, "input_file_id")
        batch = add_batch(
            session,
            tenant=tenant,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=None if body.output_expires_after is None else body.output_expires_after.seconds,
        )
        created = batch_object(batch)
    start_validation(settings, dispatch, created["id"])
    return created


@router.get("/v1/batches")
def list_your_batches(
    limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, description="the last id of the previous page"),
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """Your batches, newest first."""
    try:
        batches = list_batches(session, tenant, limit=limit + 1, after=after)
    except UnknownCursor as error:
        raise OpenAIError(400, str(error), param="after", code="invalid_request") from None
    return page([batch_object(batch) for batch in batches], limit)


@router.get("/v1/batches/{batch_id}")
def show_batch(batch_id: str, tenant: str = TenantDep, session: Session = SessionDep):
    """The batch as it stands: read only (its expiry and files are the recovery sweep's and the runner's)."""
    return batch_object(require_batch(session, batch_id, tenant))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, tenant: str = TenantDep, settings: Settings = SettingsDep):
    """Stop a batch: `cancelling` until its runner stops; the lines that finished stay in its output file."""
    with session_scope(sessions(settings)) as session:
        batch = require_batch(session, batch_id, tenant, for_update=True)
        finalize_if_ended(session, batch)  # a batch whose job has just ended is no longer cancellable
        # A batch validating is cancelled at once, unless its job was made meanwhile.
        if batch_status(batch, batch.job) != "validating" or not cancel_validation(session, batch):
            status = batch_status(batch, batch.job)
            if status in ("in_progress", "finalizing"):
                queries.request_cancel(session, batch.job_id)
                batch.cancelling_at = batch.cancelling_at or utcnow()
            elif status != "cancelling":
                message = f"batch {batch_id!r} is {status}: only a batch still running can be cancelled"
                raise OpenAIError(409, message, code="invalid_state")
        finalize_if_ended(session, batch)  # a queued job is cancelled at once: its files are made now
        return batch_object(batch)


@router.get("/v1/models")
def list_models(tenant: str = TenantDep, session: Session = SessionDep):
    """The presets you can name as a request's `model`: the built-in ones and the store's that you may use."""
    return {
        "object": "list",
        "data": [*builtin_models(), *(store_model(p) for p in queries.list_presets(session, tenant))],
    }


@router.get("/v1/models/{model}")
def show_model(model: str, tenant: str = TenantDep, session: Session = SessionDep):
    for found in builtin_models():
        if found["id"] == model:
            return found
    stored = queries.get_preset(session, model, tenant) if is_preset_name(model) else None
    if stored is None:
        raise not_found("model", model, "model")
    return store_model(stored)


def builtin_models() -> list[dict]:
    return [
        {"id": name, "object": "model", "created": 0, "owned_by": architecture.plugin}
        for architecture in get_registry().architectures()
        for name in sorted(architecture.presets)
    ]


def store_model(preset) -> dict:
    return {"id": preset.name, "object": "model", "created": unix(preset.created_at), "owned_by": preset.tenant}


def require_batch(session: Session, batch_id: str, tenant: str, *, for_update: bool = False) -> OpenAIBatch:
    batch = get_batch(session, batch_id, tenant, for_update=for_update)
    if batch is None:
        raise not_found("batch", batch_id, "batch_id")
    return batch
