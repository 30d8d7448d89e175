"""`lmq serve` alone (no broker) killed mid-job and started again at once: it
takes the job up again itself, at its first sweep, because it sees that the
dead server's process is gone (core/store/leases.py), and the job ends with
exactly one result per input, equal to an uninterrupted greedy run.

Default settings: the takeover does not wait for LMQ_LEASE_S to run out.
"""

import time
from datetime import timedelta

from api_support import ApiServer, generate_body
from service_support import reference
from worker_support import MANY_PROMPTS, events, finished, holder, item_rows, wait_for

from lmq.workers.in_process import InProcessWorker
from lmq.core.config import load_settings
from lmq.core.store import leases, queries, session_scope, sessions
from lmq.core.store.models import utcnow

def test_a_killed_lmq_serve_started_again_resumes_its_job(capsys, lmq_home, tiny_llama_preset, tmp_path):
    env = {"LMQ_HOME": str(lmq_home), "LMQ_PRESET_ROOTS": str(tiny_llama_preset.parent)}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = ApiServer(env, logs[0])
    try:
        with first.client() as client:
            body = generate_body(tiny_llama_preset, MANY_PROMPTS, max_length=48, micro_batch_size=2)
            submitted = client.post("/v1/jobs", json=body)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
        wait_for(lambda: holder(job_id)["completed"] >= 6, 240, "some results", logs[:1])
    finally:
        first.process.kill()  # SIGKILL: no shutdown, the lease stays as it was
        first.process.wait(10)
    killed_at = time.monotonic()
    before = holder(job_id)
    assert before["state"] == "running" and before["completed"] < len(MANY_PROMPTS)
    written_before = [row for row in item_rows(job_id) if row[3] is not None]

    second = ApiServer(env, logs[1])
    try:
        wait_for(lambda: holder(job_id)["attempts"] == 2, 120, "the restarted server to take the job", logs)
        resumed_after = time.monotonic() - killed_at
        summary = wait_for(lambda: finished(job_id), 240, "the job", logs)
        finished_after = time.monotonic() - killed_at
    finally:
        second.stop()

    assert summary["status"] == "succeeded", summary
    assert summary["counts"] == {"total": len(MANY_PROMPTS), "completed": len(MANY_PROMPTS), "failed": 0}
    assert summary["attempts"] == 2
    rows = item_rows(job_id)
    assert [row[0] for row in rows] == list(range(len(MANY_PROMPTS)))  # one result per input
    assert all(row[2] is None for row in rows)
    expected = reference(tiny_llama_preset, MANY_PROMPTS, max_length=48)
    assert [row[1] for row in rows] == [e["output"] for e in expected]
    assert set(written_before) <= set(rows)  # what the killed server wrote is kept, not redone
    running = [e for e in events(job_id, "state") if e["state"] == "running"]
    assert [e["attempt"] for e in running] == [1, 2]
    assert running[1]["expired_lease_of"] == before["worker"]
    assert [e["worker"] for e in events(job_id, "holder_exited")] == [before["worker"]]
    with capsys.disabled():
        print(
            f"\n[drill] lmq serve SIGKILLed after {before['completed']}/{len(MANY_PROMPTS)} results and started again "
            f"at once (default settings, LMQ_LEASE_S={load_settings().lease_s:g}): job running again "
            f"{resumed_after:.1f}s after the kill (server start included), succeeded after {finished_after:.1f}s"
        )


def test_the_embedded_sweep_takes_up_the_jobs_nothing_else_will_run(lmq_home, tiny_llama_preset):
    """Queued jobs older than a sweep period and running ones whose lease expired, each once;
    not a job just written (`lmq generate` is about to claim it) nor one under a live lease."""
    settings = load_settings()
    jobs = {}
    with session_scope(sessions(settings)) as session:
        for name, age, lease_s in (
            ("old queued", 3600, None),
            ("new queued", 0, None),
            ("expired", 3600, 0),
            ("live lease", 3600, 3600),
        ):
            job = queries.create_generate_job(
                session, preset=str(tiny_llama_preset), inputs=[{"prompt": "Hi"}], params={}
            )
            job.created_at = utcnow() - timedelta(seconds=age)
            if lease_s is not None:
                leases.claim(session, job.id, "lmq-1@elsewhere", lease_s=lease_s)
            jobs[job.id] = name
    worker = InProcessWorker(settings)  # not started: its queue only fills
    assert sorted(jobs[job_id] for job_id in worker.take_up_waiting()) == ["expired", "old queued"]
    assert worker.take_up_waiting() == []  # they wait on its queue already
    assert worker.jobs.qsize() == 2
