"""The one Celery task: run a job by id through the process's job runner; and what
runs beside it in every worker: the sweep (workers/sweep.py) and the metrics server
(workers/metrics.py)."""

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from lmq.core.config import load_settings
from lmq.workers import metrics
from lmq.workers.celery_app import RUN_JOB_TASK
from lmq.workers.runner import process_runner
from lmq.workers.sweep import Sweeper

_sweeper: Sweeper | None = None


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Idempotent: a redelivered or duplicate message finishes what is left, or nothing."""
    return process_runner(load_settings()).run(job_id)


@worker_ready.connect
def start_sweeping(sender, **_) -> None:
    global _sweeper
    settings = load_settings()
    metrics.serve(settings.worker_metrics_port)
    _sweeper = Sweeper(sender.app, settings)
    _sweeper.start()


@worker_shutdown.connect
def stop_sweeping(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
