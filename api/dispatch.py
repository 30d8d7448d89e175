"""How a job the API has written to SQL reaches a runner.

With a broker (LMQ_BROKER_URL) the job id goes to the Celery workers. Without
one, the server runs its jobs itself, one at a time, in a thread of its own,
through the same job runner the workers use; that thread imports keras and
torch only when its first job arrives, so the API still starts light, and
at start it takes up the jobs an earlier server left unfinished.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from functools import cached_property

from core.config import Settings
from core.store import JobState, queries, session_scope, sessions

logger = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The job is in SQL (marked failed) but could not be handed to the workers."""


class CeleryDispatch:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def app(self):
        """Made at first use: importing Celery would add a third of a second to every start."""
        from workers.celery_app import make_celery

        return make_celery(settings=self.settings)

    def submit(self, job_id: str, kind: str) -> None:
        from workers.celery_app import enqueue_job

        try:
            enqueue_job(self.app, self.settings, job_id, kind)
        except Exception as error:
            raise BrokerUnavailable(f"job {job_id} could not be sent to the broker: {error}") from error

    def check(self) -> tuple[bool, str]:
        """Whether the broker answers now (what /readyz reports)."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        except Exception as error:
            return False, f"broker unreachable: {type(error).__name__}: {error}"
        return True, "broker reachable"

    def start(self) -> None:
        """Nothing to start: the workers are other processes."""

    def stop(self) -> None:
        """Nothing to stop: the workers are other processes."""


class InProcessWorker:
    """Runs the jobs this server accepts, in order, in one background thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="lmq-in-process-worker", daemon=True)

    def submit(self, job_id: str, kind: str) -> None:
        self.jobs.put(job_id)

    def check(self) -> tuple[bool, str]:
        if self.thread.is_alive():
            return True, "no broker: jobs run in the server process"
        return False, "the in-process worker thread is not running"

    def start(self) -> None:
        for job_id in self.left_over():
            self.jobs.put(job_id)
        self.thread.start()

    def stop(self) -> None:
        """Give the job in hand a moment; one cut short is resumed by the next start (see left_over)."""
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def left_over(self) -> list[str]:
        """Jobs an earlier server accepted and did not finish, oldest first.

        Queued jobs, and running ones whose process on this machine is gone. A
        job that a live `lmq generate` is running is left to it.
        """
        with session_scope(sessions(self.settings)) as session:
            unfinished = [
                job
                for state in (JobState.queued, JobState.running, JobState.cancelling)
                for job in queries.list_jobs(session, state=state.value, limit=100_000)
                if state is JobState.queued or runner_is_gone(job.worker)
            ]
        return [job.id for job in sorted(unfinished, key=lambda job: job.created_at)]

    def _work(self) -> None:
        runner = None
        while (job_id := self.jobs.get()) is not None:
            try:
                if runner is None:
                    from workers.runner import process_runner

                    runner = process_runner(self.settings)
                runner.run(job_id)
            except Exception:
                logger.exception("in-process worker: job %s could not run", job_id)


def runner_is_gone(worker: str | None) -> bool:
    """Whether the process that ran a job (named "lmq-PID@HOST", see worker_name) has exited."""
    name, _, host = (worker or "").partition("@")
    if host != socket.gethostname() or not name.startswith("lmq-"):
        return False
    try:
        os.kill(int(name.removeprefix("lmq-")), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def dispatch_for(settings: Settings) -> CeleryDispatch | InProcessWorker:
    return InProcessWorker(settings) if settings.embedded else CeleryDispatch(settings)
