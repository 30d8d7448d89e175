"""The OpenAI Batch API, driven by the official `openai` package against a real `lmq serve`:
on the embedded default (SQLite, the server runs the job itself), and with a real worker on
Redis + PostgreSQL. What comes out equals `CausalLM.generate` on the same preset with the
same settings."""

import json
import os
import shutil
import subprocess
import sys
import time

import openai
import pytest
from api_support import REPO, TOKENS, ApiServer
from conftest import _service_urls
from service_support import PROMPTS
from worker_support import Worker

from core.chat_templates import read_builtin_template

MODEL = "tiny"  # the tiny Llama, imported into the store as team-a's
CHAT_MODEL = "tiny-chat"  # the same weights with Llama 2's chat template
TERMINAL = ("completed", "failed", "cancelled", "expired")
MAX_FILE_BYTES = 4 * 2**20


def import_preset(env, directory, name, tenant):
    subprocess.run(
        [sys.executable, "-m", "api.cli", "presets", "import", str(directory), "--name", name, "--tenant", tenant],
        cwd=REPO, env={**os.environ, **env}, check=True, capture_output=True,
    )


def chat_preset(tiny_llama_preset, root):
    """The tiny Llama with a chat template (Llama 2's, whose turn ends with the end token)."""
    directory = root / "tiny-chat"
    shutil.copytree(tiny_llama_preset, directory)
    (directory / "chat_template.jinja").write_text(read_builtin_template("llama2_chat"))
    return directory


@pytest.fixture(scope="module", params=["embedded", "service"])
def server(request, tmp_path_factory, tiny_llama_preset):
    """`lmq serve` with two tenants: on its own (SQLite, no broker), or beside a real worker on
    Redis + PostgreSQL. Team A has the models; team B has none of its own."""
    root = tmp_path_factory.mktemp(f"openai-{request.param}")
    env = {"LMQ_HOME": str(root / "home"), "LMQ_MAX_FILE_BYTES": str(MAX_FILE_BYTES)}
    worker = None
    if request.param == "service":
        import redis

        _, broker = _service_urls()
        database = request.getfixturevalue("postgres_url")
        redis.Redis.from_url(broker).flushdb()
        env.update(LMQ_DATABASE_URL=database, LMQ_BROKER_URL=broker)
    for name, directory in ((MODEL, tiny_llama_preset), (CHAT_MODEL, chat_preset(tiny_llama_preset, root))):
        import_preset(env, directory, name, "team-a")
    if request.param == "service":
        worker = Worker(env, root / "worker.log")
    api = ApiServer({**env, "LMQ_API_TOKENS": TOKENS}, root / "server.log")
    api.logs = [root / "server.log", root / "worker.log"]
    yield api
    api.stop()
    if worker is not None:
        worker.stop()


def client(server, token="tok-a"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0)


def line(custom_id, body, url="/v1/completions"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(api, lines, name="batch.jsonl"):
    content = "".join((entry if isinstance(entry, str) else json.dumps(entry)) + "\n" for entry in lines)
    return api.files.create(file=(name, content.encode()), purpose="batch")


def run_batch(api, file_id, endpoint="/v1/completions", timeout=300, logs=()):
    batch = api.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    return wait(api, batch.id, timeout, logs)


def wait(api, batch_id, timeout, logs=(), until=TERMINAL):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = api.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.2)
    tails = "\n".join(log.read_text()[-3000:] for log in logs if log.exists())
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}\n{tails}")


def jsonl(api, file_id):
    return [json.loads(text) for text in api.files.content(file_id).text.splitlines()]


def reference(preset, prompt, sampler="greedy", **arguments):
    """What `CausalLM.generate` gives for one prompt with these settings (the completion only)."""
    from core.models import CausalLM

    lm = CausalLM.from_preset(str(preset))
    lm.compile(sampler=sampler)
    (generation,) = lm.generate([prompt], strip_prompt=True, return_details=True, **arguments)
    return generation


def test_a_batch_of_completions_equals_causal_lm_generate_and_bad_lines_are_its_errors(server, tiny_llama_preset):
    api = client(server)
    lines = [
        line("greedy", {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}),
        line("unknown-model", {"model": "no-such-model", "prompt": PROMPTS[1], "temperature": 0}),
        line("sampled", {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0.7, "top_p": 0.9, "seed": 5}),
        '{"custom_id": "malformed", "method": "POST", "url": "/v1/completions", "body": {"model": ',
        line("stopped", {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 20, "temperature": 0, "stop": [" "]}),
    ]
    uploaded = upload(api, lines)
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch" and uploaded.bytes > 0
    assert api.files.retrieve(uploaded.id).filename == "batch.jsonl"

    batch = run_batch(api, uploaded.id, logs=server.logs)
    assert batch.status == "completed", batch
    assert batch.model == MODEL
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 3, 2)

    output = jsonl(api, batch.output_file_id)
    assert [entry["custom_id"] for entry in output] == ["greedy", "sampled", "stopped"]
    expected = [
        reference(tiny_llama_preset, PROMPTS[0], max_new_tokens=12),
        reference(tiny_llama_preset, PROMPTS[2], {"name": "top_p", "p": 0.9, "temperature": 0.7}, max_new_tokens=10, seed=5),
        reference(tiny_llama_preset, PROMPTS[3], max_new_tokens=20, stop=[" "]),
    ]
    for entry, generation in zip(output, expected):
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        body = entry["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == MODEL
        assert body["choices"][0]["text"] == generation.text
        assert body["choices"][0]["finish_reason"] == generation.finish_reason
        assert body["usage"]["prompt_tokens"] == generation.prompt_tokens
        assert body["usage"]["completion_tokens"] == generation.completion_tokens

    errors = jsonl(api, batch.error_file_id)
    assert [(entry["custom_id"], entry["error"]["code"]) for entry in errors] == [
        ("unknown-model", "model_not_found"),
        (None, "invalid_json"),
    ]
    assert "line 2" in errors[0]["error"]["message"] and "line 4" in errors[1]["error"]["message"]
    # The output file as a file: the size it says is what it holds.
    assert api.files.retrieve(batch.output_file_id).bytes == len(api.files.content(batch.output_file_id).content)
