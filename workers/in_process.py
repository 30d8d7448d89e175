"""The in-process worker: `lmq serve` without a broker runs its jobs itself.

Up to LMQ_WORKER_JOBS jobs at once, each in a thread of its own, through the
same job runner (and so the same model pool and shared engines) the Celery
workers use: generate jobs on one model share its engine's steps. The thread imports keras and torch only when its first job
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
    """Runs the jobs this server accepts, in order, in LMQ_WORKER_JOBS background threads.

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
        # Ids on self.jobs or running here: a job waiting there is not lost, and one running here
        # is not handed to a second thread (SQLite takes no row lock to keep two claims apart).
        self._in_hand: set[str] = set()
        self._in_hand_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, name=f"lmq-in-process-worker-{i}", daemon=True)
            for i in range(settings.worker_jobs)
        ]
        self.sweeping = Sweeping(
            "lmq-in-process-sweep", settings.sweep_s, [self.take_up_waiting, lambda: tend_batches(settings)]
        )

    def submit(self, job_id: str, kind: str) -> None:
        self._hand(job_id)

    def _hand(self, job_id: str) -> bool:
        """Queue the job unless it is waiting on the queue or running here already."""
        with self._in_hand_lock:
            if job_id in self._in_hand:
                return False
            self._in_hand.add(job_id)
        self.jobs.put(job_id)
        return True

    def check(self) -> tuple[bool, str]:
        if all(thread.is_alive() for thread in self.threads):
            return True, "no broker: jobs run in the server process"
        return False, "the in-process worker threads are not running"

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.sweeping.start()

    def stop(self) -> None:
        """Give the jobs in hand a moment; one cut short is taken up again once its lease expires."""
        self.sweeping.stop()
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(timeout=5)

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
        while True:
            job_id = self.jobs.get()
            if job_id is None:
                return
            try:
                from lmq.workers.runner import process_runner  # keras and torch load with the first job

                process_runner(self.settings).run(job_id)
            except Exception:
                logger.exception("in-process worker: job %s could not run", job_id)
            finally:
                with self._in_hand_lock:
                    self._in_hand.discard(job_id)
