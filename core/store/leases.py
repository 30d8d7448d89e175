"""Leases: which worker may run a job and write its results, and until when.

A worker that takes a job holds a lease on it in the job's row: its name
(`worker`), the attempt number (`attempts`, the fencing token) and an expiry
(`lease_expires_at`) that it pushes forward every LMQ_HEARTBEAT_S while it
works. Each of its writes runs in a transaction that starts by renewing the
lease with `UPDATE ... WHERE attempts = <its token>`, which locks the row
until the write commits: a takeover either waits for that write or makes it
fail. So a worker that was paused (SIGSTOP) and comes back after another one
took its job finds its token stale and stops, having written nothing.

A lease not renewed for LMQ_LEASE_S has expired: its holder is dead, paused or
cut off. The next worker that gets the job's message takes it over with a new
attempt number; workers/sweep.py makes sure that message is sent. A holder
whose process has exited (SIGKILL, the OOM killer, a crash) need not be waited
out when it ran on the same host and in the same process namespace as a
sweeping worker, as a restarted worker does: that worker can see the process
is gone, and ends its leases there and then (`end_leases_of_exited_holders`).
Holders elsewhere are waited out. While a
lease is live, another delivery of the job (a duplicate message) is refused,
so one job never runs on two workers at once.

Expiry is read from the clocks of the machines involved, which are assumed to
agree to well within a lease (NTP does that).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from lmq.core.names import TERMINAL_STATES, JobState
from lmq.core.store import queries
from lmq.core.store.models import Job, utcnow

HELD_STATES = (JobState.running.value, JobState.cancelling.value, JobState.pausing.value)
HOLDER_IDLE_LIMIT = "5s"
NO_PROC = "unknown"  # a holder's pid namespace where /proc cannot be read


class LeaseLost(RuntimeError):
    """Another attempt holds the job now, or it has finished: stop and write nothing."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    worker: str
    attempt: int  # the fencing token


def claim(session: Session, job_id: str, worker: str, lease_s: float) -> Job | None:
    """Take the job for a new attempt; None when there is nothing for this worker to run.

    A queued job starts. A running one is taken over only when its lease has
    expired (or it has none): while the lease is live another worker has the
    job, and this delivery is a duplicate. A job asked to cancel whose holder
    is gone is cancelled here.
    """
    release_locks_if_paused(session)
    now = utcnow()
    query = select(Job, lease_expired(now)).where(Job.id == job_id).with_for_update()
    found = session.execute(query.execution_options(populate_existing=True)).one_or_none()
    if found is None or found[0].state in TERMINAL_STATES:
        return None
    job, expired = found
    if job.state in HELD_STATES and not expired:
        return None
    if job.state == JobState.cancelling.value:
        queries.finish_job(session, job_id, JobState.cancelled)
        return None
    if job.state == JobState.pausing.value:
        queries.pause(session, job)
        return None
    if job.state in (JobState.paused.value, JobState.validating.value):  # it waits for a resume, or its files
        return None
    taken_from = job.worker if job.state == JobState.running.value else None
    job.state = JobState.running.value
    job.started_at = job.started_at or now
    job.attempts += 1
    job.worker = worker
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    queries.add_event(
        session,
        job.id,
        "state",
        state=JobState.running.value,
        attempt=job.attempts,
        worker=worker,
        resumed=job.attempts > 1,
        **({"expired_lease_of": taken_from} if taken_from else {}),
    )
    return job


def holder_name(pid: int | None = None) -> str:
    """A process (this one by default) as leases, job records and Celery name it:
    `lmq-<pid>.<pid namespace>@<host>`, which says where to look for it (`has_exited`)."""
    namespace, host = _here()
    return f"lmq-{pid or os.getpid()}.{namespace}@{host}"


def has_exited(holder: str | None) -> bool:
    """The holder's process was of this host and pid namespace, and is gone (or a zombie). A
    process elsewhere, or a pid taken by another process since, counts as running."""
    match = re.fullmatch(r"lmq-(\d+)\.(\w+)@(.+)", holder or "")
    if match is None or (match[2], match[3]) != _here() or match[2] == NO_PROC:
        return False
    try:
        with open(f"/proc/{match[1]}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")  # the state, after the name
    except FileNotFoundError:
        return True


@functools.cache
def _here() -> tuple[str, str]:
    """(this process's pid namespace, its host): pids name processes within a namespace only (a
    container has its own). Without /proc pids cannot be looked up, so no holder is seen to exit."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = NO_PROC
    return namespace, socket.gethostname()


def end_leases_of_exited_holders(session: Session) -> list[str]:
    """End now the live leases whose holder `has_exited`, so that the sweep sends their jobs
    again at once instead of after LMQ_LEASE_S; returns the jobs' ids."""
    now = utcnow()
    held = session.execute(
        select(Job.id, Job.worker, Job.attempts).where(Job.state.in_(HELD_STATES), ~lease_expired(now))
    ).all()
    ended = []
    for job_id, worker, attempt in held:
        if has_exited(worker):
            lease = Lease(job_id, worker, attempt)
            if session.execute(holding(lease).values(lease_expires_at=now)).rowcount == 1:
                queries.add_event(session, job_id, "holder_exited", attempt=attempt, worker=worker)
                ended.append(job_id)
    return ended


def hold_validation(job: Job, holder: str, lease_s: float) -> None:
    """`holder` (an API server) reads the job's files under the job's lease: if it stops, the
    lease runs out (or its process is seen gone) and another server takes the validation up."""
    job.state = JobState.validating.value
    job.worker, job.lease_expires_at = holder, utcnow() + timedelta(seconds=lease_s)


def stale_validations(session: Session) -> list[tuple[str, str | None]]:
    """(job id, holder) of the validations whose holder stopped: lease run out, or process gone."""
    rows = session.execute(
        select(Job.id, Job.worker, lease_expired(utcnow()).label("expired")).where(Job.state == JobState.validating.value)
    ).all()
    return [(job_id, worker) for job_id, worker, expired in rows if expired or has_exited(worker)]


def take_up_validation(session: Session, job_id: str, stopped: str | None, holder: str, lease_s: float) -> bool:
    """Take a stale validation over from `stopped`: one conditional UPDATE, so one server of many does."""
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.validating.value, Job.worker.is_not_distinct_from(stopped))
        .values(worker=holder, lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    )
    return taken.rowcount == 1


def held_validation(session: Session, job_id: str, holder: str) -> Job | None:
    """The job, its row locked, while `holder` still holds its validation (not cancelled, not taken over)."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    return job if job is not None and job.state == JobState.validating.value and job.worker == holder else None


def holding(lease: Lease):
    """An UPDATE of the job's row while `lease` holds it; it touches nothing once the lease is lost."""
    return update(Job).where(
        Job.id == lease.job_id, Job.attempts == lease.attempt, Job.worker == lease.worker, Job.state.in_(HELD_STATES)
    )


def lease_expired(now: datetime):
    """The expired-lease rule, stated here only (as SQL): no lease, or one not renewed before `now`."""
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now)


def not_sent_since_expiry():
    """No message for the job was sent since its lease ran out: any the broker had is with the lost holder."""
    return or_(Job.enqueued_at.is_(None), Job.lease_expires_at.is_(None), Job.enqueued_at < Job.lease_expires_at)


def renew(session: Session, lease: Lease, lease_s: float) -> None:
    """Extend the lease, or raise LeaseLost; locks the job's row until the transaction ends."""
    release_locks_if_paused(session)
    renewed = session.execute(holding(lease).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
    if renewed.rowcount != 1:
        raise LeaseLost(f"job {lease.job_id}: attempt {lease.attempt} no longer holds the lease")


def release(session: Session, lease: Lease, resent: bool) -> bool:
    """Let go of a job before the lease runs out (a worker that is stopping), so that the next worker
    takes it over at once. The holder's name is cleared, so its later writes find the lease lost.
    `resent`: its message is back with the broker, so the sweep need not send it again."""
    now = utcnow()
    values = {"lease_expires_at": now, "worker": None, **({"enqueued_at": now} if resent else {})}
    released = session.execute(holding(lease).values(**values))
    if released.rowcount == 1:
        queries.add_event(session, lease.job_id, "handed_back", attempt=lease.attempt, worker=lease.worker)
    return released.rowcount == 1


def release_locks_if_paused(session: Session) -> None:
    """A holder paused inside a transaction (SIGSTOP) would keep the job's row
    locked, and so block its own takeover: PostgreSQL ends such a transaction
    after a few idle seconds. (Ours never idle: they are a few quick statements.)"""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{HOLDER_IDLE_LIMIT}'"))


@dataclass(frozen=True)
class Waiting:
    """A job that needs a worker, and when a message for it was last sent."""

    id: str
    kind: str
    preset: str
    state: str
    enqueued_at: datetime | None
    lease_expires_at: datetime | None
    lost: bool  # held under an expired lease, and not sent since: the broker has no message for it


def waiting_for_a_worker(session: Session, now: datetime, sent_before: datetime) -> list[Waiting]:
    """Jobs whose message the broker may have lost, oldest first.

    Queued jobs last sent (or made) before `sent_before`, and running ones whose lease
    has expired and that were not sent again since (or not since `sent_before`).
    """
    queued = and_(Job.state == JobState.queued.value, func.coalesce(Job.enqueued_at, Job.created_at) < sent_before)
    lost = and_(Job.state.in_(HELD_STATES), lease_expired(now), not_sent_since_expiry())
    expired = and_(Job.state.in_(HELD_STATES), lease_expired(now), Job.enqueued_at < sent_before)
    rows = session.execute(
        select(Job.id, Job.kind, Job.preset, Job.state, Job.enqueued_at, Job.lease_expires_at, lost.label("lost"))
        .where(or_(queued, lost, expired))
        .order_by(Job.created_at)
    )
    return [Waiting(*row[:-1], lost=bool(row.lost)) for row in rows]


def mark_sent(session: Session, job_id: str, last_seen: datetime | None) -> bool:
    """Record a send unless someone else recorded one since `last_seen` (so N sweeping workers send once)."""
    marked = session.execute(
        update(Job).where(Job.id == job_id, Job.enqueued_at.is_not_distinct_from(last_seen)).values(enqueued_at=utcnow())
    )
    return marked.rowcount == 1
