"""Every GET only reads: with data in the store that a GET used to bring up to date (a batch whose
job has ended but has no files yet, one past its completion window, one whose validation a
stopped server left), no GET route issues an INSERT, UPDATE or DELETE, nor writes under LMQ_HOME.
What those batches need is the recovery sweep's and the runner's work (lmq.workers.recovery)."""

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update

from lmq.api.app.main import create_app
from lmq.core.config import load_settings
from lmq.core.domain.jobs import create_fit_job
from lmq.core.names import JobState
from lmq.core.store import queries, session_scope, sessions
from lmq.core.store.batches import add_batch, add_file, create_batch_job
from lmq.core.store.models import OpenAIBatch, utcnow
from lmq.workers.recovery import tend_batches

WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b", re.IGNORECASE)
PRESET = "local-preset"


def batch(session, file_id, *, hours_ago=0.0, job_state=None):
    """A batch of one line; with a job in `job_state` when given, else still validating."""
    made = add_batch(
        session, tenant="local", endpoint="/v1/completions", input_file_id=file_id, completion_window="24h", metadata=None
    )
    made.created_at = made.validation_started_at = utcnow() - timedelta(hours=hours_ago)
    if job_state is not None:
        job = create_batch_job(
            session,
            made.id,
            preset=PRESET,
            model=PRESET,
            params={},
            tenant="local",
            items=[{"custom_id": "one", "input": {"prompt": "The"}}],
        )
        if job_state is JobState.succeeded:
            queries.record_results(session, job.id, [queries.ItemResult(0, output="The end", finish_reason="stop")])
            queries.finish_job(session, job.id, JobState.succeeded)
        elif job_state is JobState.running:
            job.state = JobState.running.value
    return made.id


@pytest.fixture
def stocked(lmq_home):
    """The embedded store with a job, a preset, an upload, and batches a GET used to write for."""
    settings = load_settings()
    files = settings.home / "files"
    files.mkdir(parents=True)
    with session_scope(sessions(settings)) as session:
        queries.register_preset(session, name=PRESET, path=str(lmq_home / "presets" / PRESET), architecture="llama", source=None)
        job = queries.create_generate_job(session, preset=PRESET, inputs=[{"prompt": "Hi"}], params={})
        queries.add_event(session, job.id, "progress", completed=0)
        fit = create_fit_job(session, training_data=[{"text": "a"}], validation_data=None, hyperparameters={}, preset=PRESET)
        queries.add_event(session, fit.id, "epoch", epoch=1, step=1, loss=1.0, checkpoint=True)
        queries.finish_job(session, fit.id, JobState.failed, error="stopped", code="job_failed")
        upload = add_file(session, file_id="file-" + "0" * 24, tenant="local", purpose="batch", filename="b.jsonl", size=2)
        (files / upload.id).write_text("{}\n")
        ids = {
            "job_id": job.id,
            "fine_tuning_job_id": "ftjob-" + fit.id,
            "file_id": upload.id,
            "finished": batch(session, upload.id, job_state=JobState.succeeded),
            "expired": batch(session, upload.id, hours_ago=48, job_state=JobState.running),
            "validating": batch(session, upload.id, hours_ago=1),
        }
    with session_scope(sessions(settings)) as session:  # the validation was cut short an hour ago
        session.execute(
            update(OpenAIBatch)
            .where(OpenAIBatch.id == ids["validating"])
            .values(validation_started_at=utcnow() - timedelta(hours=1))
        )
    return settings, ids


def get_routes(app):
    """Every GET route of the app, those of included routers too."""

    def walk(routes):
        for route in routes:
            if hasattr(route, "original_router"):
                yield from walk(route.original_router.routes)
            else:
                yield route

    return sorted({route.path for route in walk(app.routes) if "GET" in (getattr(route, "methods", None) or ())})


def snapshot(home):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in home.rglob("*") if path.is_file()}


def test_no_get_route_writes(stocked):
    settings, ids = stocked
    app = create_app(settings)  # no lifespan: neither the in-process worker nor any sweep runs
    engine = sessions(settings).kw["bind"]
    writes = []

    @event.listens_for(engine, "before_cursor_execute")
    def count_writes(conn, cursor, statement, parameters, context, executemany):
        if WRITE.match(statement):
            writes.append(statement)

    finished, expired = ids["finished"], ids["expired"]
    output_file_id = f"file-{'1' * 24}"  # no such file yet: the sweep has not made the batch's files
    values = {
        "job_id": ids["job_id"],
        "fine_tuning_job_id": ids["fine_tuning_job_id"],
        "name": PRESET,
        "file_id": ids["file_id"],
        "model": PRESET,
    }
    before = snapshot(settings.home)
    client = TestClient(app)
    seen = {}
    try:
        for path in get_routes(app):
            variants = [path]
            if "{batch_id}" in path:
                variants = [path.replace("{batch_id}", ids[kind]) for kind in ("finished", "expired", "validating")]
            if "{file_id}" in path:
                variants.append(path.replace("{file_id}", output_file_id))
            for variant in variants:
                url = variant.format(**{key: value for key, value in values.items() if "{" + key + "}" in variant})
                response = client.get(url)
                seen[url] = response.status_code
    finally:
        event.remove(engine, "before_cursor_execute", count_writes)
    assert writes == [], writes
    # Each answered as usual: only the batch file the sweep has not made yet is missing, and
    # /readyz says the in-process worker is not running (this app was not started).
    missing = {url: status for url, status in seen.items() if status != 200}
    assert missing == {"/readyz": 503, f"/v1/files/{output_file_id}": 404, f"/v1/files/{output_file_id}/content": 404}
    assert snapshot(settings.home) == before
    assert {"/v1/batches", "/v1/jobs/{job_id}/events", "/v1/files/{file_id}/content", "/metrics", "/dashboard"} <= set(
        get_routes(app)
    )
    # The batches read as they stand, the sweep's work still to do.
    statuses = {kind: client.get(f"/v1/batches/{ids[kind]}").json() for kind in ("finished", "expired", "validating")}
    assert statuses["finished"]["status"] == "finalizing" and statuses["finished"]["output_file_id"] is None
    assert statuses["expired"]["status"] == "expired" and statuses["expired"]["expired_at"] is not None
    assert statuses["validating"]["status"] == "validating"
    assert {b["id"] for b in client.get("/v1/batches").json()["data"]} == {finished, expired, ids["validating"]}

    tend_batches(settings)  # what the sweep does instead
    with session_scope(sessions(settings)) as session:
        assert session.get(OpenAIBatch, finished).finalized_at is not None
        assert session.get(OpenAIBatch, expired).expired_at is not None
        assert queries.job_state(session, session.get(OpenAIBatch, expired).job_id) == JobState.cancelling.value
    done = client.get(f"/v1/batches/{finished}").json()
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 1
    assert client.get(f"/v1/files/{done['output_file_id']}/content").json()["response"]["body"]["choices"][0]["text"] == " end"
