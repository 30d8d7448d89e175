"""The workers' sweep: SQL says which jobs need a worker; make sure the broker has a message for each.

Every `lmq worker` sweeps in a thread of its own, at start and then every
LMQ_SWEEP_S (lmq.workers.recovery says which jobs, and tends the Batch API's
batches: expiry, and the files of those whose job ended). It sends again the id of

- a running job whose lease has expired: its worker died or was paused, and
  the message that worker held is stuck unacknowledged in Redis until the
  visibility timeout (over a day), or was dropped by a worker that found the
  lease still live;
- a queued job last sent more than LMQ_SWEEP_S ago, when its queue holds fewer
  messages than there are such jobs: the broker lost some (Redis restarted
  without persistence, a publish was lost, the sender died between the SQL
  commit and the publish). Comparing counts keeps a long queue, whose jobs
  are merely waiting, from being sent twice over.

Why the workers sweep, not `lmq serve`: a deployment may have no API server at
all (`lmq submit` talks to the broker), while nothing runs without a worker;
and a thread beside the job keeps sweeping while its worker is busy for hours.
So with a broker it is the workers that expire and finalize batches, not the API.
Many workers sweeping send each message once, because a send is first
recorded with a compare-and-set on `enqueued_at` (leases.mark_sent). A message
too many is harmless anyway: a job that is finished, or running under a live
lease, ignores it.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from celery import Celery

from lmq.core.config import Settings
from lmq.core.store import leases, session_scope, sessions
from lmq.workers.celery_app import RUN_JOB_TASK, queue_for
from lmq.workers.recovery import Sweeping, jobs_needing_a_worker, tend_batches

logger = logging.getLogger(__name__)


def sweep(app: Celery, settings: Settings) -> list[str]:
    """Send again the jobs the broker has lost; returns their ids."""
    factory = sessions(settings)
    by_queue = defaultdict(list)
    for job in jobs_needing_a_worker(settings):
        by_queue[queue_for(job.kind, job.preset, settings)].append(job)
    sent = []
    for queue, jobs in by_queue.items():
        expired = [job for job in jobs if job.lost]
        waiting = [job for job in jobs if job not in expired]
        lost = expired + (waiting if waiting and messages_on(app, queue) < len(waiting) else [])
        for job in lost:
            with session_scope(factory) as session:
                if not leases.mark_sent(session, job.id, job.enqueued_at):
                    continue  # another worker's sweep sent it
            app.send_task(RUN_JOB_TASK, args=[job.id], queue=queue)
            sent.append(job.id)
    if sent:
        logger.warning("sweep: sent %d job(s) again: %s", len(sent), ", ".join(sent))
    return sent


def messages_on(app: Celery, queue: str) -> int:
    """Messages waiting on `queue`; 0 when the broker has no such queue (as after a Redis restart)."""
    with app.connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:
            return 0


class Sweeper(Sweeping):
    """The sweep and the batches' upkeep, repeated in a daemon thread beside the worker's jobs."""

    def __init__(self, app: Celery, settings: Settings):
        super().__init__("lmq-sweep", settings.sweep_s, [lambda: sweep(app, settings), lambda: tend_batches(settings)])
