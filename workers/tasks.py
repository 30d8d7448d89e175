"""The one Celery task: run a job by id through the process's job runner."""

from celery import shared_task

from core.config import load_settings
from workers.celery_app import RUN_JOB_TASK
from workers.runner import process_runner


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Idempotent: a redelivered or duplicate message finishes what is left, or nothing."""
    return process_runner(load_settings()).run(job_id)
