"""The SQL store on SQLite (always) and PostgreSQL (when LMQ_TEST_DATABASE_URL is set)."""

import socket
import subprocess
import time
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError

from lmq.api.schemas import preset_summary, result_line
from lmq.core.config import load_settings
from lmq.core.store import Job, JobState, leases, queries, session_scope, sessions
from lmq.core.store import db
from lmq.core.store.db import get_engine
from lmq.core.store.models import Base, utcnow

LEASE_S = 30


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
        lines = [result_line(item) for item in queries.job_items(session, job_id)]
        job = queries.get_job(session, job_id)
        assert job.state == "queued" and job.total == 2
    assert [(line["index"], line["custom_id"], line["output"]) for line in lines] == [
        (0, "q0", None),
        (1, "q1", None),
    ]


def test_a_result_is_written_once_and_counts_follow_the_items(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        assert leases.claim(session, job_id, "w1", LEASE_S).attempts == 1
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
        assert result_line(next(queries.job_items(session, job_id)))["output"] == "first"


def test_state_machine(store):
    queued, running = make_job(store), make_job(store)
    with session_scope(store) as session:
        leases.claim(session, running, "w1", lease_s=0)  # w1 is gone at once
    with session_scope(store) as session:
        assert queries.request_cancel(session, queued).state == "cancelled"
        assert queries.request_cancel(session, running).state == "cancelling"
        assert queries.job_state(session, running) == "cancelling"
    with session_scope(store) as session:
        # Nothing runs a cancelled job, and a cancelling one whose worker is gone is cancelled on pickup.
        assert leases.claim(session, queued, "w2", LEASE_S) is None
        assert leases.claim(session, running, "w2", LEASE_S) is None
        assert queries.get_job(session, running).state == "cancelled"
        assert not queries.finish_job(session, running, JobState.succeeded)
    with session_scope(store) as session:
        states = [event.data["state"] for event in queries.job_events(session, running)]
        assert states == ["queued", "running", "cancelling", "cancelled"]


def test_a_redelivered_job_is_taken_over_not_restarted(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        first = leases.claim(session, job_id, "w1", lease_s=0).started_at
    with session_scope(store) as session:
        job = leases.claim(session, job_id, "w2", LEASE_S)
        assert (job.attempts, job.worker, job.started_at) == (2, "w2", first)
        assert queries.finish_job(session, job_id, JobState.succeeded)
    with session_scope(store) as session:
        assert leases.claim(session, job_id, "w3", LEASE_S) is None


def test_a_live_lease_refuses_a_second_worker_and_fences_the_first_after_a_takeover(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        first = leases.Lease(job_id, "w1", leases.claim(session, job_id, "w1", LEASE_S).attempts)
    with session_scope(store) as session:
        assert leases.claim(session, job_id, "w2", LEASE_S) is None  # a duplicate delivery
        leases.renew(session, first, lease_s=0)  # ... then w1 goes silent
    with session_scope(store) as session:
        taken = leases.claim(session, job_id, "w2", LEASE_S)
        assert (taken.attempts, taken.worker) == (2, "w2")
        running = [e.data for e in queries.job_events(session, job_id) if e.data.get("state") == "running"]
        assert running[-1]["expired_lease_of"] == "w1" and running[-1]["resumed"] is True
    with pytest.raises(leases.LeaseLost, match="attempt 1 no longer holds"):
        with session_scope(store) as session:
            leases.renew(session, first, LEASE_S)
            queries.record_results(session, job_id, [queries.ItemResult(0, output="from w1")])
    with session_scope(store) as session:
        assert result_line(next(queries.job_items(session, job_id)))["output"] is None
        leases.renew(session, leases.Lease(job_id, "w2", 2), LEASE_S)


def test_jobs_waiting_for_a_worker_and_one_send_among_many_sweepers(store):
    stale, fresh, expired, live = (make_job(store) for _ in range(4))
    now = utcnow()
    with session_scope(store) as session:
        session.execute(update(Job).where(Job.id == stale).values(enqueued_at=now - timedelta(minutes=5)))
        session.execute(update(Job).where(Job.id == fresh).values(enqueued_at=now))
        leases.claim(session, expired, "w1", lease_s=0)
        leases.claim(session, live, "w1", LEASE_S)
        session.execute(update(Job).where(Job.id.in_([expired, live])).values(enqueued_at=now - timedelta(minutes=5)))
    with session_scope(store) as session:
        waiting = leases.waiting_for_a_worker(session, utcnow(), sent_before=now - timedelta(minutes=1))
        found = {job.id: job.state for job in waiting if job.id in (stale, fresh, expired, live)}
        assert found == {stale: "queued", expired: "running"}
        last_sent = next(job.enqueued_at for job in waiting if job.id == stale)
    with session_scope(store) as session:
        assert leases.mark_sent(session, stale, last_sent)
    with session_scope(store) as session:
        assert not leases.mark_sent(session, stale, last_sent)  # a second sweeper saw the same row
        # Sent again after it expired: not waiting any more until the next sweep interval passes.
        assert leases.mark_sent(session, expired, now - timedelta(minutes=5))
        waiting = leases.waiting_for_a_worker(session, utcnow(), sent_before=now - timedelta(minutes=1))
        assert {job.id for job in waiting} & {stale, fresh, expired, live} == set()


def test_a_lease_whose_holder_exited_on_this_host_ends_at_once_and_only_that_one(store):
    exited = subprocess.Popen(["true"])
    exited.wait()
    zombie = subprocess.Popen(["true"])  # exited but not yet waited for: its pid still exists
    holders = {
        "exited": leases.holder_name(exited.pid),
        "zombie": leases.holder_name(zombie.pid),
        "alive": leases.holder_name(),
        "other host": leases.holder_name(exited.pid).replace(f"@{socket.gethostname()}", "@another-host"),
        "other pid namespace": leases.holder_name(exited.pid).replace(".", ".1", 1),
        "unnamed": "w1",
    }
    jobs = {name: make_job(store) for name in holders}
    with session_scope(store) as session:
        for name, worker in holders.items():
            leases.claim(session, jobs[name], worker, LEASE_S)
    time.sleep(0.5)  # the zombie is one once `true` has run
    with session_scope(store) as session:
        ended = leases.end_leases_of_exited_holders(session)
    assert sorted(ended) == sorted([jobs["exited"], jobs["zombie"]])
    zombie.wait()
    with session_scope(store) as session:
        waiting = leases.waiting_for_a_worker(session, utcnow(), sent_before=utcnow() - timedelta(minutes=1))
        assert {job.id for job in waiting if job.lost} & set(jobs.values()) == set(ended)
        events = [e.data for e in queries.job_events(session, jobs["exited"]) if e.type == "holder_exited"]
        assert events == [{"attempt": 1, "worker": holders["exited"]}]
        taken = leases.claim(session, jobs["exited"], "w2", LEASE_S)
        assert taken.attempts == 2  # taken over at once, LMQ_LEASE_S before the lease would have run out
        assert leases.claim(session, jobs["alive"], "w2", LEASE_S) is None
    with session_scope(store) as session:
        assert leases.end_leases_of_exited_holders(session) == []  # w2 holds it now


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
        summary = preset_summary(queries.get_preset(session, name))
    assert summary["parent"] == "base" and summary["job_id"] == job_id
    assert summary["details"] == {"final_loss": 1.5}


def test_deleting_a_job_deletes_its_items_and_events(store):
    job_id = make_job(store)
    with session_scope(store) as session:
        session.delete(session.get(Job, job_id))
    with session_scope(store) as session:
        assert [result_line(item) for item in queries.job_items(session, job_id)] == []
        assert queries.job_events(session, job_id) == []
        assert session.scalar(select(Job).where(Job.id == job_id)) is None


def test_settings_reject_bad_values(lmq_home, monkeypatch):
    from lmq.core.config import SettingsError

    monkeypatch.setenv("LMQ_MODEL_MEMORY_GB", "lots")
    with pytest.raises(SettingsError, match="LMQ_MODEL_MEMORY_GB"):
        load_settings()
    monkeypatch.delenv("LMQ_MODEL_MEMORY_GB")
    monkeypatch.setenv("LMQ_API_TOKENS", "t1:a,broken")
    with pytest.raises(SettingsError, match="broken"):
        load_settings()
    monkeypatch.setenv("LMQ_API_TOKENS", "t1:a, t2:b")
    assert load_settings().api_tokens == {"t1": "a", "t2": "b"}


def test_lease_timing_is_configurable_and_a_heartbeat_must_fit_its_lease(lmq_home, monkeypatch):
    from lmq.core.config import SettingsError

    defaults = load_settings()
    assert (defaults.lease_s, defaults.heartbeat_s, defaults.sweep_s) == (30.0, 5.0, 10.0)
    monkeypatch.setenv("LMQ_LEASE_S", "8")
    monkeypatch.setenv("LMQ_HEARTBEAT_S", "5")
    with pytest.raises(SettingsError, match=r"LMQ_HEARTBEAT_S \(5\) must be at most half of LMQ_LEASE_S \(8\)"):
        load_settings()
    monkeypatch.setenv("LMQ_HEARTBEAT_S", "2")
    assert (load_settings().lease_s, load_settings().heartbeat_s) == (8.0, 2.0)


def test_a_transaction_is_retried_while_the_server_is_away_and_only_then(lmq_home, postgres_url, monkeypatch):
    monkeypatch.setenv("LMQ_DATABASE_URL", postgres_url)
    store = sessions(load_settings())
    monkeypatch.setattr(db, "_BACKOFF_S", (0.01,))
    lost = OperationalError("SELECT 1", {}, ConnectionError("server closed the connection unexpectedly"))
    calls = []

    def lost_twice(session):
        calls.append(1)
        if len(calls) <= 2:
            raise lost
        return session.execute(text("SELECT 41 + 1")).scalar()

    assert db.transact(store, lost_twice) == 42 and len(calls) == 3

    def broken_sql(session):
        calls.append(1)
        session.execute(text("SELECT * FROM no_such_table"))

    calls.clear()
    with pytest.raises(DBAPIError, match="no_such_table"):
        db.transact(store, broken_sql)
    assert len(calls) == 1

    def always_down(session):
        raise lost

    with pytest.raises(db.DatabaseUnavailable, match="did not answer for 0.05s"):
        db.transact(store, always_down, within_s=0.05)


def test_engine_is_shared_per_url(lmq_home):
    url = load_settings().database_url
    assert get_engine(url) is get_engine(url)
