"""What `lmq generate`, `lmq fit` and `lmq jobs watch` show while a job runs: on a
terminal (a pseudo-terminal here, 120 columns) a live bar with the count, the
rate, the time left and, for fit, the loss; in a pipe, plain lines."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from api_support import REPO
from service_support import PROMPTS, write_prompts

from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def start_on_a_terminal(argv, stdout):
    """`lmq argv...` with stderr on a pseudo-terminal; returns (process, the terminal's reading end)."""
    reader, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "lmq.api.cli", *argv], cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout, stderr=terminal
    )
    os.close(terminal)
    return process, reader


def read_terminal(process, reader, timeout=300) -> str:
    """Everything the process wrote to the terminal, until it exits."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([reader], [], [], 1)
        if ready:
            try:
                data = os.read(reader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    else:
        process.kill()
        raise AssertionError("the command did not finish: " + b"".join(chunks).decode(errors="replace")[-2000:])
    os.close(reader)
    process.wait(30)
    return b"".join(chunks).decode(errors="replace")


def when_done(process, reader) -> tuple[str, list[str]]:
    """(everything written to the terminal, the screen it left) once the command succeeded."""
    written = read_terminal(process, reader)
    assert process.returncode == 0, written
    shown = screen(written)
    print("the screen:\n" + "\n".join(shown))
    return written, shown


def screen(written: str) -> list[str]:
    """The lines left on the screen: each line as its last carriage return left it."""
    lines = []
    for line in ANSI.sub("", written).replace("\r\n", "\n").split("\n"):
        shown = line.split("\r")[-1].rstrip()
        if shown:
            lines.append(shown)
    return lines


def bar_frames(written: str, label: str) -> list[str]:
    """Every state of the bar that was drawn (tqdm redraws it after a carriage return)."""
    return [frame.strip() for frame in re.split(r"[\r\n]", ANSI.sub("", written)) if frame.strip().startswith(label)]


def test_generate_on_a_terminal_draws_a_live_bar(lmq_home, tiny_llama_preset, tmp_path):
    source, output = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    argv = ["generate", "--preset", str(tiny_llama_preset), source, "-o", str(output), "--max-length", "40",
            "--micro-batch-size", "2"]
    written, shown = when_done(*start_on_a_terminal(argv, subprocess.DEVNULL))
    bar = re.compile(r"^generate [0-9a-f]{8}: 100%\|█+\| 6/6 \[\d\d:\d\d<00:00, +[\d.]+(prompt/s|s/prompt)\]$")
    assert any(bar.match(line) for line in shown), shown
    assert shown[-1].startswith("lmq: job ") and "6 completed, 0 failed of 6" in shown[-1]
    # Redrawn as the micro-batches of two finished, not printed once at the end.
    drawn = [re.search(r"\| (\d)/6 \[", frame) for frame in bar_frames(written, "generate ")]
    counts = {match.group(1) for match in drawn if match}
    assert {"2", "4", "6"} <= counts, counts
    assert len(output.read_text().splitlines()) == len(PROMPTS)


def test_fit_on_a_terminal_shows_steps_and_the_loss(lmq_home, tiny_llama_preset, tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(f'{{"text": "{prompt}"}}\n' for prompt in PROMPTS))
    argv = ["fit", "--preset", str(tiny_llama_preset), str(source), "--output-preset", "progress-tuned",
            "--epochs", "2", "--batch-size", "3", "--sequence-length", "24", "--learning-rate", "0.01"]
    written, shown = when_done(*start_on_a_terminal(argv, subprocess.DEVNULL))
    bar = re.compile(r"^fit [0-9a-f]{8}: 100%\|█+\| 4/4 \[\d\d:\d\d<00:00, +[\d.]+(step/s|s/step), loss=\d+\.\d{4}\]$")
    assert any(bar.match(line) for line in shown), shown
    assert "preset 'progress-tuned' registered" in shown[-1]
    losses = [re.search(r"loss=(\d+\.\d+)", frame) for frame in bar_frames(written, "fit ")]
    assert len({match.group(1) for match in losses if match}) >= 2, "the loss is redrawn step by step"


def test_without_a_terminal_progress_is_plain_lines(lmq_home, tiny_llama_preset, tmp_path):
    source, output = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "lmq.api.cli", "generate", "--preset", str(tiny_llama_preset), source, "-o", str(output),
         "--max-length", "40"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    print("stderr:\n" + done.stderr)
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    assert re.fullmatch(r"lmq: generate [0-9a-f]{8}: 0/6 prompts", lines[0]), lines
    assert re.fullmatch(r"lmq: generate [0-9a-f]{8}: 6/6 prompts, [\d.]+ prompts/s", lines[-2]), lines
    assert lines[-1].startswith("lmq: job ") and lines[-1].endswith("6 completed, 0 failed of 6")


def test_jobs_watch_on_a_terminal_follows_a_job_another_process_runs(lmq_home, tiny_llama_preset, tmp_path):
    from lmq.workers.runner import JobRunner, pool_from_settings

    settings = load_settings()
    many = [f"{prompt} {i}" for i in range(4) for prompt in PROMPTS]
    with session_scope(sessions(settings)) as session:
        job_id = queries.create_generate_job(
            session,
            preset=str(tiny_llama_preset),
            inputs=[{"prompt": prompt} for prompt in many],
            params={"max_length": 40, "micro_batch_size": 2},
        ).id
    with (tmp_path / "summary.json").open("w") as summary:
        process, reader = start_on_a_terminal(["jobs", "watch", job_id], summary)
        assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
        _, shown = when_done(process, reader)
    total = len(many)
    bar = re.compile(rf"^job {job_id[:8]}: 100%\|█+\| {total}/{total} \[.*(prompt/s|s/prompt), status=succeeded\]$")
    assert any(bar.match(line) for line in shown), shown
    assert '"status": "succeeded"' in (tmp_path / "summary.json").read_text()
