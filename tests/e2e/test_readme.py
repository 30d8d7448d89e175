"""README.md's walkthrough, run as a new user runs it: its command blocks are read from README.md itself.

The blocks of the walkthrough's sections (WALKTHROUGH) run in README's order, bash blocks in bash and
python blocks in python, in a fresh directory holding a link to the repository's demo/, with HOME a
fresh directory (so `~/.lmq` is the default LMQ_HOME) and no LMQ_* variable set. Where a command must
differ from README's text, the test says so here:

- README's first command installs lmq into a new virtual environment; the test already runs inside
  one, so it runs only that command's part after the last `pip install` (the `lmq generate` demo),
  and checks that the install names an extra holding the PostgreSQL driver. The second command runs
  the test suite itself: it is not run, but checked to be the command .ci/run runs.
- A block of long-running commands (`lmq serve`, `lmq worker`) starts in the background, as in a
  terminal of its own; the next block waits until the API answers. `export` lines stay in effect for
  the later blocks, as README asks ("export these two in each terminal").
- README's port 8000 becomes a free port.
- Against the embedded default, the Redis/PostgreSQL block and the worker's are skipped, as README
  says. With LMQ_TEST_REDIS_URL and LMQ_TEST_DATABASE_URL (CI sets both) the walkthrough runs a second
  time with README's broker and database URLs replaced by a PostgreSQL database of its own
  (`lmq_readme_...`, made afresh, so README's `lmq db upgrade` migrates it from nothing) and a Redis
  database of its own (LMQ_TEST_REDIS_URL's number + 8, mod 16, so no other test's worker takes its jobs).

Sections outside WALKTHROUGH are not run: the benchmarks take minutes of CPU, and installing a plugin
package would change the test's own environment.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from database_support import fresh_database
from conftest import server_missing

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
WALKTHROUGH = ("lmq", "Fine-tuning", "The model library", "The service")
LONG_RUNNING = re.compile(r"^(\w+=\S+ +)*lmq (serve|worker)\b")
README_BROKER = "redis://127.0.0.1:6379/0"
README_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/lmq"
README_PORT = "8000"
BLOCK_TIMEOUT_S = 180
MARKER = "@@lmq-readme-command"


# ---------------------------------------------------------------- reading README


def sections() -> dict[str, list[tuple[str, str]]]:
    """{heading: [(language, code), ...]} for README's `#` and `##` sections, in order."""
    found, heading, fence = {}, None, None
    for line in README.read_text().splitlines(keepends=True):
        if fence is not None:
            if line.startswith("```"):
                found[heading].append(fence)
                fence = None
            else:
                fence = (fence[0], fence[1] + line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), "")
        elif re.match(r"#{1,2} ", line):
            heading = line.lstrip("#").strip()
            found[heading] = []
    return found


def walkthrough_blocks() -> list[tuple[str, str]]:
    found = sections()
    missing = [title for title in WALKTHROUGH if title not in found]
    assert not missing, f"README has no section {missing}: update WALKTHROUGH in this test"
    return [block for title in WALKTHROUGH for block in found[title]]


def commands(code: str) -> list[str]:
    """A bash block's commands: lines joined until they parse (continuations, quotes over lines)."""
    found, pending = [], ""
    for line in code.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if not line.endswith("\\") and parses(pending):
            found.append(pending.strip())
            pending = ""
    assert not pending, f"README command does not parse in bash: {pending}"
    return found


def parses(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0


def install_command(command: str) -> str:
    """README's install line, checked; what of it the test runs: the part after the last `pip install`."""
    steps = [step.strip() for step in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv", command
    installs = [i for i, step in enumerate(steps) if step.startswith("pip install")]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = [
        requirement
        for step in steps
        for extra in re.findall(r'-e "\.\[([\w,]+)\]"', step)
        for name in extra.split(",")
        for requirement in extras[name]
    ]
    assert any(r.startswith("psycopg") for r in installed), f"README's install has no PostgreSQL driver: {command}"
    return " && ".join(steps[installs[-1] + 1 :])


def check_test_command(command: str) -> None:
    """README's test command is what .ci/run runs: the same variables, the same pytest call."""
    words = shlex.split(command.split("&&")[-1])
    variables = dict(word.split("=", 1) for word in words if re.match(r"\w+=", word))
    pytest_call = " ".join(word for word in words if not re.match(r"\w+=", word))
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    exported = dict(
        word.split("=", 1) for line in ci if line.startswith("export ") for word in shlex.split(line)[1:]
    )
    assert {name: value for name, value in exported.items() if name.startswith("LMQ_TEST_")} == variables
    assert [line for line in ci if line and not line.startswith("#")][-1] == pytest_call


# ---------------------------------------------------------------- running it


class Walkthrough:
    """README's blocks, run in order in one directory; long-running ones in the background."""

    def __init__(self, root: Path, services: dict | None):
        self.cwd = root / "checkout"
        self.cwd.mkdir()
        (self.cwd / "demo").symlink_to(REPO / "demo")
        home = root / "home"
        home.mkdir()
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("LMQ_")}
        self.env["HOME"] = str(home)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.services = services
        if services:
            text = README.read_text()
            assert README_BROKER in text and README_DATABASE in text, "README's URLs changed: update this test"
        self.port = str(free_port())
        self.background: list[tuple[subprocess.Popen, Path]] = []
        self.outputs: list[tuple[str, str]] = []  # (command, its stdout)

    def substitute(self, code: str) -> str:
        code = code.replace(README_PORT, self.port)
        if self.services:
            code = code.replace(README_BROKER, self.services["broker"])
            code = code.replace(README_DATABASE, self.services["database"])
        return code

    def run_block(self, language: str, code: str) -> None:
        if language == "python":
            self.wait_for_background()
            self.outputs.append((code, self.run(["python", "-"], self.substitute(code))))
            return
        assert language == "bash", f"README block in {language!r}: run it here or leave it out of WALKTHROUGH"
        lines = commands(code)
        if "python3 -m venv" in lines[0]:
            check_test_command(lines[1])
            lines = [install_command(lines[0])]
        needs_services = any(line.startswith("export LMQ_BROKER_URL") or "lmq worker" in line for line in lines)
        if needs_services and not self.services:
            return  # README: "for the embedded default, skip the next two blocks"
        for line in lines:
            if line.startswith("export "):
                self.env.update(word.split("=", 1) for word in shlex.split(self.substitute(line))[1:])
        if all(LONG_RUNNING.match(line) for line in lines):
            for line in lines:
                self.start(self.substitute(line))
            return
        assert not any(LONG_RUNNING.match(line) for line in lines), f"long-running and other commands mixed: {code}"
        self.wait_for_background()
        script = "set -euo pipefail\n" + "".join(f"echo {MARKER}\n{self.substitute(line)}\n" for line in lines)
        stdout = self.run(["bash", "-c", script])
        self.outputs += zip(lines, stdout.split(f"{MARKER}\n")[1:], strict=True)

    def run(self, argv: list[str], stdin: str = "") -> str:
        process = subprocess.Popen(
            argv, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(stdin, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop(process)
            stdout, stderr = process.communicate()
            pytest.fail(f"README block ran over {BLOCK_TIMEOUT_S}s:\n{argv[-1]}\n{stderr}\n{self.logs()}")
        assert process.returncode == 0, (
            f"README block failed:\n{argv[-1]}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n{self.logs()}"
        )
        return stdout

    def start(self, command: str) -> None:
        log = self.cwd.parent / f"background-{len(self.background)}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                ["bash", "-c", command], cwd=self.cwd, env=self.env, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.background.append((process, log))

    def wait_for_background(self, timeout_s: float = 120) -> None:
        """Every background process still runs, and a started API answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [log for process, log in self.background if process.poll() is not None]
            assert not dead, f"a background command of README exited:\n{self.logs()}"
            if not any("lmq serve" in " ".join(process.args) for process, _ in self.background):
                return
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"`lmq serve` did not answer:\n{self.logs()}"
                time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {' '.join(p.args)}\n{log.read_text()[-4000:]}" for p, log in self.background)

    def stop(self) -> None:
        for process, _ in self.background:
            stop(process)

    def output_of(self, start: str) -> str:
        """The stdout of the first README command that starts with `start` (after substitution)."""
        for command, stdout in self.outputs:
            if command.startswith(start):
                return stdout
        raise AssertionError(f"README runs no command starting {start!r}: {[c for c, _ in self.outputs]}")


def stop(process: subprocess.Popen) -> None:
    """The process and its children (it leads a session of its own): TERM, then KILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- the services of their own


@pytest.fixture
def own_services():
    """A fresh PostgreSQL database and an emptied Redis database on the test servers, for this test only."""
    from redis import Redis

    database, broker = os.environ.get("LMQ_TEST_DATABASE_URL"), os.environ.get("LMQ_TEST_REDIS_URL")
    if not (database and broker):
        server_missing("LMQ_TEST_DATABASE_URL and LMQ_TEST_REDIS_URL are not set (CI sets both)")
    redis_db = (Redis.from_url(broker).connection_pool.connection_kwargs.get("db", 0) + 8) % 16
    own_broker = re.sub(r"(/\d+)?$", f"/{redis_db}", broker, count=1)
    Redis.from_url(own_broker).flushdb()
    with fresh_database(database, prefix="lmq_readme") as own_database:
        yield {"database": own_database, "broker": own_broker}
    Redis.from_url(own_broker).flushdb()


# ---------------------------------------------------------------- the tests


def walk(tmp_path, services) -> Walkthrough:
    walkthrough = Walkthrough(tmp_path, services)
    try:
        for language, code in walkthrough_blocks():
            walkthrough.run_block(language, code)
    finally:
        walkthrough.stop()
    return walkthrough


def check_walkthrough(walkthrough: Walkthrough, broker_detail: str) -> None:
    cwd = walkthrough.cwd
    prompts = [json.loads(line) for line in (REPO / "demo/prompts.jsonl").read_text().splitlines()]

    # The demo, my-model and the job submitted to the API: text for every prompt, in input order.
    for name in ("results.jsonl", "results-my-model.jsonl", "results-api.jsonl"):
        results = json_lines((cwd / name).read_text())
        assert [r["custom_id"] for r in results] == [p["custom_id"] for p in prompts], name
        for prompt, result in zip(prompts, results):
            assert result["error"] is None and result["output"].startswith(prompt["prompt"]), result
            assert result["completion_tokens"] > 0, result
    # Through the API and the worker, my-model writes what `lmq generate` wrote here.
    served = json_lines((cwd / "results-api.jsonl").read_text())
    assert served == json_lines((cwd / "results-my-model.jsonl").read_text())
    assert json_lines(walkthrough.outputs[0][1]) == json_lines((cwd / "results.jsonl").read_text())

    # Fine-tuning registered my-model; the CLI's three jobs succeeded.
    assert "my-model" in [p["name"] for p in json_lines(walkthrough.output_of("lmq presets list"))]
    jobs = json_lines(walkthrough.output_of("lmq jobs list"))
    assert sorted(job["kind"] for job in jobs) == ["fit", "generate", "generate"]
    assert {job["status"] for job in jobs} == {"succeeded"}

    # The library block saved a preset.
    assert (cwd / "my_preset" / "config.json").is_file() and (cwd / "my_preset" / "model.weights.h5").is_file()

    # The service: ready (with or without a broker), the curl job's result, the submitted job, tenants.
    readiness = json.loads(walkthrough.output_of("curl -s 127.0.0.1:8000/readyz"))
    assert readiness["ready"] is True and broker_detail in readiness["broker"]["detail"], readiness
    watched = json_lines(walkthrough.output_of("lmq jobs watch"))[-1]
    assert watched["status"] == "succeeded" and watched["tenant"] == "team-a", watched
    [result] = json_lines(walkthrough.output_of("curl -s 127.0.0.1:8000/v1/jobs/$JOB/results"))
    assert result["custom_id"] == "q1" and result["error"] is None, result
    assert result["output"].startswith("Return the") and len(result["output"]) > len("Return the"), result
    submitted = json_lines(walkthrough.output_of("lmq submit generate --preset my-model"))[-1]
    assert submitted["status"] == "succeeded" and submitted["preset"] == "my-model", submitted
    assert submitted["counts"] == {"total": len(prompts), "completed": len(prompts), "failed": 0}, submitted
    assert json_lines(walkthrough.output_of("lmq jobs list --server")) == []

    # The Batch API through the openai client: my-model's greedy completions, as the submitted job's.
    answers = json_lines(walkthrough.output_of("import json, time"))
    assert [a["custom_id"] for a in answers] == [p["custom_id"] for p in prompts]
    for prompt, answer, result in zip(prompts, answers, served):
        assert answer["text"] and prompt["prompt"] + answer["text"] == result["output"], (answer, result)


def test_readme_walkthrough_on_the_embedded_default(tmp_path):
    walkthrough = walk(tmp_path, services=None)
    check_walkthrough(walkthrough, broker_detail="no broker")


def test_readme_walkthrough_on_redis_and_postgresql(tmp_path, own_services):
    walkthrough = walk(tmp_path, services=own_services)
    check_walkthrough(walkthrough, broker_detail="broker reachable")
    [imported] = json_lines(walkthrough.output_of("lmq presets import"))
    assert imported["name"] == "my-model" and imported["path"] == str(tmp_path / "home/.lmq/presets/my-model")


def test_a_missing_database_driver_is_one_line(tmp_path):
    """README's PostgreSQL URL without psycopg installed: one line naming the package and the extra."""
    blocked = "import sys; sys.modules['psycopg'] = None; from lmq.api.cli import main; raise SystemExit(main())"
    env = {**os.environ, "HOME": str(tmp_path), "LMQ_DATABASE_URL": README_DATABASE}
    run = subprocess.run([sys.executable, "-c", blocked, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "psycopg" in run.stderr and "[postgres]" in run.stderr, run.stderr
