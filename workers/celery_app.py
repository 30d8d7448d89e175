"""The Celery app: one task, `lmq.run_job(job_id)`, routed to a queue per job kind
(and, for the presets LMQ_PRESET_QUEUES names, to workers that keep them loaded).

Celery only carries job ids; what a job is and how far it got lives in SQL, so
there is no result backend. Importing this module is light (no keras/torch),
so the API and `lmq submit` can enqueue through it.
"""

from __future__ import annotations

from celery import Celery

from lmq.core.config import Settings
from lmq.core.store import JobState, leases, queries, session_scope, sessions

RUN_JOB_TASK = "lmq.run_job"


def queue_for(kind: str, preset: str, settings: Settings) -> str:
    """`lmq.<kind>`, or `lmq.<kind>.<queue>` for a preset with workers of its own."""
    dedicated = settings.preset_queues.get(preset)
    return f"lmq.{kind}.{dedicated}" if dedicated else f"lmq.{kind}"


def worker_queue(name: str) -> str:
    """What `lmq worker --queues` accepts: `generate`, `fit.big-gpu`, or a full `lmq.` name."""
    return name if name.startswith("lmq.") else f"lmq.{name}"


def make_celery(settings: Settings) -> Celery:
    if settings.broker_url is None:
        raise ValueError("LMQ_BROKER_URL is not set: there is no broker to send jobs through")
    app = Celery("lmq", broker=settings.broker_url, include=["lmq.workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # LMQ_WORKER_JOBS jobs at once per worker (a thread pool of that many: `lmq
        # worker`), each message acknowledged once its job has finished; a prefetch
        # multiplier of 1 reserves no message beyond those the threads run, so a busy
        # worker holds none that an idle one could run. Generate jobs on one model share
        # its engine (workers/pool.py): a worker that holds a model takes several of its
        # jobs, and LMQ_PRESET_QUEUES sends a model's jobs to the workers holding it. Each
        # job's thread keeps its own lease heartbeat (workers/attempt.py) while the
        # engine's thread steps. Who
        # runs a job is decided in SQL: a dead worker's job is taken over through
        # its lease and sent again by the sweep (workers/sweep.py), so recovery
        # never waits for Redis's visibility timeout; that stays above the longest
        # job only to spare live jobs a duplicate message (which their lease refuses).
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Celery 6's default, set to silence its warning: a job cut short by it is
        # taken up again through its lease, its finished rows kept.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # A broker that restarts is waited for, however long it takes.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue="lmq.generate",
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def enqueue_job(app: Celery, settings: Settings, job_id: str, kind: str) -> None:
    """Send a job by task name (the sender never imports the task's code).

    A job that cannot be sent is marked failed rather than left queued forever.
    """
    with session_scope(sessions(settings)) as session:
        preset = queries.get_job(session, job_id).preset
        leases.mark_sent(session, job_id, last_seen=None)
    try:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_for(kind, preset, settings))
    except Exception as error:
        with session_scope(sessions(settings)) as session:
            queries.finish_job(session, job_id, JobState.failed, error=f"could not enqueue: {error}")
        raise
