"""Queries on the job store, shared by the CLI, the API and the workers.

Every state change is a conditional UPDATE, so two runs of the same job
(a redelivery racing a slow worker) can never move it backwards or write a
result twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from sqlalchemy import delete, exists, insert, or_, select, update
from sqlalchemy.orm import Session

from lmq.core.names import TERMINAL_STATES, JobKind, JobState
from lmq.core.store.models import EVERYONE, Job, JobEvent, JobItem, Preset, PresetShare, utcnow

_INSERT_CHUNK = 2000  # item rows per INSERT: a file of a hundred thousand lines is never all in memory


def create_job(
    session: Session,
    *,
    kind: JobKind,
    preset: str,
    params: dict,
    items: Iterable[dict] = (),
    total: int = 0,
    data: dict | None = None,
    output_preset: str | None = None,
    tenant: str = "local",
    idempotency_key: str | None = None,
    request_digest: str | None = None,
    **queued: str,
) -> Job:
    """A queued job with one item per entry of `items`, in their order, written a few thousand at a time.

    An item is {"custom_id", "input"} and, for one that cannot run, "error": such an item is
    finished from the start, so the runner never sees it. A job without items (a fit) counts
    `total` (its steps). `queued` goes into the job's first event.
    """
    job = Job(
        kind=kind.value,
        preset=preset,
        params=params,
        data=data,
        output_preset=output_preset,
        tenant=tenant,
        idempotency_key=idempotency_key,
        request_digest=request_digest,
        total=total,
    )
    session.add(job)
    session.flush()
    count = failed = 0
    now = utcnow()
    rows = []
    for item in items:
        error = item.get("error")
        rows.append(
            {
                "job_id": job.id,
                "index": count,
                "custom_id": item.get("custom_id"),
                "input": item["input"],
                "error": error,
                "finished_at": None if error is None else now,
            }
        )
        count += 1
        failed += error is not None
        if len(rows) == _INSERT_CHUNK:
            session.execute(insert(JobItem), rows)
            rows = []
    if rows:
        session.execute(insert(JobItem), rows)
    if count:
        job.total, job.failed, job.progress = count, failed, failed / count
    _add_event(session, job.id, "state", state=JobState.queued.value, **queued)
    session.flush()
    return job


def create_generate_job(session: Session, *, inputs: list[dict], **job) -> Job:
    """A queued generate job with one item per input ({"custom_id", "prompt", ...}), in input order;
    `job` as create_job takes it (preset, params, tenant, ...)."""
    items = (
        {
            "custom_id": None if entry.get("custom_id") is None else str(entry["custom_id"]),
            "input": {key: value for key, value in entry.items() if key != "custom_id"},
        }
        for entry in inputs
    )
    return create_job(session, kind=JobKind.generate, items=items, **job)


def get_job(session: Session, job_id: str, tenant: str | None = None) -> Job | None:
    """A job by id; with `tenant`, only that tenant's, found by one query on both
    (another tenant's job costs what an unknown id does)."""
    if tenant is None:
        return session.get(Job, job_id)
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))


def find_job_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))


def list_jobs(
    session: Session,
    *,
    tenant: str | None = None,
    state: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    before: str | None = None,
) -> list[Job]:
    """Newest first; `before` is the id of the last job of the previous page."""
    query = select(Job)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    cursor = None if before is None else session.get(Job, before)
    return list(session.scalars(keyset_page(query, Job, cursor, limit)))


def keyset_page(query, table, cursor, limit: int, *, newest_first: bool = True):
    """`query` ordered by (created_at, id), from just past `cursor` (the last row of the previous
    page, or None for the first): no OFFSET, so a page costs the same however deep it is."""
    if newest_first:
        query = query.order_by(table.created_at.desc(), table.id.desc())
        if cursor is not None:
            query = query.where(
                (table.created_at < cursor.created_at)
                | ((table.created_at == cursor.created_at) & (table.id < cursor.id))
            )
    else:
        query = query.order_by(table.created_at, table.id)
        if cursor is not None:
            query = query.where(
                (table.created_at > cursor.created_at)
                | ((table.created_at == cursor.created_at) & (table.id > cursor.id))
            )
    return query.limit(limit)


def pending_items(
    session: Session, job_id: str, after: int = -1, limit: int | None = None
) -> list[JobItem]:
    """Items without a result yet, in input order, from index `after + 1` on."""
    query = (
        select(JobItem)
        .where(JobItem.job_id == job_id, JobItem.finished_at.is_(None), JobItem.index > after)
        .order_by(JobItem.index)
        .limit(limit)
    )
    return list(session.scalars(query))


@dataclass(frozen=True)
class ItemResult:
    index: int
    output: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    details: dict | None = None  # every choice, log-probabilities (JobItem.details)


def record_results(session: Session, job_id: str, results: Iterable[ItemResult]) -> int:
    """Write each result unless another run already did; returns how many were written.

    The job's counts grow by what this call wrote, so they stay exact when two
    runs race, and cost no scan of the job's items.
    """
    completed = failed = 0
    now = utcnow()
    for result in results:
        outcome = session.execute(
            update(JobItem)
            .where(
                JobItem.job_id == job_id,
                JobItem.index == result.index,
                JobItem.finished_at.is_(None),
            )
            .values(
                output=result.output,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                error=result.error,
                details=result.details,
                finished_at=now,
            )
        )
        if result.error is None:
            completed += outcome.rowcount
        else:
            failed += outcome.rowcount
    if completed or failed:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                completed=Job.completed + completed,
                failed=Job.failed + failed,
                progress=(Job.completed + Job.failed + completed + failed) * 1.0 / Job.total,
            )
        )
    return completed + failed


def set_steps(session: Session, job_id: str, done: int, total: int) -> None:
    """A fit job's counts: training steps done of all its epochs' steps."""
    session.execute(
        update(Job).where(Job.id == job_id).values(total=total, completed=done, progress=min(done / total, 1.0))
    )


def forget_steps_after(session: Session, job_id: str, step: int, epoch: int) -> None:
    """Drop the fit steps and epochs a lost attempt recorded past the checkpoint the next one resumes from."""
    events = delete(JobEvent).where(JobEvent.job_id == job_id)
    session.execute(events.where(JobEvent.type == "step", JobEvent.data["step"].as_integer() > step))
    session.execute(events.where(JobEvent.type == "epoch", JobEvent.data["epoch"].as_integer() > epoch))


def job_state(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


def request_cancel(session: Session, job_id: str) -> Job | None:
    """A queued (or paused, or validating) job is cancelled now; a running one is asked to stop at its next check."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    if job.state in (JobState.validating.value, JobState.queued.value, JobState.paused.value):
        _finish(session, job, JobState.cancelled)
    elif job.state in (JobState.running.value, JobState.pausing.value):
        job.state = JobState.cancelling.value
        _add_event(session, job.id, "state", state=JobState.cancelling.value)
    return job


def request_pause(session: Session, job_id: str) -> Job | None:
    """A queued fit job is paused now; a running one is asked to stop at its next step (its
    checkpoints are kept: a resume continues from the last one)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    if job.state == JobState.queued.value:
        pause(session, job)
    elif job.state == JobState.running.value:
        job.state = JobState.pausing.value
        _add_event(session, job.id, "state", state=JobState.pausing.value)
    return job


def pause(session: Session, job: Job) -> None:
    """The job stops holding a worker until it is resumed (the runner stopped, or had not started)."""
    job.state = JobState.paused.value
    job.worker = job.lease_expires_at = None
    _add_event(session, job.id, "state", state=JobState.paused.value)


def request_resume(session: Session, job_id: str) -> Job | None:
    """A paused job is queued again (the caller sends it to a worker); one pausing goes on running."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    if job.state == JobState.paused.value:
        job.state = JobState.queued.value
        _add_event(session, job.id, "state", state=JobState.queued.value, resumed=True)
    elif job.state == JobState.pausing.value:
        job.state = JobState.running.value
        _add_event(session, job.id, "state", state=JobState.running.value, resumed=True)
    return job


def finish_job(
    session: Session, job_id: str, state: JobState, error: str | None = None, **details
) -> bool:
    """Move a job to a terminal state unless it is in one already."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.state in TERMINAL_STATES:
        return False
    _finish(session, job, state, error, **details)
    return True


def _finish(session: Session, job: Job, state: JobState, error: str | None = None, **details):
    job.state = state.value
    job.error = error
    job.finished_at = utcnow()
    if state is JobState.failed:
        job.failed += _fail_unfinished_items(session, job.id, error)
    _add_event(session, job.id, "state", state=state.value, error=error, **details)


def _fail_unfinished_items(session: Session, job_id: str, error: str | None) -> int:
    """A failed job's inputs without a result carry the job's error, so every result line says why."""
    outcome = session.execute(
        update(JobItem)
        .where(JobItem.job_id == job_id, JobItem.finished_at.is_(None))
        .values(error=error, finished_at=utcnow())
    )
    return outcome.rowcount


def add_event(session: Session, job_id: str, type: str, **data) -> None:
    _add_event(session, job_id, type, **data)


def _add_event(session: Session, job_id: str, type: str, **data) -> None:
    session.add(JobEvent(job_id=job_id, type=type, data=data))


def job_events(session: Session, job_id: str, after: int = 0) -> list[JobEvent]:
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
    )
    return list(session.scalars(query))


def job_events_newest_first(
    session: Session, job_id: str, *, before: int | None, limit: int, types: tuple[str, ...] | None = None
) -> list[JobEvent]:
    """A page of a job's events, newest first (OpenAI's order), older than the event `before`; only `types` when given."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        query = query.where(JobEvent.id < before)
    if types is not None:
        query = query.where(JobEvent.type.in_(types))
    return list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit)))


def last_event(session: Session, job_id: str, type: str) -> JobEvent | None:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == type)
    return session.scalar(query.order_by(JobEvent.id.desc()).limit(1))


def job_items(session: Session, job_id: str) -> Iterator[JobItem]:
    """A job's items in input order, read a thousand at a time; an unfinished one has no output yet."""
    query = select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.index)
    yield from session.scalars(query.execution_options(yield_per=1000))


def register_preset(
    session: Session,
    *,
    name: str,
    path: str,
    architecture: str | None,
    source: str | None,
    parent: str | None = None,
    job_id: str | None = None,
    details: dict | None = None,
    tenant: str = "local",
) -> Preset:
    preset = Preset(
        name=name,
        tenant=tenant,
        path=path,
        architecture=architecture,
        source=source,
        parent=parent,
        job_id=job_id,
        details=details or {},
    )
    session.add(preset)
    session.flush()
    return preset


def get_preset(session: Session, name: str, tenant: str | None = None) -> Preset | None:
    """A stored preset by name; with `tenant`, only one that tenant may use (see visible_to)."""
    if tenant is None:
        return session.get(Preset, name)
    return session.scalar(select(Preset).where(Preset.name == name, visible_to(tenant)))


def list_presets(session: Session, tenant: str | None = None) -> list[Preset]:
    query = select(Preset).order_by(Preset.created_at, Preset.name)
    if tenant is not None:
        query = query.where(visible_to(tenant))
    return list(session.scalars(query))


def visible_to(tenant: str):
    """The presets `tenant` owns, or that were shared with it or with everyone."""
    shared = exists().where(PresetShare.preset == Preset.name, PresetShare.tenant.in_([tenant, EVERYONE]))
    return or_(Preset.tenant == tenant, shared)


def share_preset(session: Session, name: str, *, owner: str, tenant: str) -> PresetShare | None:
    """Let `tenant` (EVERYONE for all) use `owner`'s preset `name`; None when `owner` has no such preset.
    Sharing twice is one share."""
    preset = session.scalar(select(Preset).where(Preset.name == name, Preset.tenant == owner))
    if preset is None:
        return None
    share = session.get(PresetShare, (name, tenant))
    if share is None:
        share = PresetShare(preset=name, tenant=tenant, shared_by=owner)
        session.add(share)
        session.flush()
    return share


def preset_shares(session: Session, name: str) -> list[str]:
    """The tenants a preset is shared with (EVERYONE when published)."""
    return list(session.scalars(select(PresetShare.tenant).where(PresetShare.preset == name).order_by(PresetShare.tenant)))
