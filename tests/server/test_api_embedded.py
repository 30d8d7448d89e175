"""The API on the embedded default: `lmq serve` with no broker and no tokens runs
its jobs itself (SQLite, one local tenant, loopback only), and the API process
stays light."""

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from api_support import REPO, ApiServer, generate_body, wait_for_job
from service_support import PROMPTS, reference, write_prompts

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.store import leases, queries, session_scope, sessions


def left_by_an_earlier_server(tiny_llama_preset):
    """A queued job, a job whose runner died, and one whose runner (this test) is alive, all made an hour ago."""
    settings = load_settings()
    ended = subprocess.Popen(["true"])
    ended.wait()
    jobs = {}
    with session_scope(sessions(settings)) as session:
        # A lease that ran out long ago, as any runner's does once it stops; a live runner renews its lease.
        for name, worker, lease_s in (("queued", None, 0), ("dead", ended.pid, 0), ("alive", os.getpid(), 3600)):
            job = queries.create_generate_job(
                session, preset=str(tiny_llama_preset), inputs=[{"prompt": PROMPTS[0]}], params={"max_length": 40}
            )
            job.created_at -= timedelta(hours=1)
            if worker is not None:
                leases.claim(session, job.id, leases.holder_name(worker), lease_s=lease_s)
            jobs[name] = job.id
    return jobs


def test_lmq_serve_alone_runs_the_jobs_it_accepts_and_those_left_over(lmq_home, tiny_llama_preset, tmp_path, capsys):
    left_over = left_by_an_earlier_server(tiny_llama_preset)
    env = {"LMQ_HOME": str(lmq_home), "LMQ_PRESET_ROOTS": str(tiny_llama_preset.parent)}
    server = ApiServer(env, tmp_path / "server.log")
    try:
        with server.client() as client:
            ready = client.get("/readyz").json()
            assert ready["ready"] and "no broker" in ready["broker"]["detail"]
            job = client.post("/v1/jobs", json=generate_body(tiny_llama_preset, PROMPTS[:3], max_length=40))
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            assert job.json()["tenant"] == "local"
            assert main(["jobs", "watch", job_id, "--server", server.url]) == 0
            assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
            # `lmq submit --wait -o` writes the results, as `lmq generate -o` does.
            source, submitted = write_prompts(tmp_path / "in.jsonl", PROMPTS[:2]), tmp_path / "submitted.jsonl"
            argv = ["submit", "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "40"]
            assert main([*argv, "--server", server.url, "--wait", "-o", str(submitted)]) == 0
            assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
            summary = wait_for_job(client, job_id, 10, [server.log])
            lines = [json.loads(line) for line in client.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
            earlier = {name: client.get(f"/v1/jobs/{id}").json()["status"] for name, id in left_over.items()}
    finally:
        server.stop()
    assert summary["counts"]["completed"] == 3
    expected = reference(tiny_llama_preset, PROMPTS[:3], max_length=40)
    assert [line["output"] for line in lines] == [e["output"] for e in expected]
    assert earlier == {"queued": "succeeded", "dead": "succeeded", "alive": "running"}
    written = [json.loads(line) for line in submitted.read_text().splitlines()]
    assert [(line["custom_id"], line["output"]) for line in written] == [
        (f"q{i}", e["output"]) for i, e in enumerate(expected[:2])
    ]
    print(f"lmq serve answered /healthz {server.started_seconds:.2f}s after it was started")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_without_tokens_lmq_serve_listens_on_loopback_only(lmq_home, capsys, host):
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--host", host])
    assert refused.value.code == 2
    assert "LMQ_API_TOKENS is not set" in capsys.readouterr().err


def test_the_api_process_never_imports_keras_or_torch(lmq_home):
    """Every endpoint, a job submitted through a broker included, on a fresh interpreter."""
    script = """
import json, sys, time
started = time.perf_counter()
import lmq.api.cli
from lmq.api.app.main import create_app
from fastapi.testclient import TestClient
with TestClient(create_app()) as client:
    assert client.get("/healthz").status_code == 200
    ready_after = time.perf_counter() - started
    assert client.get("/readyz").status_code == 200, client.get("/readyz").text
    job = client.post("/v1/jobs", json={"kind": "generate", "preset": "llama2_7b_en", "inputs": [{"prompt": "Hi"}]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    for path in ("/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results", f"/v1/jobs/{job_id}/events",
                 "/v1/presets", "/v1/presets/llama2_7b_en", "/v1/architectures", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
heavy = sorted(name for name in sys.modules if name.partition(".")[0] in ("keras", "torch", "tensorflow"))
print(json.dumps({"heavy": heavy, "ready_after": ready_after}))
"""
    # An in-memory broker: jobs go to Celery, as in production, without a Redis here.
    env = {**os.environ, "LMQ_HOME": str(lmq_home), "LMQ_BROKER_URL": "memory://", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["heavy"] == []
    print(f"imports to a ready app: {report['ready_after']:.2f}s")
