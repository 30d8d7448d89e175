"""The in-process worker: `lmq serve` without a broker runs its jobs itself.

One job at a time, in a thread of its own, through the same job runner the
Celery workers use. The thread imports keras and torch only when its first job
arrives, so the API still starts light, and it takes up the jobs an earlier
server left unfinished, as the workers' sweep does (lmq.workers.sweep).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta

from lmq.core.config import Settings
from lmq.core.store import leases, session_scope, sessions
from lmq.core.store.models import utcnow

logger = logging.getLogger(__name__)


class InProcessWorker:
    """Runs the jobs this server accepts, in order, in one background thread.

    Between jobs, at start and then every LMQ_SWEEP_S, it also takes up the
    jobs SQL says need a worker (leases.waiting_for_a_worker, as the workers'
    sweep does): those an earlier server left queued, and those whose runner
    died, once its lease has expired. So a server killed mid-job and started
    again resumes that job about LMQ_LEASE_S + LMQ_SWEEP_S later. A job that a
    live `lmq generate` is running keeps its lease live, and is left to it.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self._in_hand: set[str] = set()  # ids on self.jobs: a job waiting there is not lost
        self._in_hand_lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="lmq-in-process-worker", daemon=True)

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

    def stop(self) -> None:
        """Give the job in hand a moment; one cut short is taken up again once its lease expires."""
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def take_up_waiting(self) -> list[str]:
        """Put the jobs that need a worker, and are not on this server's queue yet, on it; returns their ids.

        Queued ones must be older than LMQ_SWEEP_S, so that a job `lmq generate`
        has just written is left for it to claim.
        """
        now, sweep_s = utcnow(), self.settings.sweep_s
        with session_scope(sessions(self.settings)) as session:
            waiting = leases.waiting_for_a_worker(session, now, sent_before=now - timedelta(seconds=sweep_s))
        taken = [job.id for job in waiting if self._hand(job.id)]
        if taken:
            logger.warning("in-process worker: took up %d job(s) needing a worker: %s", len(taken), ", ".join(taken))
        return taken

    def _work(self) -> None:
        runner, next_sweep = None, 0.0
        while True:
            if time.monotonic() >= next_sweep:
                try:
                    self.take_up_waiting()
                except Exception as error:  # the database away: the next round tries again
                    logger.warning("in-process worker: sweep failed: %s", error)
                next_sweep = time.monotonic() + self.settings.sweep_s
            try:
                job_id = self.jobs.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                continue
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
