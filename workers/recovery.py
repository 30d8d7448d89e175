"""The recovery sweep every deployment runs: SQL says what needs doing without being asked.

Two things do:

- jobs whose runner is gone need a worker (`jobs_needing_a_worker`): the Celery
  workers send them to the broker again (lmq.workers.sweep), the worker inside a
  broker-less `lmq serve` puts them on its own queue (lmq.workers.in_process);
- batches of the Batch API need upkeep (`tend_batches`): expiry once their
  completion window has passed, and their output and error files once their job
  has ended, where the runner that ended it did not make them (a job cancelled
  while queued, a runner that died on the way).

So the workers' sweep does both, and so does a broker-less `lmq serve`; an API
server with a broker does neither (its workers do), and its GETs only read.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Callable, Sequence

from lmq.core.config import Settings
from lmq.core.store import batch_files, leases, session_scope, sessions
from lmq.core.store.models import OpenAIBatch, utcnow

logger = logging.getLogger(__name__)


def jobs_needing_a_worker(settings: Settings) -> list[leases.Waiting]:
    """Running jobs whose lease has expired (ended first where this host sees the holder's
    process gone), and queued ones last sent more than LMQ_SWEEP_S ago: a younger one is
    still on its way to a worker (or to the `lmq generate` that wrote it)."""
    factory = sessions(settings)
    with session_scope(factory) as session:
        ended = leases.end_leases_of_exited_holders(session)
    if ended:
        logger.warning("sweep: the holders of %d job(s) have exited: %s", len(ended), ", ".join(ended))
    now = utcnow()
    with session_scope(factory) as session:
        return leases.waiting_for_a_worker(session, now, sent_before=now - timedelta(seconds=settings.sweep_s))


def tend_batches(settings: Settings) -> None:
    """Expire the batches past their window, then finalize those whose job has ended; each
    batch in a transaction of its own, so that one cannot hold up the others."""
    now, factory = utcnow(), sessions(settings)
    with session_scope(factory) as session:
        overdue = batch_files.overdue_batches(session, now)
    for batch_id in overdue:
        with session_scope(factory) as session:
            batch_files.expire(session, batch_id, now)
    with session_scope(factory) as session:
        ended = batch_files.unfinalized_batches(session)
    for batch_id in ended:
        with session_scope(factory) as session:
            batch_files.finalize_if_ended(session, session.get(OpenAIBatch, batch_id))
    if overdue:
        logger.info("sweep: expired %d batch(es): %s", len(overdue), ", ".join(overdue))


class Sweeping:
    """Steps repeated in a daemon thread, at start and then every `period_s`. A step that fails
    (the broker or the database away) is logged and tried again next round; the others still run."""

    def __init__(self, name: str, period_s: float, steps: Sequence[Callable[[], object]]):
        self.period_s = period_s
        self.steps = steps
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            for step in self.steps:
                try:
                    step()
                except Exception as error:
                    logger.warning("%s failed, trying again in %gs: %s", self._thread.name, self.period_s, error)
            if self._stopped.wait(self.period_s):
                return
