"""Fault drills on the real service: workers killed and paused, a Redis server
restarted, the database connection cut. Every job must still finish with
exactly one result per input, equal to an uninterrupted greedy run.

Loopback only, bounded in time, default settings: a SIGKILLed worker's job is
taken up at the next worker's first sweep, which sees that the holder's process
is gone (core/store/leases.py). Only the SIGSTOP drill, about a live holder
losing its lease, shortens the lease (PAUSE_TIMING): a paused process cannot be
told from a slow one, so its lease is waited out. Recovery never comes from a
shortened visibility timeout or LMQ_JOB_TIMEOUT_S. Each drill prints what it measured. Runs where the service
tests run (LMQ_TEST_REDIS_URL and LMQ_TEST_DATABASE_URL, always in CI).
"""

import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
from api_support import ApiServer, free_port
from service_support import PROMPTS, reference, write_prompts
from sqlalchemy.engine import make_url
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

from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions
from lmq.core.store.models import utcnow
from conftest import server_missing

PAUSE_TIMING = {"LMQ_LEASE_S": "3", "LMQ_HEARTBEAT_S": "0.5", "LMQ_SWEEP_S": "1"}
GENERATE = ("--max-length", "48", "--micro-batch-size", "2")


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[drill] {line}")


def sent_at(job_id):
    with session_scope(sessions(load_settings())) as session:
        return queries.get_job(session, job_id).enqueued_at


def assert_one_greedy_result_per_input(job_id, preset, prompts):
    summary = finished(job_id)
    assert summary and summary["status"] == "succeeded", summary
    assert summary["counts"] == {"total": len(prompts), "completed": len(prompts), "failed": 0}
    rows = item_rows(job_id)
    assert [row[0] for row in rows] == list(range(len(prompts)))
    assert all(row[2] is None for row in rows)
    expected = reference(preset, prompts, max_length=48)
    assert [row[1] for row in rows] == [e["output"] for e in expected]
    return summary


def taken_by(worker, job_id, logs, timeout=120):
    return wait_for(lambda: holder(job_id)["worker"] == worker.name, timeout, f"{worker.name} to take the job", logs)


def replaced(worker, stop, job_id, workers, **settings):
    """Stop `worker` (kill or pause it) and start another; returns it and the seconds until it holds the job."""
    stop()
    stopped_at = time.monotonic()
    new = workers(**settings)
    taken_by(new, job_id, [worker.log, new.log])
    return new, time.monotonic() - stopped_at


def test_sigkill_the_worker_five_times_during_one_generate_job(capsys, tmp_path, workers, tiny_llama_preset):
    seed = int(os.environ.get("LMQ_DRILL_SEED") or time.time())
    rng = random.Random(seed)
    source = write_prompts(tmp_path / "many.jsonl", MANY_PROMPTS)
    job_id = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, *GENERATE)
    # Where to kill: once this many results are in (0: while the model loads), within
    # the first 60% of the job, so that even a fast machine is still at it.
    kill_after = sorted(rng.sample(range(0, len(MANY_PROMPTS) * 6 // 10), 5))
    logs, recoveries, killed_at = [], [], None
    for target in kill_after:
        worker = workers()
        logs.append(worker.log)
        taken_by(worker, job_id, logs)
        if killed_at is not None:
            recoveries.append(time.monotonic() - killed_at)
        wait_for(lambda: holder(job_id)["completed"] >= target, 120, f"{target} results", logs)
        assert holder(job_id)["state"] == "running"
        worker.kill()
        killed_at = time.monotonic()
    last = workers()
    logs.append(last.log)
    taken_by(last, job_id, logs)
    recoveries.append(time.monotonic() - killed_at)
    wait_for(lambda: finished(job_id), 240, "the job", logs)

    summary = assert_one_greedy_result_per_input(job_id, tiny_llama_preset, MANY_PROMPTS)
    assert summary["attempts"] == 6
    running = [e for e in events(job_id, "state") if e["state"] == "running"]
    assert [e["attempt"] for e in running] == [1, 2, 3, 4, 5, 6]
    assert [e["attempt"] for e in events(job_id, "holder_exited")] == [1, 2, 3, 4, 5]  # not waited out
    report(
        capsys,
        f"SIGKILL x5 (seed {seed}, after {kill_after} results): job running again on the restarted worker "
        f"{', '.join(f'{r:.1f}s' for r in recoveries)} after each kill (worker start included)",
    )


def test_sigkill_the_worker_with_two_jobs_in_flight_on_one_engine(capsys, tmp_path, workers, tiny_llama_preset):
    """Two generate jobs on one worker share its model's engine; SIGKILL mid-way: another worker
    takes both up and each ends with exactly one greedy result per input, in input order."""
    reversed_prompts = MANY_PROMPTS[::-1]
    sources = [write_prompts(tmp_path / "a.jsonl", MANY_PROMPTS), write_prompts(tmp_path / "b.jsonl", reversed_prompts)]
    jobs = [submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, *GENERATE) for source in sources]
    worker = workers()
    logs = [worker.log]
    for job_id in jobs:
        taken_by(worker, job_id, logs)
    wait_for(lambda: all(holder(j)["completed"] >= 3 for j in jobs), 120, "both jobs' first results", logs)
    assert [holder(j)["state"] for j in jobs] == ["running", "running"]
    assert all(holder(j)["completed"] < len(MANY_PROMPTS) for j in jobs)
    worker.kill()
    last = workers()
    logs.append(last.log)
    for job_id in jobs:
        taken_by(last, job_id, logs)
    for job_id in jobs:
        wait_for(lambda: finished(job_id), 240, "the job", logs)

    for job_id, prompts in zip(jobs, (MANY_PROMPTS, reversed_prompts)):
        summary = assert_one_greedy_result_per_input(job_id, tiny_llama_preset, prompts)
        assert summary["attempts"] == 2
    report(capsys, "SIGKILL with two jobs in flight on one engine: both taken up, one result per input each")


def test_a_paused_worker_that_lost_its_lease_writes_nothing_when_it_wakes(capsys, tmp_path, workers, tiny_llama_preset):
    source = write_prompts(tmp_path / "many.jsonl", MANY_PROMPTS)
    first = workers(**PAUSE_TIMING)
    job_id = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, *GENERATE)
    wait_for(lambda: holder(job_id)["completed"] >= 4, 180, "some progress", [first.log])
    second, taken_after = replaced(first, first.pause, job_id, workers, **PAUSE_TIMING)
    wait_for(lambda: finished(job_id), 240, "the second worker to finish", [second.log])
    written, event_count = item_rows(job_id), len(events(job_id, "state")) + len(events(job_id, "model"))

    first.resume()
    wait_for(lambda: "no longer holds the lease" in first.log.read_text(), 60, "the first worker to stop", [first.log])
    assert item_rows(job_id) == written  # nothing duplicated, nothing overwritten
    assert len(events(job_id, "state")) + len(events(job_id, "model")) == event_count
    summary = assert_one_greedy_result_per_input(job_id, tiny_llama_preset, MANY_PROMPTS)
    assert summary["attempts"] == 2
    report(capsys, f"SIGSTOP: job taken over by a second worker {taken_after:.1f}s after the first was paused; "
                   "the first, resumed, found its lease gone and wrote nothing")


class RedisServer:
    """A Redis of the test's own on a free loopback port, keeping nothing on disk."""

    def __init__(self, directory):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process = None
        self.start()

    def start(self):
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                   "--dir", str(self.directory)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._answers, 20, "redis-server to start")

    def _answers(self):
        import redis

        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def kill(self):
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path, monkeypatch):
    if shutil.which("redis-server") is None:
        server_missing("redis-server is not installed")
    server = RedisServer(tmp_path)
    monkeypatch.setenv("LMQ_BROKER_URL", server.url)
    yield server
    server.kill()


def ready(server) -> int:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def test_redis_restarted_while_jobs_run_and_wait(capsys, tmp_path, workers, own_redis, service_env, tiny_llama_preset):
    # One job at a time (LMQ_WORKER_JOBS=1), so that two jobs wait as messages in the broker that the restart loses.
    worker = workers(LMQ_BROKER_URL=own_redis.url, LMQ_WORKER_JOBS="1")
    api = ApiServer({**service_env, "LMQ_BROKER_URL": own_redis.url}, tmp_path / "api.log")
    try:
        long = write_prompts(tmp_path / "long.jsonl", MANY_PROMPTS[:12])
        short = write_prompts(tmp_path / "short.jsonl", PROMPTS[:3])
        running = submit(capsys, "generate", "--preset", str(tiny_llama_preset), long, *GENERATE)
        queued = [submit(capsys, "generate", "--preset", str(tiny_llama_preset), short, *GENERATE) for _ in range(2)]
        wait_for(lambda: holder(running)["completed"] >= 2, 180, "the first job to run", [worker.log])
        assert [holder(job_id)["state"] for job_id in queued] == ["queued", "queued"]
        assert ready(api) == 200

        own_redis.kill()
        down_at = time.monotonic()
        wait_for(lambda: ready(api) == 503, 30, "/readyz to say 503", [api.log])
        unready_after = time.monotonic() - down_at
        time.sleep(1)
        own_redis.start()  # empty: the queued jobs' messages are gone
        up_at, restarted = time.monotonic(), utcnow()
        wait_for(lambda: ready(api) == 200, 30, "/readyz to recover", [api.log])
        ready_after = time.monotonic() - up_at
        # Each lost job is sent again by the sweep, unless Celery restored a message it had prefetched.
        wait_for(
            lambda: all(sent_at(j) > restarted or holder(j)["state"] != "queued" for j in queued),
            60, "the lost jobs to be sent again", [worker.log],
        )
        resent_after = time.monotonic() - up_at
        wait_for(lambda: all(finished(j) for j in [running, *queued]), 240, "every job", [worker.log])
        all_done_after = time.monotonic() - up_at
    finally:
        api.stop()
    assert_one_greedy_result_per_input(running, tiny_llama_preset, MANY_PROMPTS[:12])
    for job_id in queued:
        assert_one_greedy_result_per_input(job_id, tiny_llama_preset, PROMPTS[:3])
    report(capsys, f"Redis restart: /readyz 503 {unready_after:.1f}s after Redis died, 200 {ready_after:.1f}s after "
                   f"it came back; the two lost queued jobs sent again {resent_after:.1f}s after the restart; "
                   f"all three jobs (one running, two queued) done {all_done_after:.1f}s after it")


def test_a_fit_job_killed_mid_epoch_resumes_and_registers_one_preset(capsys, tmp_path, workers, tiny_llama_preset):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 4))
    first = workers()
    fit_id = submit(
        capsys, "fit", "--preset", str(tiny_llama_preset), str(train), "--output-preset", "drill-tuned",
        "--epochs", "3", "--batch-size", "3", "--sequence-length", "24",
    )  # 8 steps an epoch, 24 in all
    wait_for(lambda: holder(fit_id)["completed"] >= 10, 180, "the second epoch", [first.log])
    second, recovery = replaced(first, first.kill, fit_id, workers)
    summary = wait_for(lambda: finished(fit_id), 240, "the fit job", [first.log, second.log])

    assert summary["status"] == "succeeded", summary
    assert summary["counts"] == {"total": 24, "completed": 24, "failed": 0}
    (resumed,) = events(fit_id, "resumed")
    assert 1 <= resumed["epochs_done"] <= 2
    assert [e["step"] for e in events(fit_id, "step")] == list(range(1, 25))
    assert [e["epoch"] for e in events(fit_id, "epoch")] == [1, 2, 3]
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        tuned = [p for p in queries.list_presets(session) if p.job_id == fit_id]
    assert [p.name for p in tuned] == ["drill-tuned"]
    assert sorted(path.name for path in settings.preset_store.iterdir()) == ["drill-tuned"]
    assert not (settings.home / "checkpoints" / fit_id).exists()
    report(capsys, f"fit killed mid-epoch: running again {recovery:.1f}s after SIGKILL, resumed after "
                   f"{resumed['epochs_done']} epoch(s), one preset registered")


class CuttableProxy:
    """A loopback TCP proxy that can cut every connection and refuse new ones, as a database restart does."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self):
        self.open = False
        for end in self.sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets = []

    def restore(self):
        self.open = True

    def close(self):
        self.cut()
        self.listener.close()


def test_the_database_going_away_mid_job(capsys, tmp_path, workers, service_env, tiny_llama_preset):
    url = make_url(service_env["LMQ_DATABASE_URL"])
    proxy = CuttableProxy(url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    worker = workers(LMQ_DATABASE_URL=proxied)  # default lease: the worker must ride the outage out
    api = ApiServer({**service_env, "LMQ_DATABASE_URL": proxied}, tmp_path / "api.log")
    try:
        # every prompt: long enough a job (seconds) that the outage falls in its middle
        source = write_prompts(tmp_path / "many.jsonl", MANY_PROMPTS)
        job_id = submit(capsys, "generate", "--preset", str(tiny_llama_preset), source, *GENERATE)
        wait_for(lambda: holder(job_id)["completed"] >= 4, 180, "some progress", [worker.log])
        assert ready(api) == 200
        proxy.cut()
        wait_for(lambda: ready(api) == 503, 30, "/readyz to say 503", [api.log])
        time.sleep(4)
        proxy.restore()
        back_at = time.monotonic()
        wait_for(lambda: ready(api) == 200, 30, "/readyz to recover", [api.log])
        ready_after = time.monotonic() - back_at
        wait_for(lambda: finished(job_id), 240, "the job", [worker.log])
    finally:
        api.stop()
        proxy.close()
    summary = assert_one_greedy_result_per_input(job_id, tiny_llama_preset, MANY_PROMPTS)
    assert summary["attempts"] == 1  # the worker kept its job: it retried, it was not replaced
    assert "database unavailable" in worker.log.read_text()
    report(capsys, f"database cut for 4s+: the worker retried and finished its job in one attempt; "
                   f"/readyz 503 during the cut, 200 again {ready_after:.1f}s after the database came back")
