"""Queries on the job store, shared by the CLI, the API and the workers.

Every state change is a conditional UPDATE, so two runs of the same job
(a redelivery racing a slow worker) can never move it backwards or write a
result twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

from sqlalchemy import delete, exists, insert, or_, select, update
from sqlalchemy.orm import Session

from lmq.core.names import TERMINAL_STATES, JobKind, JobState
from lmq.core.store.models import EVERYONE, Job, JobEvent, JobItem, Preset, PresetShare, utcnow

_INSERT_CHUNK = 5000


def create_generate_job(
    session: Session,
    *,
    preset: str,
    inputs: list[dict],
    params: dict,
    tenant: str = "local",
    idempotency_key: str | None = None,
    request_digest: str | None = None,
) -> Job:
    """A queued generate job with one item per input, in input order."""
    job = Job(
        kind=JobKind.generate.value,
        preset=preset,
        params=params,
        tenant=tenant,
        idempotency_key=idempotency_key,
        request_digest=request_digest,
        total=len(inputs),
    )
    session.add(job)
    session.flush()
    rows = [
        {
            "job_id": job.id,
            "index": index,
            "custom_id": None if entry.get("custom_id") is None else str(entry["custom_id"]),
            "input": {key: value for key, value in entry.items() if key != "custom_id"},
        }
        for index, entry in enumerate(inputs)
    ]
    for start in range(0, len(rows), _INSERT_CHUNK):
        session.execute(insert(JobItem), rows[start : start + _INSERT_CHUNK])
    _add_event(session, job.id, "state", state=JobState.queued.value)
    return job


def create_fit_job(
    session: Session,
    *,
    preset: str,
    training_data: list[dict],
    validation_data: list[dict] | None,
    hyperparameters: dict,
    output_preset: str,
    tenant: str = "local",
    idempotency_key: str | None = None,
    request_digest: str | None = None,
) -> Job:
    job = Job(
        kind=JobKind.fit.value,
        preset=preset,
        params=hyperparameters,
        data={"training_data": training_data, "validation_data": validation_data or []},
        output_preset=output_preset,
        tenant=tenant,
        idempotency_key=idempotency_key,
        request_digest=request_digest,
        total=fit_steps(len(training_data), hyperparameters).total,
    )
    session.add(job)
    session.flush()
    _add_event(session, job.id, "state", state=JobState.queued.value)
    return job


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
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if before is not None:
        cursor = session.get(Job, before)
        if cursor is not None:
            query = query.where(
                (Job.created_at < cursor.created_at)
                | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
            )
    return list(session.scalars(query))


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


@dataclass(frozen=True)
class FitSteps:
    """How a fit job's training divides into steps: its counts are steps, from submission on."""

    batch_size: int
    epochs: int
    per_epoch: int

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs


def fit_steps(examples: int, hyperparameters: dict) -> FitSteps:
    """The steps of `examples` training examples, as `CausalLM.fit` takes them (a last short batch is a step)."""
    batch_size = hyperparameters.get("batch_size") or 8
    epochs = hyperparameters.get("epochs") or 1
    return FitSteps(batch_size, epochs, per_epoch=math.ceil(examples / batch_size))


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
    """A queued job is cancelled now; a running one is asked to stop at its next check."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    if job.state == JobState.queued.value:
        _finish(session, job, JobState.cancelled)
    elif job.state == JobState.running.value:
        job.state = JobState.cancelling.value
        _add_event(session, job.id, "state", state=JobState.cancelling.value)
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
