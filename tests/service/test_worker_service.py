"""Through the real service: `lmq submit` -> Redis (or RabbitMQ) -> a real `lmq worker`
process (Celery, solo pool) -> PostgreSQL. Runs whenever LMQ_TEST_REDIS_URL and
LMQ_TEST_DATABASE_URL are set (always in CI); the tests marked with the "amqp"
broker also run on RabbitMQ where LMQ_TEST_AMQP_URL is set (CI sets it)."""

import json
import time
from pathlib import Path

import pytest
from service_support import PROMPTS, reference, write_prompts
from worker_support import (  # noqa: F401  broker and workers are fixtures
    MANY_PROMPTS,
    broker,
    events,
    finished,
    job,
    results,
    submit,
    wait_for,
    workers,
)

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_jobs_run_on_a_worker_and_a_pinned_model_is_reused(capsys, tmp_path, workers, tiny_llama_preset):
    worker = workers()
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS)
    first = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "48")
    summary = wait_for(lambda: finished(first), 180, "the first job", [worker.log])
    assert summary["status"] == "succeeded", summary
    expected = reference(tiny_llama_preset, PROMPTS, max_length=48)
    assert [r["output"] for r in results(first)] == [e["output"] for e in expected]

    second = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "48")
    assert wait_for(lambda: finished(second), 60, "the second job", [worker.log])["status"] == "succeeded"
    assert [e["pool_hit"] for e in events(first, "model") + events(second, "model")] == [False, True]
    assert events(second, "model")[0]["load_seconds"] == 0.0


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_a_killed_worker_loses_nothing_and_duplicates_nothing(capsys, tmp_path, workers, tiny_llama_preset):
    # Default settings: the job comes back through its lease, which runs out
    # LMQ_LEASE_S after the dead worker's last heartbeat, and the next sweep.
    first = workers()
    source = write_prompts(tmp_path / "many.jsonl", MANY_PROMPTS)
    job_id = submit(
        capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "48",
        "--micro-batch-size", "2",
    )
    partly = wait_for(
        lambda: (s := job(job_id))["counts"]["completed"] >= 4 and s, 180, "some progress", [first.log]
    )
    first.kill()
    killed_at = time.monotonic()
    done_before = job(job_id)["counts"]["completed"]
    assert partly["status"] == "running" and done_before < len(MANY_PROMPTS)

    second = workers()
    wait_for(lambda: job(job_id)["attempts"] == 2, 120, "another worker to take the job", [first.log, second.log])
    print(f"killed worker's job running again on another worker {time.monotonic() - killed_at:.1f}s after SIGKILL")
    summary = wait_for(lambda: finished(job_id), 240, "the taken-over job", [first.log, second.log])
    assert summary["status"] == "succeeded", summary
    assert summary["attempts"] == 2
    assert summary["counts"] == {"total": len(MANY_PROMPTS), "completed": len(MANY_PROMPTS), "failed": 0}
    lines = results(job_id)
    assert [line["index"] for line in lines] == list(range(len(MANY_PROMPTS)))
    expected = reference(tiny_llama_preset, MANY_PROMPTS, max_length=48)
    assert [line["output"] for line in lines] == [e["output"] for e in expected]
    resumed = [e for e in events(job_id, "state") if e["state"] == "running"]
    assert [e["resumed"] for e in resumed] == [False, True]


def test_cancel_stops_a_running_job_and_keeps_its_results(capsys, tmp_path, workers, tiny_llama_preset):
    worker = workers("--preload", str(tiny_llama_preset))
    source = write_prompts(tmp_path / "many.jsonl", MANY_PROMPTS)
    job_id = submit(
        capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "48",
        "--micro-batch-size", "2",
    )
    wait_for(lambda: job(job_id)["counts"]["completed"] >= 2, 180, "some progress", [worker.log])
    assert main(["jobs", "cancel", job_id]) == 0
    at_cancel = json.loads(capsys.readouterr().out)["counts"]["completed"]
    summary = wait_for(lambda: finished(job_id), 60, "the cancel", [worker.log])
    assert summary["status"] == "cancelled"
    # At most the micro-batch in flight (two prompts) finishes after the request.
    assert at_cancel <= summary["counts"]["completed"] <= at_cancel + 2 < len(MANY_PROMPTS)
    lines = results(job_id)
    done = [line for line in lines if line["output"] is not None]
    assert len(done) == summary["counts"]["completed"]
    expected = reference(tiny_llama_preset, MANY_PROMPTS, max_length=48)
    assert all(line["output"] == expected[line["index"]]["output"] for line in done)
    # The worker loaded the preset at start, so even its first job found it pinned.
    assert [e["pool_hit"] for e in events(job_id, "model")] == [True]


def test_fit_on_a_worker_then_generate_with_the_result(capsys, tmp_path, workers, tiny_llama_preset):
    worker = workers()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    fit_id = submit(
        capsys, "fit", "--preset", str(tiny_llama_preset), str(train), "--output-preset", "worker-tuned",
        "--batch-size", "3", "--sequence-length", "24",
    )
    summary = wait_for(lambda: finished(fit_id), 180, "the fit job", [worker.log])
    assert summary["status"] == "succeeded", summary
    assert len(events(fit_id, "step")) == 2

    source = write_prompts(tmp_path / "in2.jsonl", PROMPTS[:2])
    job_id = submit(capsys, "generate", "--preset", "worker-tuned", source, "--max-length", "24")
    assert wait_for(lambda: finished(job_id), 120, "the generate job", [worker.log])["status"] == "succeeded"
    with session_scope(sessions(load_settings())) as session:
        path = queries.get_preset(session, "worker-tuned").path
    expected = reference(path, PROMPTS[:2], max_length=24)
    assert [line["output"] for line in results(job_id)] == [e["output"] for e in expected]


def test_a_preset_with_its_own_queue_reaches_only_its_workers(
    capsys, tmp_path, workers, tiny_llama_preset, monkeypatch
):
    demo = REPO / "demo" / "stdlib-tiny-llama"
    routes = {"LMQ_PRESET_QUEUES": f"{tiny_llama_preset}=tiny"}
    monkeypatch.setenv("LMQ_PRESET_QUEUES", routes["LMQ_PRESET_QUEUES"])
    worker = workers("--queues", "generate.tiny", **routes)
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS[:2])
    routed = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "48")
    elsewhere = submit(capsys, "generate", "--preset", str(demo), source, "--max-new-tokens", "4")
    assert wait_for(lambda: finished(routed), 120, "the routed job", [worker.log])["status"] == "succeeded"
    time.sleep(1)
    assert job(elsewhere)["status"] == "queued"
