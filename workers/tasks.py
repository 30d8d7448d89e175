"""The one Celery task: run a job by id through the process's job runner; and what
runs beside it in every worker: the sweep (workers/sweep.py) and the metrics server
(workers/metrics.py)."""

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from lmq.core.config import load_settings
from lmq.core.store.leases import HELD_STATES
from lmq.workers import metrics
from lmq.workers.attempt import DRAINING, start_draining
from lmq.workers.celery_app import RUN_JOB_TASK
from lmq.workers.runner import process_runner
from lmq.workers.sweep import Sweeper

_sweeper: Sweeper | None = None


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Idempotent: a redelivered or duplicate message finishes what is left, or nothing. A job handed
    back by a draining worker goes back to the broker, for the next worker to take at once."""
    state = process_runner(load_settings()).run(job_id)
    if DRAINING.is_set() and state in HELD_STATES:
        raise Reject(f"job {job_id} handed back: this worker is stopping", requeue=True)
    return state


@worker_ready.connect
def start_sweeping(sender, **_) -> None:
    global _sweeper
    settings = load_settings()
    metrics.serve(settings.worker_metrics_port)
    _sweeper = Sweeper(sender.app, settings)
    _sweeper.start()


@worker_shutting_down.connect
def drain(how, **_) -> None:
    """SIGTERM (a warm shutdown): Celery takes no more jobs, and the running one is handed back."""
    if how == "Warm":
        start_draining(load_settings().drain_s)


@worker_shutdown.connect
def stop_sweeping(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
