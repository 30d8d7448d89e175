"""One attempt at a job: what a worker holds while it runs the job.

Every write the worker makes for the job goes through `Attempt.write`, which
renews the lease in the same transaction (the fencing, see
core/store/leases.py) and is retried with backoff while the database is away,
so the results of finished rows are kept through a database restart. A heartbeat
thread renews the lease every LMQ_HEARTBEAT_S in between, while a model loads
or long rows decode; it stops with the process, so a dead or paused
worker's lease runs out and another worker takes the job.

A worker told to stop (SIGTERM: an autoscaler removing it) **drains**: its attempt
hands the job back at its next write (results are committed in groups, fit
steps each write), releasing the lease so that another worker continues at
once, not after the lease runs out; and if no write comes within LMQ_DRAIN_S
(a model still loading), it releases the lease and exits there and then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from lmq.core.config import Settings
from lmq.core.names import JobState
from lmq.core.store import batch_files, queries
from lmq.core.store.db import transact
from lmq.core.store.leases import Lease, LeaseLost, release, renew
from lmq.core.store.models import utcnow
from lmq.workers import metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# on_progress(done, total, **details): items or steps done; a fit step's details carry its loss.
ProgressCallback = Callable[..., None]

DRAINING = threading.Event()  # this worker is stopping: the job it runs is handed back
DRAIN_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by the drain deadline, its job handed back
_running: list[Attempt] = []  # the attempt this process runs, if any (one: a worker runs one job at a time)


class HandedBack(LeaseLost):
    """This worker is stopping and has let go of the job, for another worker to continue at once."""


def start_draining(drain_s: float) -> None:
    """Hand back the running job at its next write; past `drain_s`, release its lease and exit."""
    if DRAINING.is_set():
        return
    DRAINING.set()
    threading.Thread(target=_drain_deadline, args=(drain_s,), name="lmq-drain", daemon=True).start()


def _drain_deadline(drain_s: float) -> None:
    time.sleep(drain_s)
    for attempt in list(_running):
        logger.warning("job %s: not handed back within LMQ_DRAIN_S=%g s; releasing it and exiting", attempt.job_id, drain_s)
        attempt.release(resent=False)  # the other workers' sweep sends it again
        logging.shutdown()
        os._exit(DRAIN_EXIT_CODE)


class Attempt:
    def __init__(
        self,
        factory: sessionmaker[Session],
        lease: Lease,
        settings: Settings,
        on_progress: ProgressCallback | None = None,
    ):
        self.factory = factory
        self.lease = lease
        self.settings = settings
        self.on_progress = on_progress
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lmq-heartbeat-{lease.job_id[:8]}", daemon=True)

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    def __enter__(self) -> Attempt:
        self._heartbeat.start()
        _running.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _running.remove(self)
        self._stopped.set()
        self._heartbeat.join()

    def release(self, resent: bool) -> bool:
        """Let go of the job now (see leases.release); the heartbeat stops first, so it renews nothing after."""
        self._stopped.set()
        if self._heartbeat.is_alive() and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        try:
            return transact(self.factory, lambda session: release(session, self.lease, resent))
        except Exception as error:  # the lease then runs out as a dead worker's would
            logger.warning("job %s: could not release the lease: %s", self.job_id, error)
            return False

    def _beat(self) -> None:
        while not self._stopped.wait(self.settings.heartbeat_s):
            try:
                transact(self.factory, self._renew, within_s=self.settings.heartbeat_s)
            except LeaseLost:
                return  # the next write says so to the job's code
            except Exception as error:  # the database is away: try again at the next beat
                logger.warning("job %s: heartbeat failed: %s", self.job_id, error)

    def _renew(self, session: Session) -> None:
        renew(session, self.lease, self.settings.lease_s)
        metrics.LEASE_RENEWALS.inc()

    def write(self, work: Callable[[Session], T]) -> T:
        """`work(session)` under the lease: LeaseLost if another attempt has the job now, HandedBack
        (a LeaseLost) instead of the write when this worker is draining."""
        if DRAINING.is_set():
            self.release(resent=True)
            raise HandedBack(f"job {self.job_id}: handed back by {self.lease.worker}, which is stopping")

        def fenced(session: Session) -> T:
            self._renew(session)
            return work(session)

        return transact(self.factory, fenced)

    def confirm(self) -> None:
        """LeaseLost unless this attempt still holds the job: asked before touching shared files."""
        self.write(lambda session: None)

    def event(self, type: str, **data) -> None:
        self.write(lambda session: queries.add_event(session, self.job_id, type, **data))

    def stop_requested(self, session: Session) -> bool:
        """A cancel or pause request is honoured here (checked between decode steps and fit steps),
        and so is the end of a Batch API batch's window, which cancels its job as a cancel would."""
        batch_files.expire_job_batch(session, self.job_id, utcnow())
        state = queries.job_state(session, self.job_id)
        if state == JobState.cancelling.value:
            queries.finish_job(session, self.job_id, JobState.cancelled)
            return True
        if state == JobState.pausing.value:
            queries.pause(session, queries.get_job(session, self.job_id))
            return True
        return False

    def should_stop(self) -> bool:
        return self.write(self.stop_requested)

    def finish(self, state: JobState, error: str | None = None, **details) -> None:
        self.write(lambda session: queries.finish_job(session, self.job_id, state, error, **details))

    def report_progress(self, done: int, total: int, **details) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total, **details)
