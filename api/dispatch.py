"""How a job the API has written to SQL reaches a runner.

With a broker (LMQ_BROKER_URL) the job id goes to the Celery workers. Without
one, the server runs its jobs itself, one at a time, in a thread of its own,
through the same job runner the workers use; that thread imports keras and
torch only when its first job arrives, so the API still starts light.
"""

from __future__ import annotations

import logging
import queue
import threading

from core.config import Settings

logger = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The job is in SQL (marked failed) but could not be handed to the workers."""


class CeleryDispatch:
    def __init__(self, settings: Settings):
        from workers.celery_app import make_celery

        self.settings = settings
        self.app = make_celery(settings)

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
        self.thread.start()

    def stop(self) -> None:
        """Let the job in hand finish its micro-batch; a job cut short stays resumable in SQL."""
        self.jobs.put(None)
        self.thread.join(timeout=5)

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


def dispatch_for(settings: Settings) -> CeleryDispatch | InProcessWorker:
    return InProcessWorker(settings) if settings.embedded else CeleryDispatch(settings)
