"""What the API tests share: a real `lmq serve` subprocess on a loopback port."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmq.core.names import TERMINAL_STATES

from lmq.core.chat_templates import read_builtin_template

REPO = Path(__file__).resolve().parent.parent
TOKENS = "tok-a:team-a,tok-b:team-b"
TEAM_A = {"Authorization": "Bearer tok-a"}
TEAM_B = {"Authorization": "Bearer tok-b"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ApiServer:
    """`lmq serve` on 127.0.0.1; `started_seconds` is how long until /healthz first answered."""

    def __init__(self, env: dict, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmq.api.cli", "serve", "--port", str(self.port), "--log-level", "warning", *extra],
            cwd=REPO,
            # Offline hubs: nothing a test submits may make the server reach past loopback.
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self._wait_until_healthy(timeout=90)
        self.started_seconds = time.monotonic() - started

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log.read_text()[-3000:]
                raise AssertionError(f"lmq serve exited with {self.process.returncode}:\n{log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"lmq serve did not answer in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def client(self, headers: dict | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=30)

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def generate_body(preset, prompts, **params) -> dict:
    return {
        "kind": "generate",
        "preset": str(preset),
        "inputs": [{"custom_id": f"q{i}", "prompt": prompt} for i, prompt in enumerate(prompts)],
        "params": params,
    }


def wait_for_job(client: httpx.Client, job_id: str, timeout: float, logs=()) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL_STATES:
            return job
        time.sleep(0.1)
    tails = "\n".join(Path(log).read_text()[-3000:] for log in logs if Path(log).exists())
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}\n{tails}")


def watched_client(server, headers) -> httpx.Client:
    """A client that appends every answer's status to `server.statuses`, for a module that checks it saw no 5xx."""
    return httpx.Client(
        base_url=server.url, headers=headers, timeout=30,
        event_hooks={"response": [lambda response: server.statuses.append(response.status_code)]},
    )


def settled_batch(client: httpx.Client, batch_id: str) -> dict:
    """The batch once its validation has ended (10 s at most)."""
    for _ in range(100):
        shown = client.get(f"/v1/batches/{batch_id}").json()
        if shown["status"] != "validating":
            return shown
        time.sleep(0.1)
    return shown


def two_tenant_server(root: Path, postgres_url: str) -> ApiServer:
    """`lmq serve` for TEAM_A and TEAM_B on PostgreSQL and an emptied Redis, no worker: what the
    hostile suites probe. It records every answer's status a `watched_client` sees (`statuses`)."""
    import redis
    from conftest import _service_urls

    from lmq.core.config import load_settings

    _, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    home = root / "home"
    env = {"LMQ_HOME": str(home), "LMQ_DATABASE_URL": postgres_url, "LMQ_BROKER_URL": broker, "LMQ_API_TOKENS": TOKENS}
    server = ApiServer(env, root / "server.log")
    server.home, server.settings, server.statuses = home, load_settings(env), []
    return server


def import_preset(env, directory, name, tenant):
    subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "presets", "import", str(directory), "--name", name, "--tenant", tenant],
        cwd=REPO,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )


def chat_preset(tiny_llama_preset, root):
    """The tiny Llama with a chat template (Llama 2's, whose turn ends with the end token)."""
    directory = root / "tiny-chat"
    shutil.copytree(tiny_llama_preset, directory)
    (directory / "chat_template.jinja").write_text(read_builtin_template("llama2_chat"))
    return directory
