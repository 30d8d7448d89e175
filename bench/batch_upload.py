"""The Batch API's memory on a large input file: the API process's peak RSS while it takes a
50,000-line JSONL upload (POST /v1/files) and validates it into a batch's job (POST /v1/batches).

    python bench/batch_upload.py                 # 50,000 lines of ~600-character prompts (~33 MB)
    python bench/batch_upload.py --lines 100000 --broker redis://127.0.0.1:6379/3

It starts `lmq serve` on an embedded SQLite home with a broker configured but no worker,
so the job waits on the broker and the API process does nothing but upload and validate
(on its own it would run the job itself and load torch). The official `openai` client
uploads and creates the batch; the server's peak RSS is its /proc VmHWM. The reference is
what holding the file would cost: the same lines parsed into a list in a fresh Python,
and the file's size. The server streams the upload to disk and validates a line at a
time, so its peak stays flat however large the file is.

Measured (2026-12-01, the shared 2-core machine, SQLite, Redis as the broker):
  50,000 lines, 34.6 MiB: peak RSS 86.7 MiB idle -> 103.0 MiB after upload and validation
    (+16.3 MiB; upload 0.6 s, validation 4.6 s); the lines parsed into a list cost 86.3 MiB
  100,000 lines, 69.3 MiB: 86.8 -> 107.3 MiB (+20.6 MiB); parsed into a list, 172.5 MiB
  (what grows with the file is the set of custom_ids seen, which must be unique)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from api_support import ApiServer  # noqa: E402

MODEL = "stdlib-tiny"
WORDS = "Return a copy of the string with leading and trailing whitespace removed and the rest kept".split()


def write_input(path: Path, lines: int, prompt_chars: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(prompt_chars // 6))[:prompt_chars]
            body = {"model": MODEL, "prompt": f"{i}: {prompt}", "max_tokens": 16, "temperature": 0}
            out.write(
                json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n"
            )


def memory_kb(pid: int, field: str) -> int:
    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        if entry.startswith(field + ":"):
            return int(entry.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def parsed_in_memory_kb(path: Path) -> int:
    """The peak RSS of a fresh Python that reads the file into a list of parsed lines."""
    script = (
        "import json, sys\n"
        "lines = [json.loads(line) for line in open(sys.argv[1])]\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    )
    baseline = subprocess.run(
        [sys.executable, "-c", "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    return int(loaded.stdout) - int(baseline.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--prompt-chars", type=int, default=600)
    parser.add_argument(
        "--broker",
        default=os.environ.get("LMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="a Redis the job is queued on (no worker takes it)",
    )
    args = parser.parse_args()

    import openai

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = root / "input.jsonl"
        write_input(source, args.lines, args.prompt_chars)
        env = {"LMQ_HOME": str(root / "home"), "LMQ_BROKER_URL": args.broker, "LMQ_API_TOKENS": "tok:bench"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmq.api.cli",
                "presets",
                "import",
                str(REPO / "demo" / "stdlib-tiny-llama"),
                "--name",
                MODEL,
                "--tenant",
                "bench",
            ],
            cwd=REPO,
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        server = ApiServer(env, root / "server.log")
        try:
            pid = server.process.pid
            idle_kb = memory_kb(pid, "VmHWM")
            api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="tok", max_retries=0, timeout=600)
            started = time.perf_counter()
            with source.open("rb") as handle:
                uploaded = api.files.create(file=(source.name, handle), purpose="batch")
            uploaded_s = time.perf_counter() - started
            after_upload_kb = memory_kb(pid, "VmHWM")
            batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
            while (batch := api.batches.retrieve(batch.id)).status == "validating":
                time.sleep(0.2)
            validated_s = time.perf_counter() - started - uploaded_s
            peak_kb = memory_kb(pid, "VmHWM")
            counts = batch.request_counts
            assert batch.status == "in_progress" and counts.total == args.lines and counts.failed == 0, batch
        finally:
            server.stop()
        held_kb = parsed_in_memory_kb(source)
        size_mb = source.stat().st_size / 2**20

    print(f"input: {args.lines} lines, {size_mb:.1f} MiB")
    print(
        f"lmq serve peak RSS: {idle_kb / 1024:.1f} MiB after start, {after_upload_kb / 1024:.1f} MiB after the "
        f"upload ({uploaded_s:.1f} s), {peak_kb / 1024:.1f} MiB after validation ({validated_s:.1f} s, "
        f"{counts.total} requests in the job)"
    )
    print(
        f"growth over the idle server: {(peak_kb - idle_kb) / 1024:.1f} MiB; the file parsed into a list "
        f"costs {held_kb / 1024:.1f} MiB ({held_kb / max(peak_kb - idle_kb, 1):.1f}x the server's growth)"
    )


if __name__ == "__main__":
    main()
