"""One attempt at a job: what a worker holds while it runs the job.

Every write the worker makes for the job goes through `Attempt.write`, which
renews the lease in the same transaction (the fencing, see
core/store/leases.py) and is retried with backoff while the database is away,
so the results of finished rows are kept through a database restart. A heartbeat
thread renews the lease every LMQ_HEARTBEAT_S in between, while a model loads
or long rows decode; it stops with the process, so a dead or paused
worker's lease runs out and another worker takes the job.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from lmq.core.config import Settings
from lmq.core.names import JobState
from lmq.core.store import batch_files, queries
from lmq.core.store.db import transact
from lmq.core.store.leases import Lease, LeaseLost, renew
from lmq.core.store.models import utcnow
from lmq.workers import metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# on_progress(done, total, **details): items or steps done; a fit step's details carry its loss.
ProgressCallback = Callable[..., None]


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
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._heartbeat.join()

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
        """`work(session)` under the lease: LeaseLost if another attempt has the job now."""

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
