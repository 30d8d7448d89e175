"""The whole service over HTTP: `lmq serve` and a real `lmq worker` process on
Redis + PostgreSQL. Jobs go in through the API (and the CLI's --server client),
and what comes out equals `CausalLM.generate` on the same preset."""

import json
import os

import pytest
from api_support import TEAM_A, TEAM_B, TOKENS, ApiServer, generate_body, wait_for_job
from conftest import _service_urls
from service_support import PROMPTS, read_results, reference, write_prompts
from worker_support import Worker, wait_for

from lmq.api.cli import main
from lmq.api.cli.client import Client


@pytest.fixture(scope="module")
def service(tmp_path_factory, postgres_url, tiny_llama_preset):
    """One API server and one worker for the module, sharing a home and a preset store."""
    import redis

    _, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    root = tmp_path_factory.mktemp("api-service")
    home = root / "home"
    env = {"LMQ_HOME": str(home), "LMQ_DATABASE_URL": postgres_url, "LMQ_BROKER_URL": broker}
    roots = os.pathsep.join([str(home / "presets"), str(tiny_llama_preset.parent)])
    worker = Worker(env, root / "worker.log")
    server = ApiServer({**env, "LMQ_API_TOKENS": TOKENS, "LMQ_PRESET_ROOTS": roots}, root / "server.log")
    server.logs = [root / "worker.log", root / "server.log"]
    server.home = home
    yield server
    server.stop()
    worker.stop()


def test_generate_over_http_equals_causal_lm_generate(service, tiny_llama_preset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMQ_SERVER", service.url)
    monkeypatch.setenv("LMQ_TOKEN", "tok-a")
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS)
    code = main(
        ["submit", "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "40",
         "--micro-batch-size", "2", "--wait"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, (summary, [log.read_text()[-2000:] for log in service.logs])
    assert summary["status"] == "succeeded" and summary["tenant"] == "team-a"
    assert summary["counts"] == {"total": len(PROMPTS), "completed": len(PROMPTS), "failed": 0}

    output = tmp_path / "out.jsonl"
    assert main(["jobs", "results", summary["id"], "-o", str(output)]) == 0
    results = read_results(output)
    assert [r["index"] for r in results] == list(range(len(PROMPTS)))
    assert [r["custom_id"] for r in results] == [f"q{i}" for i in range(len(PROMPTS))]
    expected = reference(tiny_llama_preset, PROMPTS, max_length=40)
    assert [{k: r[k] for k in expected[0]} for r in results] == expected

    assert main(["jobs", "list", "--kind", "generate"]) == 0
    assert summary["id"] in [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    # The other tenant neither sees it nor reads it.
    assert main(["jobs", "list", "--token", "tok-b"]) == 0
    assert summary["id"] not in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["jobs", "show", summary["id"], "--token", "tok-b"])
    assert refused.value.code == 2 and "no job" in capsys.readouterr().err


def test_fit_over_http_makes_a_preset_the_next_job_uses(service, tiny_llama_preset):
    with Client(service.url, token="tok-b") as client:
        fit = client.submit(
            {
                "kind": "fit",
                "preset": str(tiny_llama_preset),
                "training_data": [{"text": p} for p in PROMPTS],
                "hyperparameters": {"epochs": 1, "batch_size": 3, "sequence_length": 24, "learning_rate": 0.01},
                "output_preset": "api-tuned",
            }
        )
        finished = client.wait(fit["id"], poll_seconds=0.2)
        assert finished["status"] == "succeeded", (finished, [log.read_text()[-2000:] for log in service.logs])
        steps = [e for e in client.events(fit["id"]) if e["type"] == "step"]
        assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)

        (preset,) = [p for p in client.presets() if p["name"] == "api-tuned"]
        assert preset["job_id"] == fit["id"] and preset["architecture"] == "llama"
        assert preset["parent"] == str(tiny_llama_preset)
        assert client.preset("api-tuned") == preset
        assert "path" not in preset and preset["owner"] == "team-b"

        job = client.submit(generate_body("api-tuned", PROMPTS[:2], max_length=24))
        assert client.wait(job["id"], poll_seconds=0.2)["status"] == "succeeded"
        results = list(client.results(job["id"]))
    expected = reference(service.home / "presets" / "api-tuned", PROMPTS[:2], max_length=24)
    assert [r["output"] for r in results] == [e["output"] for e in expected]
    assert expected != reference(tiny_llama_preset, PROMPTS[:2], max_length=24)


def test_cancel_over_http_stops_a_running_job(service, tiny_llama_preset):
    many = [f"{prompt} number {i}" for i in range(6) for prompt in PROMPTS[:5]]
    with service.client(TEAM_A) as client:
        job = client.post(
            "/v1/jobs", json=generate_body(tiny_llama_preset, many, max_length=48, micro_batch_size=2)
        ).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=TEAM_B).status_code == 404
        progress = lambda: client.get(f"/v1/jobs/{job['id']}").json()["counts"]["completed"] >= 2
        wait_for(progress, 120, "some progress", service.logs)
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
        summary = wait_for_job(client, job["id"], 60, service.logs)
    assert summary["status"] == "cancelled" and summary["counts"]["completed"] < len(many)
