"""A fine-tuning job's `validating_files` step, after its create request has answered.

The job is made `validating` (OpenAI's `validating_files`), held by the API server
that made it under the job's lease (core/store/leases.py), and a thread of that
server reads its files line by line. Good files become the fit job's rows, its
"auto" hyperparameters are resolved against them, and the job is queued for a
worker; a file with bad lines fails the job, its error naming each bad line, so
that nothing trains. A server that stops mid-way leaves the lease to run out (or,
on its host, its process to be seen gone): every `lmq serve` takes such
validations up in its sweep (`take_up_validations`), and the one that wins the
takeover reads the files again. A job cancelled meanwhile is left cancelled.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session

from lmq.api.app.dispatch import BrokerUnavailable
from lmq.api.app.openai.fine_tuning.service import fine_tuning_of, training_rows
from lmq.core.config import Settings
from lmq.core.domain.fine_tuning import FINE_TUNING, TrainingFileInvalid, fit_hyperparameters
from lmq.core.domain.fit import fit_steps
from lmq.core.names import JobKind, JobState
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.core.store.models import Job

logger = logging.getLogger(__name__)

# As a batch's validation: reading a file of LMQ_MAX_INPUTS lines takes far less.
VALIDATION_LEASE_S = 600


def start_validation(settings: Settings, dispatch, job_id: str) -> None:
    """Read the job's files in a thread of this server, which holds its validation."""
    threading.Thread(
        target=validate, args=(settings, dispatch, job_id, leases.holder_name()), name=f"lmq-validate-{job_id}",
        daemon=True,
    ).start()


def validate(settings: Settings, dispatch, job_id: str, holder: str) -> None:
    """Queue the job with its files' rows, or fail it naming their bad lines; nothing if `holder`
    no longer holds its validation (cancelled, or taken over)."""
    factory = sessions(settings)
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        if job is None:  # deleted meanwhile
            return
        shown = fine_tuning_of(job)
    try:
        training = training_rows(settings, shown["training_file"], "training_file")
        validation_file = shown.get("validation_file")
        validation = training_rows(settings, validation_file, "validation_file") if validation_file else []
        invalid = None
    except TrainingFileInvalid as problem:
        training, validation, invalid = [], [], problem
    except Exception:  # the object store away, say: read again once the lease runs out
        logger.exception("fine-tuning job %s: its files could not be read; read again in %d s", job_id, VALIDATION_LEASE_S)
        return
    with session_scope(factory) as session:
        job = leases.held_validation(session, job_id, holder)
        if job is None:
            return
        if invalid is not None:
            queries.finish_job(session, job_id, JobState.failed, error=str(invalid), code=invalid.code, param=invalid.param)
            return
        queue_with_rows(session, job, training, validation)
    try:
        dispatch.submit(job_id, JobKind.fit.value)
    except BrokerUnavailable as error:  # queued in the database: the workers' sweep sends it once the broker is back
        logger.warning("fine-tuning job %s: %s", job_id, error)


def queue_with_rows(session: Session, job: Job, training: list[dict], validation: list[dict]) -> None:
    """The validated job as the fit job a worker runs: its rows, its hyperparameters resolved, queued."""
    shown = fine_tuning_of(job)
    job.params = {**fit_hyperparameters(shown["hyperparameters"], len(training)), "seed": shown["seed"], FINE_TUNING: shown}
    job.data = {"training_data": training, "validation_data": validation}
    job.total = fit_steps(len(training), job.params).total
    job.state, job.worker, job.lease_expires_at = JobState.queued.value, None, None
    queries.add_event(session, job.id, "state", state=JobState.queued.value, validated=True)
    if not validation:
        message = "No validation file: checkpoints have no valid_loss nor valid_mean_token_accuracy"
        queries.add_event(session, job.id, "fine_tuning", message=message)


def take_up_validations(settings: Settings, dispatch) -> list[str]:
    """Validate again the jobs whose validating server stopped; returns their ids."""
    holder, taken = leases.holder_name(), []
    with session_scope(sessions(settings)) as session:
        for job_id, stopped in leases.stale_validations(session):
            if leases.take_up_validation(session, job_id, stopped, holder, VALIDATION_LEASE_S):
                taken.append(job_id)
    for job_id in taken:
        start_validation(settings, dispatch, job_id)
    if taken:
        logger.warning("took up %d fine-tuning validation(s) a stopped server left: %s", len(taken), ", ".join(taken))
    return taken
