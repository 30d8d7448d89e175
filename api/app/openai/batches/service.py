"""A batch of the OpenAI Batch API as one lmq generate job: validation, status, output lines.

Validation reads the input file a line at a time (lines.py) and writes
the job's items as it goes, in one transaction with the job itself: a line
that cannot run (malformed, another model, an unknown model) becomes an item
that is finished with its error, so it lands in the error file in its place
and the other lines run. Only a file with no usable line at all fails the
batch. The batch's status, counts and files are then read from its job;
its output and error files (lmq.core.store.batch_files) are recorded by a
runner or the recovery sweep once the job has ended, and rendered from the
job's items when downloaded. Reading a batch writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from sqlalchemy.orm import Session, object_session

from lmq.api.app.dispatch import BrokerUnavailable
from lmq.api.app.openai.common import unix
from lmq.api.app.openai.batches.lines import CHAT, LineError, Request, parse_line, read_lines
from lmq.core.config import Settings
from lmq.core.domain.jobs import preset_task_kind
from lmq.core.domain.presets import PresetNotAllowed, authorized_preset
from lmq.core.names import TERMINAL_STATES, JobState, TaskKind
from lmq.core.presets import PresetNotFound
from lmq.core.storage import storage
from lmq.core.store import session_scope, sessions
from lmq.core.store.batch_files import deadline, finalize_job_batch, output_usage, past_window
from lmq.core.store.batches import create_batch_job, fail_validation, stale_validations, take_up_validation
from lmq.core.store.models import Job, OpenAIBatch, utcnow
from lmq.core.store.presets import PresetRefused, check_preset_for_job, store_resolver
from lmq.core.utf8 import NotUtf8

logger = logging.getLogger("lmq.api")

# A validation this old that has not ended was cut short (its server stopped): it is taken up again.
VALIDATION_STALE_S = 600
NOT_AN_OBJECT = ("invalid_json", "line_too_long")  # the codes of a line that is no JSON object
MAX_MODEL_LOOKUPS = 256  # distinct model names checked per file: a file cannot make a validation unbounded


def files_directory(settings: Settings) -> Path:
    """Where uploads are received on this host, before they go to the object store."""
    return settings.home / "files"


@contextlib.contextmanager
def input_file(settings: Settings, file_id: str) -> Iterator[Path]:
    """An uploaded file on this host's disk while it is validated (from the object store)."""
    copied = False
    try:
        with storage(settings).local_copy(f"files/{file_id}") as path:
            copied = True
            yield path
    except FileNotFoundError:
        if copied:
            raise
        raise NotABatchFile("file_not_found", f"input file {file_id!r} was deleted before validation") from None


# ---------------------------------------------------------------- validation


class NotABatchFile(ValueError):
    """The input file as a whole cannot be a batch: OpenAI's validation error."""

    def __init__(self, code: str, message: str, line: int | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": "input_file_id", "line": line}


class Models:
    """Which model names this tenant may use, each looked up once (`authorized_preset`, as for /v1/jobs)."""

    def __init__(self, session: Session, settings: Settings, tenant: str):
        self.session, self.settings, self.tenant = session, settings, tenant
        self.found: dict[str, str | None] = {}

    def locate(self, name: str) -> str | None:
        """The preset the job records for model `name`; None when the tenant has no such model."""
        if name not in self.found:
            if len(self.found) >= MAX_MODEL_LOOKUPS:
                return None
            try:
                self.found[name] = authorized_preset(self.session, self.settings, name, self.tenant)
            except PresetNotAllowed:
                self.found[name] = None
        return self.found[name]


def checked_task(session: Session, settings: Settings, model: str, preset: str, tenant: str) -> TaskKind:
    """The preset's task from its config.json, as /v1/jobs tells it (a causal LM when the preset is
    not local). NotABatchFile when the preset's files do not parse or its declared sizes cannot fit
    (check_preset_for_job, as POST /v1/jobs checks), so that no line of such a batch runs."""
    try:
        location = store_resolver(session, tenant=tenant).locate(preset)
    except PresetNotFound:
        return TaskKind.causal_lm
    try:
        check_preset_for_job(location, preset, settings)
    except PresetRefused as refused:
        raise NotABatchFile("model_not_usable", f"model {model!r} cannot run here: {refused}") from None
    return preset_task_kind(location) or TaskKind.causal_lm


def lines_of(path: Path, endpoint: str, settings: Settings) -> Iterator[tuple[int, Request | LineError]]:
    try:
        for number, raw in read_lines(path, settings.limits):
            if isinstance(raw, LineError):
                yield number, raw
                continue
            try:
                yield number, parse_line(raw, number, endpoint, settings.limits)
            except LineError as error:
                yield number, error
    except NotUtf8 as error:  # the whole file is refused, lines that parsed too
        raise NotABatchFile("invalid_file_encoding", f"the input file cannot run: {error}") from None


def batch_model(path: Path, endpoint: str, settings: Settings, models: Models) -> tuple[str, str]:
    """(model, preset) of the batch: the first line's that names a model the tenant may use.
    NotABatchFile when no line does, saying why: no line is JSON, or the models they name, or what
    was wrong with the first line."""
    first_problem = unknown_model = None
    lines, objects = 0, False
    for number, request in lines_of(path, endpoint, settings):
        lines += 1
        objects = objects or not (isinstance(request, LineError) and request.code in NOT_AN_OBJECT)
        if isinstance(request, Request):
            if (preset := models.locate(request.model)) is not None:
                return request.model, preset
            unknown_model = unknown_model or (number, request.model)
        first_problem = first_problem or (number, request)
    if lines == 0:
        raise NotABatchFile("empty_file", "the input file has no lines")
    number, problem = first_problem
    if not objects:
        raise NotABatchFile("invalid_json_line", f"the input file is not JSONL: {problem.message}", number)
    if unknown_model is not None:
        number, model = unknown_model
        raise NotABatchFile(
            "model_not_found",
            f"no line of the input file names a model you can use; line {number} names {model!r} "
            "(GET /v1/models lists yours)",
            number,
        )
    message = f"no line of the input file is a request this batch can run; {problem.message}"
    raise NotABatchFile(problem.code, message, number)


def job_items(
    path: Path, batch: OpenAIBatch, model: str, settings: Settings, models: Models, task: TaskKind
) -> Iterator[dict]:
    """One item per line, in order; a line that cannot run is an item with its error (and its error's code).
    A sequence-to-sequence model (Bart) reads a completion's prompt as its encoder text and has no chat."""
    seen: set[str] = set()
    count = 0
    for number, request in lines_of(path, batch.endpoint, settings):
        count += 1
        if count > settings.limits.inputs_per_job:
            raise NotABatchFile(
                "too_many_requests",
                f"the input file has more than {settings.limits.inputs_per_job} requests (LMQ_MAX_INPUTS)",
            )
        if isinstance(request, LineError):
            yield refused(request.custom_id, request.code, request.message)
        elif request.custom_id in seen:
            message = f"line {number}: custom_id {request.custom_id!r} is not unique in the file"
            yield refused(request.custom_id, "duplicate_custom_id", message)
        elif request.model != model and models.locate(request.model) is None:
            seen.add(request.custom_id)
            message = f"line {number}: model {request.model!r} does not exist or you cannot use it"
            yield refused(request.custom_id, "model_not_found", message)
        elif task is TaskKind.seq2seq_lm and "messages" in request.input:
            seen.add(request.custom_id)
            message = f"line {number}: model {model!r} is a sequence-to-sequence model: send /v1/completions prompts"
            yield refused(request.custom_id, "model_not_supported", message)
        else:
            seen.add(request.custom_id)
            source = request.input
            if task is TaskKind.seq2seq_lm:
                source = {task.prompt_field: source["prompt"], "params": source["params"]}
            if request.model != model:  # an adapter of the batch's base (the worker checks that, row by row)
                source = {**source, "model": request.model}
            yield {"custom_id": request.custom_id, "input": source}


def refused(custom_id: str | None, code: str, message: str) -> dict:
    return {"custom_id": custom_id, "input": {"error_code": code}, "error": message}


def start_validation(settings: Settings, dispatch, batch_id: str) -> None:
    """Validate in a thread of its own: POST /v1/batches answers at once, `validating`. A server
    that stops meanwhile leaves the batch to be taken up again (see `take_up_validations`)."""
    threading.Thread(
        target=validate, args=(settings, dispatch, batch_id), name=f"lmq-validate-{batch_id}", daemon=True
    ).start()


def validate(settings: Settings, dispatch, batch_id: str) -> None:
    """Make the batch's job from its input file and hand it to a runner, or fail the batch saying why."""
    factory = sessions(settings)
    try:
        with session_scope(factory) as session, contextlib.ExitStack() as stack:
            batch = session.get(OpenAIBatch, batch_id)
            path = stack.enter_context(input_file(settings, batch.input_file_id))
            models = Models(session, settings, batch.tenant)
            model, preset = batch_model(path, batch.endpoint, settings, models)
            task = checked_task(session, settings, model, preset, batch.tenant)
            # A completion is what follows the prompt, cut from the whole text at render time (see
            # completion_text); a chat reply, or a Bart's output, is the generated text alone.
            keeps_prompt = batch.endpoint != CHAT and task is TaskKind.causal_lm
            job = create_batch_job(
                session,
                batch_id,
                preset=preset,
                model=model,
                params={"strip_prompt": not keeps_prompt},
                tenant=batch.tenant,
                items=job_items(path, batch, model, settings, models, task),
            )
            if job is None:
                session.rollback()
                return
            job_id = job.id
    except NotABatchFile as problem:
        with session_scope(factory) as session:
            fail_validation(session, batch_id, [problem.error])
        logger.info("batch %s failed validation: %s", batch_id, problem)
        return
    except Exception as error:
        logger.exception("batch %s: validation failed", batch_id)
        with session_scope(factory) as session:
            fail_validation(session, batch_id, [{"code": "server_error", "message": f"validation failed: {error}"}])
        return
    logger.info("batch %s validated: job %s", batch_id, job_id)
    try:
        dispatch.submit(job_id, "generate")
    except BrokerUnavailable as error:  # the job is marked failed, and so is the batch
        logger.warning("batch %s: %s", batch_id, error)
        with session_scope(factory) as session:
            finalize_job_batch(session, job_id)


def take_up_validations(settings: Settings, dispatch) -> list[str]:
    """Validate again the batches whose validation began over VALIDATION_STALE_S ago and never
    ended (the server validating them stopped); returns their ids. Every `lmq serve` runs this
    in the background (app.py), so that another server, or this one started again, takes them up."""
    stale = utcnow() - timedelta(seconds=VALIDATION_STALE_S)
    taken = []
    with session_scope(sessions(settings)) as session:  # committed before the validation reads it
        for batch in stale_validations(session, stale):
            if take_up_validation(session, batch, stale):
                taken.append(batch.id)
    for batch_id in taken:
        start_validation(settings, dispatch, batch_id)
    if taken:
        logger.warning("took up %d batch validation(s) a stopped server left: %s", len(taken), ", ".join(taken))
    return taken


# ---------------------------------------------------------------- status and the batch object


def batch_status(batch: OpenAIBatch, job: Job | None) -> str:
    """Read from the batch and its job alone: past its window a batch is expired before the sweep
    records it, and a job that has ended shows `finalizing` (or `cancelling`) until its files are made."""
    if job is None:
        if batch.failed_at is not None:
            return "failed"
        return "cancelled" if batch.cancelled_at is not None else "validating"
    if past_window(batch, job, utcnow()):
        return "expired"
    finalized = batch.finalized_at is not None
    if job.state == JobState.succeeded.value:
        return "completed" if finalized else "finalizing"
    if job.state == JobState.failed.value:
        return "failed" if finalized else "finalizing"
    if job.state == JobState.cancelled.value:
        return "cancelled" if finalized else "cancelling"
    if job.state == JobState.cancelling.value:
        return "cancelling"
    if job.total and job.completed + job.failed == job.total:
        return "finalizing"  # every line is done; the runner is about to close the job
    return "in_progress"


def batch_object(batch: OpenAIBatch) -> dict:
    """The batch as OpenAI's API shows it (`openai.types.Batch`)."""
    job = batch.job
    status = batch_status(batch, job)
    ended = job is not None and job.state in TERMINAL_STATES
    errors = batch.errors
    if job is not None and job.state == JobState.failed.value:
        errors = [{"code": "batch_failed", "message": job.error, "param": None, "line": None}]
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": None if not errors else {"object": "list", "data": errors},
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(job.created_at) if job else None,
        "expires_at": unix(deadline(batch)),
        "finalizing_at": unix(job.finished_at) if ended else None,
        "completed_at": unix(job.finished_at) if status == "completed" else None,
        "failed_at": unix(batch.failed_at or (job.finished_at if status == "failed" else None)),
        "expired_at": unix(batch.expired_at or (deadline(batch) if status == "expired" else None)),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at or (job.finished_at if status == "cancelled" else None)),
        "request_counts": request_counts(job),
        "usage": output_usage(object_session(batch), batch),
        "metadata": batch.user_metadata,
    }


def request_counts(job: Job | None) -> dict:
    """Once the job has ended, every line not completed is in the error file, and so counts as failed."""
    if job is None:
        return {"total": 0, "completed": 0, "failed": 0}
    failed = job.total - job.completed if job.state in TERMINAL_STATES else job.failed
    return {"total": job.total, "completed": job.completed, "failed": failed}
