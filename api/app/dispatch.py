"""How a job the API has written to SQL reaches a runner.

With a broker (LMQ_BROKER_URL) the job id goes to the Celery workers. Without
one, the server runs its jobs itself, in a thread of its own, through the
in-process worker (lmq.workers.in_process).
"""

from __future__ import annotations

from functools import cached_property

from lmq.core.config import Settings
from lmq.workers.in_process import InProcessWorker

class BrokerUnavailable(RuntimeError):
    """The job is in SQL (marked failed) but could not be handed to the workers."""


class CeleryDispatch:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def app(self):
        """Made at first use: importing Celery would add a third of a second to every start."""
        from lmq.workers.celery_app import make_celery

        return make_celery(settings=self.settings)

    def submit(self, job_id: str, kind: str) -> None:
        from lmq.workers.celery_app import enqueue_job

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


def dispatch_for(settings: Settings) -> CeleryDispatch | InProcessWorker:
    return InProcessWorker(settings) if settings.embedded else CeleryDispatch(settings)
