"""What the tests of real `lmq worker` processes share: starting, killing and
pausing them, and reading the job they work on from the store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_support import PROMPTS

from lmq.api.cli import main
from lmq.api.schemas import result_line
from lmq.core.domain.jobs import job_summary
from lmq.core.config import load_settings
from lmq.core.store import leases, queries, session_scope, sessions
from conftest import server_missing

REPO = Path(__file__).resolve().parent.parent
MANY_PROMPTS = [f"{prompt} number {i}" for i in range(8) for prompt in PROMPTS[:5]]


class Worker:
    """A real `lmq worker` subprocess; stopped (or killed) at the end of the test."""

    def __init__(self, env, log: Path, *extra):
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmq.api.cli", "worker", "--loglevel", "INFO", *extra],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    @property
    def name(self) -> str:
        """As the job records name the worker."""
        return leases.holder_name(self.process.pid)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def pause(self):
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def stop(self):
        if self.process.poll() is None:
            self.resume()  # a paused worker would not act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


LMQ_QUEUES = ("lmq.generate", "lmq.fit", "lmq.generate.tiny")


@pytest.fixture
def broker(request, service_env, monkeypatch):
    """Redis; or, for tests parametrized with "amqp", RabbitMQ at LMQ_TEST_AMQP_URL (CI sets it)."""
    if getattr(request, "param", "redis") == "redis":
        return service_env["LMQ_BROKER_URL"]
    url = os.environ.get("LMQ_TEST_AMQP_URL") or server_missing("LMQ_TEST_AMQP_URL is not set (CI sets it)")
    from kombu import Connection

    with Connection(url) as connection:  # messages left by an earlier run name jobs of another database
        for queue in LMQ_QUEUES:
            try:
                connection.channel().queue_purge(queue)
            except connection.channel_errors:
                pass  # not declared yet
    monkeypatch.setenv("LMQ_BROKER_URL", url)
    return url


@pytest.fixture
def workers(service_env, broker, tmp_path):
    started = []

    def start(*extra, **env):
        worker = Worker({**service_env, "LMQ_BROKER_URL": broker, **env}, tmp_path / f"worker-{len(started)}.log", *extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(condition, timeout, what, workers_logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    logs = "\n".join(path.read_text()[-3000:] for path in workers_logs if path.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def job(job_id):
    with session_scope(sessions(load_settings())) as session:
        return job_summary(queries.get_job(session, job_id))


def results(job_id):
    with session_scope(sessions(load_settings())) as session:
        return [result_line(item) for item in queries.job_items(session, job_id)]


def holder(job_id) -> dict:
    with session_scope(sessions(load_settings())) as session:
        job = queries.get_job(session, job_id)
        return {"worker": job.worker, "attempts": job.attempts, "completed": job.completed, "state": job.state}


def item_rows(job_id) -> list[tuple]:
    """Every result as stored, with the moment it was written: an overwrite would change it."""
    with session_scope(sessions(load_settings())) as session:
        return [(i.index, i.output, i.error, i.finished_at) for i in queries.job_items(session, job_id)]


def events(job_id, type):
    with session_scope(sessions(load_settings())) as session:
        return [e.data for e in queries.job_events(session, job_id) if e.type == type]


def submit(capsys, kind, *argv):
    assert main(["submit", kind, *argv]) == 0
    return json.loads(capsys.readouterr().out)["id"]


def finished(job_id):
    summary = job(job_id)
    return summary if summary["status"] in ("succeeded", "failed", "cancelled") else None
