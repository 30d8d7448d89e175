"""The in-process worker: `lmq serve` without a broker runs its jobs itself.

One job at a time, in a thread of its own, through the same job runner the
Celery workers use. The thread imports keras and torch only when its first job
arrives, so the API still starts light. Beside it runs the recovery sweep
(lmq.workers.recovery), as beside every Celery worker: it takes up the jobs an
earlier server left unfinished, and tends the Batch API's batches.
"""

from __future__ import annotations

import logging
import queue
import threading

from lmq.core.config import Settings
from lmq.workers.recovery import Sweeping, jobs_needing_a_worker, tend_batches

logger = logging.getLogger(__name__)


class InProcessWorker:
    """Runs the jobs this server accepts, in order, in one background thread.

    A second thread sweeps, at start and then every LMQ_SWEEP_S, even while a
    job runs for hours: it puts on the queue the jobs SQL says need a worker
    (recovery.jobs_needing_a_worker, as the workers' sweep sends them): those
    an earlier server left queued, and those whose runner died, once its lease
    has expired. So a server killed mid-job and started again resumes that job
    about LMQ_LEASE_S + LMQ_SWEEP_S later. A job that a live `lmq generate` is
    running keeps its lease live, and is left to it. The same thread expires
    and finalizes batches (recovery.tend_batches).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self._in_hand: set[str] = set()  # ids on self.jobs: a job waiting there is not lost
        self._in_hand_lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="lmq-in-process-worker", daemon=True)
        self.sweeping = Sweeping(
            "lmq-in-process-sweep", settings.sweep_s, [self.take_up_waiting, lambda: tend_batches(settings)]
        )

    def submit(self, job_id: str, kind: str) -> None:
        self._hand(job_id)

    def _hand(self, job_id: str) -> bool:
        """Queue the job unless it is waiting on the queue already."""
        with self._in_hand_lock:
            if job_id in self._in_hand:
                return False
            self._in_hand.add(job_id)
        self.jobs.put(job_id)
        return True

    def check(self) -> tuple[bool, str]:
        if self.thread.is_alive():
            return True, "no broker: jobs run in the server process"
        return False, "the in-process worker thread is not running"

    def start(self) -> None:
        self.thread.start()
        self.sweeping.start()

    def stop(self) -> None:
        """Give the job in hand a moment; one cut short is taken up again once its lease expires."""
        self.sweeping.stop()
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def take_up_waiting(self) -> list[str]:
        """Put the jobs that need a worker, and are not on this server's queue yet, on it; returns their ids.

        Queued ones must be older than LMQ_SWEEP_S, so that a job `lmq generate`
        has just written is left for it to claim.
        """
        taken = [job.id for job in jobs_needing_a_worker(self.settings) if self._hand(job.id)]
        if taken:
            logger.warning("in-process worker: took up %d job(s) needing a worker: %s", len(taken), ", ".join(taken))
        return taken

    def _work(self) -> None:
        runner = None
        while True:
            job_id = self.jobs.get()
            if job_id is None:
                return
            with self._in_hand_lock:
                self._in_hand.discard(job_id)
            try:
                if runner is None:
                    from lmq.workers.runner import process_runner

                    runner = process_runner(self.settings)
                runner.run(job_id)
            except Exception:
                logger.exception("in-process worker: job %s could not run", job_id)
