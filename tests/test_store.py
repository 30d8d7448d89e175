"""The SQL store on SQLite (always) and PostgreSQL (when LMQ_TEST_DATABASE_URL is set)."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select

from core.config import load_settings
from core.store import Job, JobState, queries, session_scope, sessions
from core.store.db import get_engine
from core.store.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, lmq_home, monkeypatch):
    if request.param == "postgresql":
        monkeypatch.setenv("LMQ_DATABASE_URL", request.getfixturevalue("postgres_url"))
    return sessions(load_settings())


def make_job(store, prompts=("a", "b", "c")):
    with session_scope(store) as session:
        job = queries.create_generate_job(
            session,
            preset="tiny",
            inputs=[{"custom_id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)],
            params={"max_length": 8},
        )
        return job.id


def test_migrations_create_exactly_the_models_tables(store):
    with store.kw["bind"].connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_embedded_default_is_migrated_on_first_use(lmq_home):
    settings = load_settings()
    assert settings.database_url == f"sqlite:///{lmq_home / 'lmq.db'}"
    sessions(settings)
    assert (lmq_home / "lmq.db").exists()


def test_items_keep_input_order_and_custom_ids(store):
    job_id = make_job(store, ["x", "y"])
    with session_scope(store) as session:
        lines = list(queries.job_results(session, job_id))
        job = queries.get_job(session, job_id)
        assert job.state == "queued" and job.total == 2
    assert [(line["index"], line["custom_id"], line["output"]) for line in lines] == [
        (0, "q0", None),
        (1, "q1", None),
    ]


def test_a_result_is_written_once_and_counts_follow_the_items(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        assert queries.start_job(session, job_id, "w1").attempts == 1
    with session_scope(store) as session:
        written = queries.record_results(
            session,
            job_id,
            [
                queries.ItemResult(0, output="first", prompt_tokens=2, completion_tokens=3, finish_reason="stop"),
                queries.ItemResult(2, error="prompt too long"),
            ],
        )
        assert written == 2
    with session_scope(store) as session:
        # A redelivered run racing the first must not overwrite what is there.
        assert queries.record_results(session, job_id, [queries.ItemResult(0, output="second")]) == 0
        assert [item.index for item in queries.pending_items(session, job_id)] == [1]
    with session_scope(store) as session:
        job = queries.get_job(session, job_id)
        assert (job.completed, job.failed, job.progress) == (1, 1, pytest.approx(2 / 3))
        assert next(queries.job_results(session, job_id))["output"] == "first"


def test_state_machine(store):
    queued, running = make_job(store), make_job(store)
    with session_scope(store) as session:
        queries.start_job(session, running, "w1")
    with session_scope(store) as session:
        assert queries.request_cancel(session, queued).state == "cancelled"
        assert queries.request_cancel(session, running).state == "cancelling"
        assert queries.job_state(session, running) == "cancelling"
    with session_scope(store) as session:
        # Nothing runs a cancelled job, and a cancelling one is cancelled on pickup.
        assert queries.start_job(session, queued, "w2") is None
        assert queries.start_job(session, running, "w2") is None
        assert queries.get_job(session, running).state == "cancelled"
        assert not queries.finish_job(session, running, JobState.succeeded)
    with session_scope(store) as session:
        states = [event.data["state"] for event in queries.job_events(session, running)]
        assert states == ["queued", "running", "cancelling", "cancelled"]


def test_a_redelivered_job_is_taken_over_not_restarted(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        first = queries.start_job(session, job_id, "w1").started_at
    with session_scope(store) as session:
        job = queries.start_job(session, job_id, "w2")
        assert (job.attempts, job.worker, job.started_at) == (2, "w2", first)
        assert queries.finish_job(session, job_id, JobState.succeeded)
    with session_scope(store) as session:
        assert queries.start_job(session, job_id, "w3") is None


def test_list_jobs_pages_newest_first(store):
    ids = [make_job(store) for _ in range(5)]
    with session_scope(store) as session:
        mine = set(ids)
        first = [j.id for j in queries.list_jobs(session, limit=3) if j.id in mine]
        second = [j.id for j in queries.list_jobs(session, limit=3, before=first[-1]) if j.id in mine]
    assert first + second == ids[::-1]


def test_presets_are_registered_with_lineage(store):
    job_id = make_job(store)
    name = f"tuned-{job_id[:8]}"
    with session_scope(store) as session:
        queries.register_preset(
            session,
            name=name,
            path="/store/tuned",
            architecture="llama",
            source="base",
            parent="base",
            job_id=job_id,
            details={"final_loss": 1.5},
        )
    with session_scope(store) as session:
        summary = queries.preset_summary(queries.get_preset(session, name))
    assert summary["parent"] == "base" and summary["job_id"] == job_id
    assert summary["details"] == {"final_loss": 1.5}


def test_deleting_a_job_deletes_its_items_and_events(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        session.delete(session.get(Job, job_id))
    with session_scope(store) as session:
        assert list(queries.job_results(session, job_id)) == []
        assert queries.job_events(session, job_id) == []
        assert session.scalar(select(Job).where(Job.id == job_id)) is None


def test_settings_reject_bad_values(lmq_home, monkeypatch):
    from core.config import SettingsError

    monkeypatch.setenv("LMQ_MODEL_MEMORY_GB", "lots")
    with pytest.raises(SettingsError, match="LMQ_MODEL_MEMORY_GB"):
        load_settings()
    monkeypatch.delenv("LMQ_MODEL_MEMORY_GB")
    monkeypatch.setenv("LMQ_API_TOKENS", "t1:a,broken")
    with pytest.raises(SettingsError, match="broken"):
        load_settings()
    monkeypatch.setenv("LMQ_API_TOKENS", "t1:a, t2:b")
    assert load_settings().api_tokens == {"t1": "a", "t2": "b"}


def test_engine_is_shared_per_url(lmq_home):
    url = load_settings().database_url
    assert get_engine(url) is get_engine(url)
