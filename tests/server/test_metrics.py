"""Prometheus metrics and the structured log: what a job did shows on the API's
/metrics (SQL counts, requests) and on the worker's (tokens, pool, jobs, leases),
read with the Prometheus text parser; and one key=value line per state change."""

import logging
import shlex
import time

import httpx
import pytest
from api_support import free_port, generate_body
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import PROMPTS, write_prompts
from worker_support import broker, finished, results, submit, wait_for, workers  # noqa: F401  fixtures

from lmq.api.app.main import create_app
from lmq.core.config import load_settings
from lmq.core.logfmt import logfmt
from lmq.core.store import queries, session_scope, sessions
from lmq.workers import metrics


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} from Prometheus's text format."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape(url: str) -> dict:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return samples(response.text)


@pytest.fixture(scope="module")
def worker_metrics_url():
    """This process's worker metrics, served as `lmq worker` serves them (the in-process runner shares them)."""
    port = free_port()
    metrics.serve(port)
    return f"http://127.0.0.1:{port}/metrics"


def log_lines(caplog, logger: str) -> list[dict]:
    return [dict(pair.split("=", 1) for pair in shlex.split(r.getMessage())) for r in caplog.records if r.name == logger]


def test_a_job_moves_the_api_and_worker_metrics_by_what_it_did(
    lmq_home, tiny_llama_preset, monkeypatch, worker_metrics_url, caplog
):
    monkeypatch.setenv("LMQ_PRESET_ROOTS", str(tiny_llama_preset.parent))
    caplog.set_level(logging.INFO)
    settings = load_settings()
    sessions(settings)  # the schema, made before the app's threads start (as `lmq serve` does)
    worker_before = scrape(worker_metrics_url)
    with TestClient(create_app(settings)) as client:
        api_before = samples(client.get("/metrics").text)
        posted = client.post("/v1/jobs", json=generate_body(tiny_llama_preset, PROMPTS[:3], max_length=40))
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        polls = 0
        deadline = time.monotonic() + 120
        while (status := client.get(f"/v1/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed"):
            polls += 1
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.1)
        polls += 1
        assert status == "succeeded"
        lines = results(job_id)
        api_after = samples(client.get("/metrics").text)
        worker_after = scrape(worker_metrics_url)

        # The API: jobs by state from SQL, requests by route template and status.
        assert value(api_before, "lmq_jobs", kind="generate", state="succeeded") == 0
        assert value(api_after, "lmq_jobs", kind="generate", state="succeeded") == 1
        assert value(api_after, "lmq_jobs", kind="generate", state="queued") == 0
        assert delta(api_before, api_after, "lmq_http_requests_total", method="POST", route="/v1/jobs", status="202") == 1
        assert value(api_after, "lmq_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") == polls
        assert value(api_after, "lmq_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}") == polls

        # A job nobody runs yet waits on its queue.
        with session_scope(sessions(settings)) as session:
            queries.create_generate_job(session, preset=str(tiny_llama_preset), inputs=[{"prompt": "x"}], params={})
        waiting = samples(client.get("/metrics").text)
        assert value(waiting, "lmq_queue_depth", queue="lmq.generate") == 1
        assert value(waiting, "lmq_jobs", kind="generate", state="queued") == 1
        assert value(waiting, "lmq_queue_depth", queue="lmq.fit") == 0

    # The worker: tokens as the results count them, one job, one model fetched, leases renewed.
    assert delta(worker_before, worker_after, "lmq_generated_tokens_total") == sum(r["completion_tokens"] for r in lines)
    assert delta(worker_before, worker_after, "lmq_prompt_tokens_total") == sum(r["prompt_tokens"] for r in lines)
    assert sum(r["completion_tokens"] for r in lines) > 0
    assert delta(worker_before, worker_after, "lmq_generated_rows_total", outcome="ok") == 3
    assert delta(worker_before, worker_after, "lmq_job_duration_seconds_count", kind="generate", state="succeeded") == 1
    pool = ("lmq_model_pool_hits_total", "lmq_model_pool_misses_total")
    assert sum(delta(worker_before, worker_after, name) for name in pool) == 1
    assert delta(worker_before, worker_after, "lmq_lease_renewals_total") > 0
    assert delta(worker_before, worker_after, "lmq_lease_recoveries_total") == 0
    assert value(worker_after, "lmq_rows_in_flight") == 0
    # Without a broker the server ran the job itself: its /metrics has the worker's too.
    assert delta(api_before, api_after, "lmq_generated_tokens_total") == sum(r["completion_tokens"] for r in lines)

    # The log: the API saw the job queued, the worker ran it to success and committed its rows.
    api_lines = [line for line in log_lines(caplog, "lmq.api") if line.get("job") == job_id]
    assert [(line["event"], line["state"]) for line in api_lines] == [("job_state", "queued")]
    worker_lines = [line for line in log_lines(caplog, "lmq.worker") if line.get("job") == job_id]
    states = [line["state"] for line in worker_lines if line["event"] == "job_state"]
    assert states == ["running", "succeeded"]
    assert sum(int(line["rows"]) for line in worker_lines if line["event"] == "results") == 3


def test_metrics_route_templates_do_not_grow_with_job_ids(lmq_home):
    settings = load_settings()
    sessions(settings)
    with TestClient(create_app(settings)) as client:
        for job_id in ("0" * 32, "1" * 32):
            assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get("/no/such/page").status_code == 404
        scraped = samples(client.get("/metrics").text)
    assert value(scraped, "lmq_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="404") == 2
    assert value(scraped, "lmq_http_requests_total", method="GET", route="unmatched", status="404") == 1
    routes = {dict(labels).get("route") for name, labels in scraped if name == "lmq_http_requests_total"}
    assert not any("000" in route for route in routes)


def test_a_solo_pool_worker_serves_its_metrics_on_the_configured_port(capsys, tmp_path, workers, tiny_llama_preset):
    port = free_port()
    worker = workers(LMQ_WORKER_METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS[:2])
    job_id = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, "--max-length", "40")
    summary = wait_for(lambda: finished(job_id), 180, "the job", [worker.log])
    assert summary["status"] == "succeeded", summary
    scraped = wait_for(lambda: scrape_or_none(url), 30, "the worker's metrics", [worker.log])
    assert value(scraped, "lmq_generated_tokens_total") == sum(r["completion_tokens"] for r in results(job_id))
    assert value(scraped, "lmq_job_duration_seconds_count", kind="generate", state="succeeded") == 1
    assert value(scraped, "lmq_model_pool_misses_total") == 1
    log = worker.log.read_text()
    assert logfmt("job_state", job=job_id, state="running", kind="generate", attempt=1) in log


def scrape_or_none(url: str) -> dict | None:
    try:
        return scrape(url)
    except httpx.HTTPError:
        return None


def test_a_job_taken_over_from_a_dead_runner_counts_as_a_lease_recovery(lmq_home, tiny_llama_preset, caplog):
    from lmq.core.store import leases
    from lmq.workers.runner import JobRunner, pool_from_settings

    caplog.set_level(logging.INFO)
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        job_id = queries.create_generate_job(
            session, preset=str(tiny_llama_preset), inputs=[{"prompt": PROMPTS[0]}], params={"max_length": 40}
        ).id
        leases.claim(session, job_id, "lmq-1@gone", lease_s=0)  # a runner that died at once
    before = samples(metrics_text())
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    after = samples(metrics_text())
    assert delta(before, after, "lmq_lease_recoveries_total") == 1
    assert delta(before, after, "lmq_job_duration_seconds_count", kind="generate", state="succeeded") == 1
    ours = [line for line in log_lines(caplog, "lmq.worker") if line.get("job") == job_id]
    (started,) = [line for line in ours if line.get("state") == "running"]
    assert started["attempt"] == "2"


def metrics_text() -> str:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()


@pytest.mark.parametrize("setting", ["on", "off"])
def test_rows_that_share_an_instruction_show_on_the_prefix_cache_metrics(
    lmq_home, tiny_llama_preset, monkeypatch, setting
):
    """A job whose prompts start with one long instruction: with LMQ_PREFIX_CACHE on (the
    default) every prompt token is looked up and the later rows find the instruction's blocks;
    off, nothing is looked up."""
    from lmq.workers.runner import JobRunner, pool_from_settings

    monkeypatch.setenv("LMQ_PREFIX_CACHE", setting)
    settings = load_settings()
    instruction = "Answer in one short sentence, plainly, without any preamble, and say nothing else at all. " * 2
    inputs = [{"prompt": instruction + prompt} for prompt in PROMPTS]
    with session_scope(sessions(settings)) as session:
        job_id = queries.create_generate_job(
            session, preset=str(tiny_llama_preset), inputs=inputs, params={"max_length": 400}
        ).id
    before = samples(metrics_text())
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    after = samples(metrics_text())
    lines = results(job_id)
    hits = delta(before, after, "lmq_prefix_cache_hit_tokens_total")
    queried = delta(before, after, "lmq_prefix_cache_queried_tokens_total")
    if setting == "off":
        assert (hits, queried) == (0, 0)
        return
    assert [r["error"] for r in lines] == [None] * len(PROMPTS), lines
    assert queried == sum(r["prompt_tokens"] for r in lines)
    assert hits >= (len(PROMPTS) - 1) * 32  # the instruction: at least two blocks of 16 tokens per later row
    assert value(after, "lmq_prefix_cache_hit_rate") == pytest.approx(hits / queried)
    assert 0 < value(after, "lmq_prefix_cache_blocks") <= value(after, "lmq_prefix_cache_capacity_blocks")
