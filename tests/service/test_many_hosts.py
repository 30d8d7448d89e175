"""Many hosts, no shared disk: two `lmq serve` and two `lmq worker` processes, each with its own LMQ_HOME,
sharing only PostgreSQL, Redis and an S3-compatible object store (SeaweedFS, tests/storage_support.py);
and a worker drained by SIGTERM handing its job to another at once. Default settings throughout. The
"hosts" share this machine, so B's sweep sees that A's process is gone and takes its job at once
(core/store/leases.py); on two machines B would wait out LMQ_LEASE_S."""

import json
import shutil
import signal
import time

import httpx
from api_support import ApiServer, generate_body, wait_for_job
from service_support import PROMPTS, reference
from storage_support import object_keys, s3_env, s3_server  # noqa: F401  fixtures
from worker_support import (  # noqa: F401  broker and workers are fixtures
    MANY_PROMPTS,
    broker,
    events,
    finished,
    holder,
    item_rows,
    submit,
    wait_for,
    workers,
)

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions

SHORT_PROMPTS = [PROMPTS[0], PROMPTS[1], PROMPTS[4]]  # each well inside max_length=24
S3_VARIABLES = ("LMQ_STORAGE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[many hosts] {line}")


def completions(client: httpx.Client, job_id: str) -> list[str]:
    return [json.loads(line)["output"] for line in client.get(f"/v1/jobs/{job_id}/results").text.splitlines()]


def ended(client: httpx.Client, batch_id: str) -> dict | None:
    batch = client.get(f"/v1/batches/{batch_id}").json()
    return batch if batch["status"] in ("completed", "failed", "expired", "cancelled") else None


def fit_body(base: str, output: str, texts: list[str], epochs: int) -> dict:
    return {
        "kind": "fit",
        "preset": base,
        "training_data": [{"text": text} for text in texts],
        "hyperparameters": {"epochs": epochs, "batch_size": 3, "sequence_length": 24, "learning_rate": 0.01},
        "output_preset": output,
    }


def test_two_servers_and_two_workers_share_only_the_database_the_broker_and_the_object_store(
    capsys, tmp_path, s3_server, s3_env, service_env, workers, tiny_llama_preset
):
    shared = {**{name: s3_env[name] for name in S3_VARIABLES}, "LMQ_DATABASE_URL": service_env["LMQ_DATABASE_URL"]}
    homes = {name: tmp_path / f"home-{name}" for name in ("server-1", "server-2", "worker-a", "worker-b")}
    # The base preset goes into the object store, as `lmq presets import` puts it there from any machine.
    assert main(["presets", "import", str(tiny_llama_preset), "--name", "base"]) == 0
    servers = [
        ApiServer({**shared, "LMQ_BROKER_URL": service_env["LMQ_BROKER_URL"], "LMQ_HOME": str(homes[f"server-{i}"])},
                  tmp_path / f"server-{i}.log")
        for i in (1, 2)
    ]
    try:
        one, two = (server.client() for server in servers)
        worker_a = workers(LMQ_HOME=str(homes["worker-a"]), **shared)
        logs = [worker_a.log, *(server.log for server in servers)]
        assert all(server.client().get("/readyz").json()["storage"]["ok"] for server in servers)

        # A file uploaded through server 1 is batched through server 2.
        lines = "".join(
            json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0}}) + "\n"
            for i, prompt in enumerate(PROMPTS[:3])
        )
        uploaded = one.post("/v1/files", files={"file": ("batch.jsonl", lines.encode())}, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        assert f"lmq/files/{file_id}" in object_keys(s3_server, s3_env["bucket"])
        assert not list((homes["server-1"] / "files").iterdir())  # nothing kept on server 1's disk
        batch = two.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                              "completion_window": "24h"}).json()
        batch = wait_for(lambda: ended(two, batch["id"]), 240, "the batch", logs)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3, batch
        output = [json.loads(line) for line in one.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
        expected = reference(tiny_llama_preset, PROMPTS[:3], max_new_tokens=8)
        assert [PROMPTS[i] + entry["response"]["body"]["choices"][0]["text"] for i, entry in enumerate(output)] == [
            e["output"] for e in expected
        ]

        # A fine-tune made on worker A, and what it generates there.
        made = one.post("/v1/jobs", json=fit_body("base", "tuned", PROMPTS * 2, epochs=1)).json()
        assert wait_for_job(one, made["id"], 240, logs)["status"] == "succeeded"
        on_a = two.post("/v1/jobs", json=generate_body("tuned", SHORT_PROMPTS, max_length=24)).json()
        assert wait_for_job(two, on_a["id"], 240, logs)["status"] == "succeeded"
        assert holder(on_a["id"])["worker"] == holder(made["id"])["worker"] == worker_a.name

        # A longer fit is killed mid-epoch on A, whose disk is then gone: it resumes on B from the store.
        resumed = two.post("/v1/jobs", json=fit_body("base", "tuned-long", PROMPTS * 4, epochs=3)).json()
        wait_for(lambda: holder(resumed["id"])["completed"] >= 10, 240, "the second epoch", logs)
        worker_b = workers(LMQ_HOME=str(homes["worker-b"]), **shared)
        worker_a.kill()
        killed_at = time.monotonic()
        shutil.rmtree(homes["worker-a"])
        summary = wait_for(lambda: finished(resumed["id"]), 300, "the resumed fit", [worker_b.log, *logs])
        assert summary["status"] == "succeeded", summary
        assert holder(resumed["id"])["worker"] == worker_b.name
        (resumption,) = events(resumed["id"], "resumed")
        assert 1 <= resumption["epochs_done"] <= 2
        assert [e["step"] for e in events(resumed["id"], "step")] == list(range(1, 25))  # nothing lost or doubled

        # Worker B serves A's fine-tune, from the object store, with the outputs it had on A.
        on_b = one.post("/v1/jobs", json=generate_body("tuned", SHORT_PROMPTS, max_length=24)).json()
        assert wait_for_job(one, on_b["id"], 240, [worker_b.log, *logs])["status"] == "succeeded"
        assert holder(on_b["id"])["worker"] == worker_b.name
        assert None not in completions(one, on_b["id"]) and completions(one, on_b["id"]) == completions(two, on_a["id"])
        base_outputs = [e["output"] for e in reference(tiny_llama_preset, SHORT_PROMPTS, max_length=24)]
        assert completions(one, on_b["id"]) != base_outputs
        report(capsys, f"fit resumed on worker B {time.monotonic() - killed_at:.0f}s after SIGKILL of A "
                       f"(on one machine: not after LMQ_LEASE_S={load_settings().lease_s:g}), "
                       f"after {resumption['epochs_done']} epoch(s)")
    finally:
        for server in servers:
            server.stop()

    # Nothing was kept on, or read from, any one process's disk: every byte is in the store.
    made_here = ("base", "tuned", "tuned-long")  # the session's database holds other tests' presets too
    with session_scope(sessions(load_settings())) as session:
        paths = {preset.name: preset.path for preset in queries.list_presets(session) if preset.name in made_here}
    assert sorted(paths) == list(made_here)
    assert all(path.startswith(s3_env["LMQ_STORAGE_URL"] + "/presets/") for path in paths.values()), paths
    for name, home in homes.items():
        if home.exists():
            assert not (home / "presets").exists() and not (home / "checkpoints").exists(), name
            assert not list((home / "files").glob("*")) if (home / "files").exists() else True, name
    assert len(list((homes["worker-b"] / "cache" / "presets").iterdir())) >= 2  # base and tuned, fetched once
    assert not any("/checkpoints/" in key for key in object_keys(s3_server, s3_env["bucket"]))


def test_a_worker_told_to_stop_hands_its_job_to_another_at_once(capsys, workers, tiny_llama_preset, tmp_path):
    first, second = workers(), workers()
    for worker in (first, second):
        wait_for(lambda w=worker: f"{w.name} ready." in w.log.read_text(), 120, "the worker to be ready", [worker.log])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(MANY_PROMPTS)))
    job_id = submit(capsys, "generate", "--preset", str(tiny_llama_preset), str(prompts), "--max-length", "48",
                    "--micro-batch-size", "2")
    logs = [first.log, second.log]
    wait_for(lambda: holder(job_id)["completed"] >= 4, 240, "the job to be under way", logs)
    running, other = (first, second) if holder(job_id)["worker"] == first.name else (second, first)
    done_before = holder(job_id)["completed"]

    running.process.send_signal(signal.SIGTERM)
    told_at = time.monotonic()
    running.process.wait(load_settings().drain_s + 30)
    exited_at = time.monotonic()
    wait_for(lambda: holder(job_id)["worker"] == other.name, 30, "the other worker to take the job", logs)
    taken_after = time.monotonic() - exited_at
    summary = wait_for(lambda: finished(job_id), 300, "the job", logs)

    assert taken_after < 10, taken_after  # not after LMQ_LEASE_S (30 s): the lease was released
    (handed,) = events(job_id, "handed_back")
    assert handed["worker"] == running.name
    assert summary["status"] == "succeeded" and summary["counts"]["completed"] == len(MANY_PROMPTS), summary
    rows = item_rows(job_id)
    assert [row[0] for row in rows] == list(range(len(MANY_PROMPTS))) and all(row[2] is None for row in rows)
    expected = reference(tiny_llama_preset, MANY_PROMPTS, max_length=48)
    assert [row[1] for row in rows] == [e["output"] for e in expected]  # complete, in order, as one run gives
    report(capsys, f"SIGTERM after {done_before} results: exited {exited_at - told_at:.1f}s later, "
                   f"the job taken by the other worker {taken_after:.1f}s after that")


def test_a_released_lease_is_taken_over_at_once_and_fences_the_worker_that_let_go(lmq_home):
    import pytest

    from lmq.core.store import leases
    from lmq.core.store.models import utcnow

    factory = sessions(load_settings())
    with session_scope(factory) as session:
        job_id = queries.create_generate_job(session, preset="tiny", inputs=[{"prompt": "a"}], params={}).id
    with session_scope(factory) as session:
        lease = leases.Lease(job_id, "w1", leases.claim(session, job_id, "w1", lease_s=30).attempts)
    with session_scope(factory) as session:
        assert leases.claim(session, job_id, "w2", lease_s=30) is None  # live: a duplicate delivery
        assert leases.release(session, lease, resent=True)
    with pytest.raises(leases.LeaseLost):  # the worker that let go can write nothing more
        with session_scope(factory) as session:
            leases.renew(session, lease, lease_s=30)
    with session_scope(factory) as session:
        # Sent again with the release: no sweep sends it a second time.
        assert [job.id for job in leases.waiting_for_a_worker(session, utcnow(), utcnow()) if job.lost] == []
        taken = leases.claim(session, job_id, "w2", lease_s=30)  # at once, not after LMQ_LEASE_S
        assert (taken.attempts, taken.worker) == (2, "w2")
    assert [e["worker"] for e in events(job_id, "handed_back")] == ["w1"]


DRAIN_SCRIPT = """
import sys, time
from lmq.core.config import load_settings
from lmq.core.store import session_scope, sessions
from lmq.core.store.leases import Lease, claim
from lmq.workers.attempt import Attempt, start_draining

settings = load_settings()
factory = sessions(settings)
with session_scope(factory) as session:
    lease = Lease(sys.argv[1], "w1", claim(session, sys.argv[1], "w1", settings.lease_s).attempts)
with Attempt(factory, lease, settings):
    start_draining(float(sys.argv[2]))
    time.sleep(60)  # a model that is still loading: no write comes to hand the job back at
"""


def test_a_worker_that_does_not_reach_a_write_within_the_drain_time_lets_go_and_exits(lmq_home):
    import subprocess
    import sys

    from lmq.core.store.leases import waiting_for_a_worker
    from lmq.core.store.models import Job, utcnow

    factory = sessions(load_settings())
    with session_scope(factory) as session:
        job_id = queries.create_generate_job(session, preset="tiny", inputs=[{"prompt": "a"}], params={}).id
    started = time.monotonic()
    drained = subprocess.run([sys.executable, "-c", DRAIN_SCRIPT, job_id, "2"], capture_output=True, text=True, timeout=60)
    assert drained.returncode == 75, drained.stderr  # EX_TEMPFAIL: stopped by the drain deadline
    assert 2 <= time.monotonic() - started < 30
    assert "not handed back within LMQ_DRAIN_S=2 s" in drained.stderr
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        assert job.state == "running" and job.worker is None and job.lease_expires_at <= utcnow()
        # Not sent again by the stopping worker: the sweep of the others sends it.
        assert [w.id for w in waiting_for_a_worker(session, utcnow(), utcnow()) if w.lost] == [job_id]
    assert [e["worker"] for e in events(job_id, "handed_back")] == ["w1"]
