"""/v1/files of the OpenAI Batch API: upload a batch's input file, list, show, download and delete files.

An upload's bytes live in the object store (core/storage; by default LMQ_HOME) as
`files/<file id>`, stored before its record commits, so every API server sees every
upload and a failed store leaves no record; a batch's output and error files are
rendered from its job's items when downloaded. Files are a tenant's own: another
tenant's file is a 404, as one that never existed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from lmq.api.app.dependencies import SessionDep, SettingsDep, TenantDep
from lmq.api.app.openai.batches.service import files_directory
from lmq.api.app.openai.common import OPENAI_ERRORS, OpenAIError, OpenAIRoute, not_found, page, unix
from lmq.api.app.openai.files.upload import receive_upload
from lmq.core.config import Settings
from lmq.core.storage import StorageError, storage
from lmq.core.store import session_scope, sessions
from lmq.core.store.batch_files import file_lines
from lmq.core.store.batches import UnknownCursor, add_file, delete_file, get_batch, get_file, list_files, new_id
from lmq.core.store.models import OpenAIFile

logger = logging.getLogger("lmq.api")
JSONL = "application/jsonl"
UPLOAD_PURPOSES = ("batch", "fine-tune")  # a batch's requests; a fine-tuning job's training or validation examples
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL, one request per line"},
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    },
                }
            }
        },
    }
}

router = APIRouter(prefix="/v1/files", tags=["openai"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)


def file_object(record: OpenAIFile) -> dict:
    """A file as OpenAI's API shows it (`openai.types.FileObject`)."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": unix(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": unix(record.expires_at),
    }


@router.post("", openapi_extra=UPLOAD_BODY, responses={413: {"description": "larger than LMQ_MAX_FILE_BYTES"}})
async def upload_file(request: Request, tenant: str = TenantDep, settings: Settings = SettingsDep):
    """Upload a JSONL file (multipart: `file`, `purpose`: "batch" for requests, "fine-tune" for
    training examples), streamed to disk."""
    directory = files_directory(settings)
    upload = await receive_upload(request, directory, settings.limits.file_bytes)
    try:
        purpose = upload.fields.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            wanted = " or ".join(map(repr, UPLOAD_PURPOSES))
            raise OpenAIError(400, f"purpose must be {wanted}, got {purpose!r}", param="purpose", code="invalid_request")
        file_id = new_id("file-")
        with session_scope(sessions(settings)) as session, storage_answers():
            record = add_file(
                session, file_id=file_id, tenant=tenant, purpose=purpose, filename=upload.filename, size=upload.size
            )
            await run_in_threadpool(storage(settings).put_file, upload.path, upload_key(file_id))
            return file_object(record)
    finally:
        upload.path.unlink(missing_ok=True)  # gone already once stored


@router.get("")
def list_your_files(
    purpose: Literal["batch", "batch_output", "fine-tune"] | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = Query(None, description="the last id of the previous page"),
    order: Literal["asc", "desc"] = "desc",
    tenant: str = TenantDep,
    session: Session = SessionDep,
):
    """Your files, newest first unless `order=asc`."""
    try:
        records = list_files(
            session, tenant, purpose=purpose, limit=limit + 1, after=after, newest_first=order == "desc"
        )
    except UnknownCursor as error:
        raise OpenAIError(400, str(error), param="after", code="invalid_request") from None
    return page([file_object(record) for record in records], limit)


@router.get("/{file_id}")
def show_file(file_id: str, tenant: str = TenantDep, session: Session = SessionDep):
    return file_object(require_file(session, file_id, tenant))


@router.get("/{file_id}/content", response_class=StreamingResponse, responses={200: {"content": {JSONL: {}}}})
def file_content(
    file_id: str, tenant: str = TenantDep, session: Session = SessionDep, settings: Settings = SettingsDep
):
    """The file's bytes: an upload as it was sent, a batch's output or error file as JSONL in input order."""
    record = require_file(session, file_id, tenant)
    if record.batch_id is not None:
        return StreamingResponse(batch_file(settings, record), media_type=JSONL)
    store = storage(settings)
    if store.is_local:
        return FileResponse(store.local_path(upload_key(record.id)), media_type=JSONL, filename=record.filename)
    with storage_answers():
        chunks = store.iter_bytes(upload_key(record.id))
    disposition = f"attachment; filename*=utf-8''{quote(record.filename)}"
    return StreamingResponse(chunks, media_type=JSONL, headers={"content-disposition": disposition})


@router.delete("/{file_id}")
def remove_file(file_id: str, tenant: str = TenantDep, settings: Settings = SettingsDep):
    """Delete a file (a batch made from an upload keeps its requests: they are in its job)."""
    with session_scope(sessions(settings)) as session:  # gone before the answer says so
        record = require_file(session, file_id, tenant)
        delete_file(session, record)
    if record.batch_id is None:
        try:
            storage(settings).delete(upload_key(record.id))
        except StorageError as error:  # the record is gone, so nobody reads these bytes again
            logger.warning("file %s: its bytes stay in the object store: %s", file_id, error)
    return {"id": file_id, "object": "file", "deleted": True}


def upload_key(file_id: str) -> str:
    return f"files/{file_id}"


@contextlib.contextmanager
def storage_answers():
    """An object store that fails (through its retries, or refusing) is a 503 saying so."""
    try:
        yield
    except StorageError as error:
        raise OpenAIError(503, str(error), code="storage_unavailable") from None


def require_file(session: Session, file_id: str, tenant: str) -> OpenAIFile:
    record = get_file(session, file_id, tenant)
    if record is None:
        raise not_found("file", file_id, "file_id")
    return record


def batch_file(settings: Settings, record: OpenAIFile):
    """Streamed from a session of its own, which lives as long as the response."""
    with session_scope(sessions(settings)) as session:
        batch = get_batch(session, record.batch_id, record.tenant)
        for _, line in file_lines(session, batch, only=record.lines):
            yield line.encode()
