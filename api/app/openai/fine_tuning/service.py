"""A fine-tuning job of OpenAI's API as one lmq fit job: its files read into training rows, and
the job, its events and its checkpoints as OpenAI's API shows them.

The files are read and checked line by line in the job's `validating_files`
step (validation.py): a file with bad lines fails the job, its error naming
each bad line, so that no training runs. Otherwise the rows go into the fit
job, which a worker runs as any fit job; there its examples are tokenized (chat template, masks), and an
example that cannot train fails the job before its first step.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from lmq.api.app.openai.batches.lines import LineError, read_lines
from lmq.api.app.openai.common import unix
from lmq.api.app.openai.files.routes import upload_key
from lmq.core.config import Settings
from lmq.core.domain.fine_tuning import (
    FINE_TUNING,
    MAX_LINE_PROBLEMS,
    TrainingFileInvalid,
    check_training_line,
    openai_job_id,
    openai_status,
    shown_hyperparameters,
)
from lmq.core.names import JobState
from lmq.core.storage import storage
from lmq.core.store import queries
from lmq.core.store.models import Job, JobEvent
from lmq.core.utf8 import NotUtf8

FILE_PURPOSE = "fine-tune"
# The fit job's events that OpenAI's list shows, and the per-epoch ones that are its checkpoints.
SHOWN_EVENTS = ("state", "fine_tuning", "resumed", "step", "epoch", "holder_exited", "handed_back")
CHECKPOINT_EVENTS = ("epoch",)


# ---------------------------------------------------------------- files


def training_rows(settings: Settings, file_id: str, param: str) -> list[dict]:
    """The rows of an uploaded file (check_training_line's), or TrainingFileInvalid naming its bad lines."""
    rows, found, count = [], [], 0
    try:
        with storage(settings).local_copy(upload_key(file_id)) as path:
            for number, raw in read_lines(path, settings.limits):
                try:
                    if isinstance(raw, LineError):
                        raise ValueError(raw.message)
                    rows.append(check_training_line(parse(raw, number), number, settings.limits))
                except ValueError as problem:
                    count += 1
                    if len(found) < MAX_LINE_PROBLEMS:
                        found.append(str(problem))
    except NotUtf8 as error:
        raise TrainingFileInvalid(param, [f"the file is not UTF-8 text: {error}"]) from None
    except FileNotFoundError:
        raise TrainingFileInvalid(param, [f"file {file_id!r} was deleted"]) from None
    if count:
        raise TrainingFileInvalid(param, found, count)
    if not rows:
        raise TrainingFileInvalid(param, ["the file has no examples"])
    if len(rows) > settings.limits.inputs_per_job:
        limit = settings.limits.inputs_per_job
        raise TrainingFileInvalid(param, [f"the file has more than {limit} examples (LMQ_MAX_INPUTS)"])
    return rows


def parse(raw: bytes, number: int):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number} is not JSON: {error.msg} (column {error.colno})") from None


# ---------------------------------------------------------------- the job


def fine_tuning_of(job: Job) -> dict:
    """What OpenAI's API shows of a fit job beyond the fit itself (none for a plain lmq fit job)."""
    return (job.params or {}).get(FINE_TUNING) or {}


def final_state_event(session: Session, job: Job) -> dict:
    """The data of the event that ended the job (its error's code and param, the tokens trained)."""
    if job.state not in (JobState.succeeded.value, JobState.failed.value):
        return {}
    event = queries.last_event(session, job.id, "state")
    return event.data if event is not None else {}


def job_object(session: Session, job: Job) -> dict:
    """The job as OpenAI's API shows it (`openai.types.fine_tuning.FineTuningJob`)."""
    extra = fine_tuning_of(job)
    ended = final_state_event(session, job)
    succeeded = job.state == JobState.succeeded.value
    error = None
    if job.state == JobState.failed.value:
        error = {"code": ended.get("code") or "job_failed", "message": job.error or "", "param": ended.get("param")}
    if job.state == JobState.validating.value:  # as given ("auto" too), until the files are read
        hyperparameters = extra["hyperparameters"]
    else:
        hyperparameters = shown_hyperparameters({k: v for k, v in job.params.items() if k != FINE_TUNING})
    return {
        "id": openai_job_id(job.id),
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": error,
        "fine_tuned_model": job.output_preset if succeeded else None,
        "finished_at": unix(job.finished_at),
        "hyperparameters": hyperparameters,
        "model": extra.get("model", job.preset),
        "organization_id": job.tenant,
        "result_files": [],
        "seed": extra.get("seed"),
        "status": openai_status(job.state),
        "trained_tokens": ended.get("trained_tokens") if succeeded else None,
        "training_file": extra.get("training_file"),
        "validation_file": extra.get("validation_file"),
        "estimated_finish": None,
        "integrations": None,
        "metadata": extra.get("metadata"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": extra.get("suffix"),
    }


# ---------------------------------------------------------------- events and checkpoints


def event_object(job: Job, event: JobEvent) -> dict:
    """A fit job's event as OpenAI's (`FineTuningJobEvent`): a message, its level, and its data."""
    level, kind, message = "info", "message", event_message(job, event)
    data = dict(event.data)
    if event.type == "step":
        kind = "metrics"
        data = {"step": data.get("step"), "total_steps": job.total, "train_loss": data.get("loss")}
    elif event.type == "epoch":
        kind, data = "metrics", checkpoint_metrics(data)
    elif event.type == "state" and data.get("state") == JobState.failed.value:
        level = "error"
        data = {"error": {"code": data.get("code") or "job_failed", "message": data.get("error"), "param": data.get("param")}}
    return {
        "id": f"ftevent-{event.id}",
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": level,
        "message": message,
        "data": data,
        "type": kind,
    }


def event_message(job: Job, event: JobEvent) -> str:
    data = event.data
    if event.type == "fine_tuning":
        return data["message"]
    if event.type == "step":
        loss = data.get("loss")
        return f"Step {data.get('step')}/{job.total}: training loss={loss:.4f}" if loss is not None else f"Step {data.get('step')}"
    if event.type == "epoch":
        return f"Checkpoint created at step {data.get('step')} (epoch {data.get('epoch')})"
    if event.type == "resumed":
        return f"Resumed from the checkpoint of epoch {data.get('epochs_done')} (step {data.get('step')})"
    if event.type == "holder_exited":
        return f"The worker running the job ({data.get('worker')}) has exited"
    if event.type == "handed_back":
        return f"The worker running the job ({data.get('worker')}) is stopping and handed it back"
    state = data.get("state")
    if state == JobState.validating.value:
        return f"Validating {data.get('files')}"
    if state == JobState.queued.value:
        if data.get("validated"):
            return "Files validated, moving job to queued state"
        return "Fine-tuning job resumed" if data.get("resumed") else f"Created fine-tuning job: {openai_job_id(job.id)}"
    if state == JobState.running.value:
        if data.get("attempt") is None:
            return "Fine-tuning job resumed"  # before it had paused
        return "Fine-tuning job started" if data["attempt"] == 1 else f"Fine-tuning job taken up again (attempt {data['attempt']})"
    if state == JobState.succeeded.value:
        return f"The job has successfully completed: new fine-tuned model {job.output_preset}"
    if state == JobState.failed.value:
        return f"The job failed: {data.get('error')}"
    return {
        JobState.cancelling.value: "Cancelling the job",
        JobState.cancelled.value: "The job was cancelled",
        JobState.pausing.value: "Pausing the job at its next step",
        JobState.paused.value: "The job is paused",
    }.get(state, f"{event.type}: {state}")


def checkpoint_metrics(data: dict) -> dict:
    """An epoch's metrics as OpenAI's checkpoints name them: the loss and the token accuracy on the
    training examples (the epoch's mean) and on the validation file (None without one)."""
    return {
        "step": data.get("step"),
        "train_loss": data.get("loss"),
        "train_mean_token_accuracy": data.get("sparse_categorical_accuracy"),
        "valid_loss": data.get("val_loss"),
        "valid_mean_token_accuracy": data.get("val_sparse_categorical_accuracy"),
        "full_valid_loss": data.get("val_loss"),
        "full_valid_mean_token_accuracy": data.get("val_sparse_categorical_accuracy"),
    }


def checkpoint_object(job: Job, event: JobEvent) -> dict:
    """An epoch's checkpoint as OpenAI's (`FineTuningJobCheckpoint`). Its weights are the job's to
    resume from; only the job's final model is a model that requests can name."""
    metrics = checkpoint_metrics(event.data)
    return {
        "id": f"ftckpt-{event.id}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(event.created_at),
        "fine_tuned_model_checkpoint": f"{job.output_preset}:ckpt-step-{metrics['step']}",
        "fine_tuning_job_id": openai_job_id(job.id),
        "metrics": metrics,
        "step_number": metrics["step"],
    }


def event_cursor(after: str | None, prefix: str) -> int | None:
    """The event id of a page's `after` (`ftevent-12`, `ftckpt-12`); ValueError for another string."""
    if after is None:
        return None
    number = after.removeprefix(prefix)
    if not after.startswith(prefix) or not number.isdigit():
        raise ValueError(f"after: {after!r} is not a {prefix}... id of this job")
    return int(number)
