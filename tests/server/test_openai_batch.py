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
from datetime import timedelta

import openai
import pytest
from api_support import REPO, TOKENS, ApiServer, chat_preset, import_preset
from conftest import _service_urls
from service_support import PROMPTS
from worker_support import Worker


MODEL = "tiny"  # the tiny Llama, imported into the store as team-a's
CHAT_MODEL = "tiny-chat"  # the same weights with Llama 2's chat template
LONG_CHAT_MODEL = "tiny-chat-long"  # and with room for 1024 tokens: a random model's JSON wanders
BART_MODEL = "tiny-bart"  # the Bart that KerasHub saved (tests/fixtures)
BART = REPO / "tests" / "fixtures" / "keras_hub_presets" / "bart"
TERMINAL = ("completed", "failed", "cancelled", "expired")
MAX_FILE_BYTES = 4 * 2**20


def long_chat_preset(tiny_llama_preset, root):
    """The chat preset with a sequence length of 1024 (the tiny Llama's rotary positions have no limit)."""
    directory = chat_preset(tiny_llama_preset, root / "long")
    for name in ("preprocessor.json", "task.json"):
        path = directory / name
        path.write_text(path.read_text().replace('"sequence_length": 64', '"sequence_length": 1024'))
    assert '"sequence_length": 1024' in (directory / "preprocessor.json").read_text()
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
    for name, directory in (
        (MODEL, tiny_llama_preset),
        (CHAT_MODEL, chat_preset(tiny_llama_preset, root)),
        (LONG_CHAT_MODEL, long_chat_preset(tiny_llama_preset, root)),
        (BART_MODEL, BART),
    ):
        import_preset(env, directory, name, "team-a")
    if request.param == "service":
        worker = Worker(env, root / "worker.log")
    api = ApiServer({**env, "LMQ_API_TOKENS": TOKENS}, root / "server.log")
    api.logs = [root / "server.log", root / "worker.log"]
    api.env, api.home = env, root / "home"
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
    """What `CausalLM.generate` gives for one prompt with these settings (the whole text, prompt first)."""
    from lmq.core.models import CausalLM

    lm = CausalLM.from_preset(str(preset))
    lm.compile(sampler=sampler)
    (generation,) = lm.generate([prompt], return_details=True, **arguments)
    assert generation.text.startswith(prompt)
    return generation


def test_a_batch_of_completions_equals_causal_lm_generate_and_bad_lines_are_its_errors(server, tiny_llama_preset):
    api = client(server)
    lines = [
        line("greedy", {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}),
        line("unknown-model", {"model": "no-such-model", "prompt": PROMPTS[1], "temperature": 0}),
        line(
            "sampled",
            {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0.7, "top_p": 0.9, "seed": 5},
        ),
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
        reference(
            tiny_llama_preset, PROMPTS[2], {"name": "top_p", "p": 0.9, "temperature": 0.7}, max_new_tokens=10, seed=5
        ),
        reference(tiny_llama_preset, PROMPTS[3], max_new_tokens=20, stop=[" "]),
    ]
    for entry, prompt, generation in zip(output, [PROMPTS[0], PROMPTS[2], PROMPTS[3]], expected):
        assert entry["error"] is None and entry["response"]["status_code"] == 200
        body = entry["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == MODEL
        # OpenAI's completion text: what follows the prompt, its leading space included
        assert prompt + body["choices"][0]["text"] == generation.text
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


def test_a_chat_batch_renders_the_messages_with_the_preset_template(server, tiny_llama_preset, tmp_path):
    from lmq.core.chat import chat_token_ids, end_of_turn_token_ids
    from lmq.core.models import CausalLM

    api = client(server)
    conversations = [
        [{"role": "user", "content": "Return the absolute value"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Raise"}]}],
    ]
    lines = [
        line(
            f"chat-{i}",
            {"model": CHAT_MODEL, "messages": messages, "max_tokens": 10, "temperature": 0},
            "/v1/chat/completions",
        )
        for i, messages in enumerate(conversations)
    ]
    batch = run_batch(api, upload(api, lines).id, "/v1/chat/completions", logs=server.logs)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    output = jsonl(api, batch.output_file_id)

    preset = chat_preset(tiny_llama_preset, tmp_path)
    lm = CausalLM.from_preset(str(preset))
    lm.compile(sampler="greedy")
    tokenizer = lm.preprocessor.tokenizer
    plain = [{"role": "user", "content": "Return the absolute value"}], [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Raise"},
    ]
    prompts = [chat_token_ids(tokenizer, messages) for messages in plain]
    # A chat stops at the end of the turn as well as at the end token.
    stop_ids = list(dict.fromkeys([*tokenizer.stop_token_ids, *end_of_turn_token_ids(tokenizer)]))
    expected = lm.generate(prompts, max_new_tokens=10, strip_prompt=True, stop_token_ids=stop_ids, return_details=True)
    for entry, generation in zip(output, expected):
        body = entry["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": generation.text, "refusal": None}
        assert body["choices"][0]["finish_reason"] == generation.finish_reason
        assert body["usage"]["prompt_tokens"] == generation.prompt_tokens


def test_a_sequence_to_sequence_model_reads_a_completion_s_prompt_as_its_encoder_text(server):
    from lmq.core.models import Seq2SeqLM

    api = client(server)
    texts = json.loads((BART.parent / "expected.json").read_text())["bart"]["inputs"][:2]
    lines = [
        line(f"s{i}", {"model": BART_MODEL, "prompt": t, "max_tokens": 8, "temperature": 0})
        for i, t in enumerate(texts)
    ]
    chat = line("chat", {"model": BART_MODEL, "messages": [{"role": "user", "content": "Hi"}]}, "/v1/chat/completions")
    batch = run_batch(api, upload(api, lines).id, logs=server.logs)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    lm = Seq2SeqLM.from_preset(str(BART))
    lm.compile(sampler="greedy")
    expected = lm.generate(texts, max_new_tokens=8, strip_prompt=True, return_details=True)
    output = jsonl(api, batch.output_file_id)
    assert [entry["response"]["body"]["choices"][0]["text"] for entry in output] == [g.text for g in expected]
    # It has no chat: a chat batch's lines are errors that say so.
    refused = run_batch(api, upload(api, [chat]).id, "/v1/chat/completions", logs=server.logs)
    (error,) = jsonl(api, refused.error_file_id)
    assert error["error"]["code"] == "model_not_supported" and "sequence-to-sequence" in error["error"]["message"]


def long_batch(api, lines=400, logs=()):
    """A batch that runs for a while, once some of its lines are done."""
    requests = [
        line(f"r{i}", {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 40, "temperature": 0})
        for i in range(lines)
    ]
    batch = api.batches.create(
        input_file_id=upload(api, requests).id, endpoint="/v1/completions", completion_window="1h"
    )
    deadline = time.monotonic() + 300
    while (batch := api.batches.retrieve(batch.id)).request_counts.completed == 0:
        assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline, batch
        time.sleep(0.1)
    assert batch.status == "in_progress", batch
    return batch


def check_partial_output(api, batch, code):
    """What finished stays in the output file, in input order; every other line is in the error file."""
    counts = batch.request_counts
    output, errors = jsonl(api, batch.output_file_id), jsonl(api, batch.error_file_id)
    assert 0 < counts.completed == len(output) < counts.total == counts.completed + counts.failed
    assert len(errors) == counts.failed
    indices = [int(entry["custom_id"][1:]) for entry in output]
    assert indices == sorted(indices)
    assert sorted(indices + [int(entry["custom_id"][1:]) for entry in errors]) == list(range(counts.total))
    assert {entry["error"]["code"] for entry in errors} == {code}
    assert all(entry["response"]["body"]["choices"][0]["text"] is not None for entry in output)


def test_a_cancelled_batch_keeps_its_finished_lines_in_its_output_file(server):
    api = client(server)
    batch = long_batch(api, logs=server.logs)
    cancelling = api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    batch = wait(api, batch.id, 120, server.logs)
    assert batch.status == "cancelled" and batch.cancelled_at is not None, batch
    check_partial_output(api, batch, "batch_cancelled")
    with pytest.raises(openai.ConflictError) as refused:
        api.batches.cancel(batch.id)
    assert refused.value.code == "invalid_state"


def test_a_batch_past_its_completion_window_expires_with_what_it_finished(server):
    from sqlalchemy import update

    from lmq.core.config import load_settings
    from lmq.core.store import session_scope, sessions
    from lmq.core.store.models import OpenAIBatch, utcnow

    api = client(server)
    batch = long_batch(api, logs=server.logs)
    settings = load_settings({**os.environ, **server.env})
    with session_scope(sessions(settings)) as session:  # as if the hour had passed
        session.execute(
            update(OpenAIBatch).where(OpenAIBatch.id == batch.id).values(created_at=utcnow() - timedelta(hours=2))
        )
    assert api.batches.retrieve(batch.id).status == "expired"
    batch = wait(api, batch.id, 120, server.logs, until=("expired",))
    deadline = time.monotonic() + 120
    while (batch := api.batches.retrieve(batch.id)).output_file_id is None:  # until its job has stopped
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.expired_at is not None
    check_partial_output(api, batch, "batch_expired")


def test_batch_usage_and_request_counts_are_the_sums_of_its_lines(server):
    from sqlalchemy import update

    from lmq.core.config import load_settings
    from lmq.core.store import session_scope, sessions
    from lmq.core.store.models import OpenAIFile, utcnow

    api = client(server)
    lines = [
        line(f"q{i}", {"model": MODEL, "prompt": prompt, "max_tokens": 3 + i, "temperature": 0})
        for i, prompt in enumerate(PROMPTS[:3])
    ]
    lines.append(line("responses", {"model": MODEL, "input": "Hi"}, "/v1/responses"))
    metadata = {"k" * 64: "v" * 512, **{f"key{i}": str(i) for i in range(15)}}
    batch = api.batches.create(
        input_file_id=upload(api, lines).id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata=metadata,
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert batch.metadata == metadata and batch.usage.total_tokens == 0
    batch = wait(api, batch.id, 300, server.logs)
    assert batch.status == "completed", batch
    output, errors = jsonl(api, batch.output_file_id), jsonl(api, batch.error_file_id)
    usages = [entry["response"]["body"]["usage"] for entry in output]
    assert [u["completion_tokens"] for u in usages] == [3, 4, 5]
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages) > 0
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert batch.usage.total_tokens == sum(u["total_tokens"] for u in usages)
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(output) + len(errors), len(output), len(errors))
    # A /v1/responses line is its own error, naming the endpoint as unsupported.
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("responses", "unsupported_endpoint")]
    assert "/v1/responses" in errors[0]["error"]["message"] and "not supported" in errors[0]["error"]["message"]

    # The output and error files expire output_expires_after seconds after they were made, then are no files.
    for file_id in (batch.output_file_id, batch.error_file_id):
        made = api.files.retrieve(file_id)
        assert made.expires_at == made.created_at + 7200
    settings = load_settings({**os.environ, **server.env})
    with session_scope(sessions(settings)) as session:  # as if the two hours had passed
        session.execute(
            update(OpenAIFile).where(OpenAIFile.id == batch.output_file_id).values(expires_at=utcnow())
        )
    with pytest.raises(openai.NotFoundError):
        api.files.content(batch.output_file_id)
    assert batch.output_file_id not in {f.id for f in api.files.list()}
    assert api.files.retrieve(batch.error_file_id).id == batch.error_file_id


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after.seconds"),
        ({"output_expires_after": {"anchor": "finished_at", "seconds": 3600}}, "output_expires_after.anchor"),
    ],
)
def test_batch_metadata_and_output_expiry_beyond_openai_s_limits_are_400(server, extra, param):
    api = client(server)
    uploaded = upload(api, [line("one", {"model": MODEL, "prompt": "The"})])
    with pytest.raises(openai.BadRequestError) as refused:
        api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h", **extra)
    assert refused.value.response.json()["error"]["param"].startswith(param)


def test_choices_penalties_and_logprobs_run_in_one_batch_as_causal_lm_generate_gives_them(server, tiny_llama_preset):
    """n=3 is three rows seeded seed + i; penalties and logit_bias change the tokens as the library's
    processing does; logprobs are the library's (checked against transformers in test_row_processing);
    every line runs in one batch beside a plain line, which is unchanged. Choice i equals the library's
    generation seeded 7 + i, so a seeded n=3 line is reproducible."""
    from lmq.core.samplers.processing import RowProcessing

    api = client(server)
    sampled = {"temperature": 0.9, "seed": 7, "max_tokens": 6}
    penalised = {"temperature": 0, "max_tokens": 8, "presence_penalty": 1.5, "frequency_penalty": 0.5,
                 "logit_bias": {"9": 3.0}}
    lines = [
        line("n3", {"model": MODEL, "prompt": PROMPTS[0], "n": 3, **sampled}),
        line("penalised", {"model": MODEL, "prompt": PROMPTS[1], **penalised}),
        line("logprobs", {"model": MODEL, "prompt": PROMPTS[2], "temperature": 0, "max_tokens": 5, "logprobs": 3}),
        line("plain", {"model": MODEL, "prompt": PROMPTS[3], "temperature": 0, "max_tokens": 5}),
    ]
    uploaded = upload(api, lines)
    first = run_batch(api, uploaded.id, logs=server.logs)
    assert first.status == "completed" and first.error_file_id is None, first
    output = {entry["custom_id"]: entry["response"]["body"] for entry in jsonl(api, first.output_file_id)}

    n3 = output["n3"]
    expected = [
        reference(tiny_llama_preset, PROMPTS[0], {"name": "random", "temperature": 0.9}, max_new_tokens=6, seed=7 + i)
        for i in range(3)
    ]
    assert [c["index"] for c in n3["choices"]] == [0, 1, 2]
    assert [PROMPTS[0] + c["text"] for c in n3["choices"]] == [g.text for g in expected]
    assert len({c["text"] for c in n3["choices"]}) > 1
    assert n3["usage"]["completion_tokens"] == sum(g.completion_tokens for g in expected)
    assert n3["usage"]["prompt_tokens"] == expected[0].prompt_tokens

    settings = RowProcessing(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={9: 3.0})
    with_penalties = reference(tiny_llama_preset, PROMPTS[1], max_new_tokens=8, processing=settings)
    assert PROMPTS[1] + output["penalised"]["choices"][0]["text"] == with_penalties.text
    assert with_penalties.text != reference(tiny_llama_preset, PROMPTS[1], max_new_tokens=8).text

    reported = output["logprobs"]["choices"][0]["logprobs"]
    library = reference(tiny_llama_preset, PROMPTS[2], max_new_tokens=5, processing=RowProcessing(logprobs=3))
    assert len(reported["tokens"]) == len(reported["token_logprobs"]) == len(library.logprobs) == 5
    for token_logprob, top, expected_token in zip(reported["token_logprobs"], reported["top_logprobs"], library.logprobs):
        assert abs(token_logprob - expected_token.logprob) < 1e-5
        assert sorted(top.values(), reverse=True) == pytest.approx([v for _, v in expected_token.top], abs=1e-5)
        assert len(top) <= 3 and token_logprob <= max(top.values()) + 1e-6
    assert "".join(reported["tokens"]) == output["logprobs"]["choices"][0]["text"]
    assert output["plain"]["choices"][0]["logprobs"] is None
    assert PROMPTS[3] + output["plain"]["choices"][0]["text"] == reference(tiny_llama_preset, PROMPTS[3], max_new_tokens=5).text

    assert first.usage.output_tokens == sum(body["usage"]["completion_tokens"] for body in output.values())


def test_a_chat_line_s_logprobs_come_in_openai_s_chat_shape(server):
    api = client(server)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Return the"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "n": 2}
    batch = run_batch(api, upload(api, [line("c", body, "/v1/chat/completions")]).id, "/v1/chat/completions",
                      logs=server.logs)
    assert batch.status == "completed", batch
    (entry,) = jsonl(api, batch.output_file_id)
    choices = entry["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[0]["message"] == choices[1]["message"]  # greedy
    content = choices[0]["logprobs"]["content"]
    assert len(content) == entry["response"]["body"]["usage"]["completion_tokens"] // 2
    for token in content:
        assert set(token) == {"token", "logprob", "bytes", "top_logprobs"} and token["bytes"] == list(token["token"].encode())
        assert len(token["top_logprobs"]) == 2 and token["logprob"] == pytest.approx(token["top_logprobs"][0]["logprob"])


def test_tenants_see_only_their_own_files_batches_and_models(server):
    team_a, team_b = client(server, "tok-a"), client(server, "tok-b")
    uploaded = upload(team_a, [line("one", {"model": MODEL, "prompt": "The", "max_tokens": 3, "temperature": 0})])
    batch = run_batch(team_a, uploaded.id, logs=server.logs)
    assert batch.status == "completed", batch

    for file_id in (uploaded.id, batch.output_file_id):
        for read in (team_b.files.retrieve, team_b.files.content, team_b.files.delete):
            with pytest.raises(openai.NotFoundError):
                read(file_id)
    for act in (team_b.batches.retrieve, team_b.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            act(batch.id)
    with pytest.raises(openai.NotFoundError):
        team_b.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert uploaded.id not in [f.id for f in team_b.files.list()]
    assert batch.id not in [b.id for b in team_b.batches.list()]
    assert batch.id in [b.id for b in team_a.batches.list()]
    assert {uploaded.id, batch.output_file_id} <= {f.id for f in team_a.files.list()}

    # Team A's presets are not team B's models: a batch of B's naming one fails, saying so.
    assert {MODEL, CHAT_MODEL} <= {m.id for m in team_a.models.list()}
    assert not {MODEL, CHAT_MODEL} & {m.id for m in team_b.models.list()}
    with pytest.raises(openai.NotFoundError):
        team_b.models.retrieve(MODEL)
    own = upload(team_b, [line("one", {"model": MODEL, "prompt": "The"})])
    failed = run_batch(team_b, own.id, logs=server.logs)
    assert failed.status == "failed" and failed.errors.data[0].code == "model_not_found", failed
    assert "'tiny'" in failed.errors.data[0].message

    # A deleted upload is gone; the batch made from it keeps its output.
    assert team_a.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        team_a.files.content(uploaded.id)
    assert [entry["custom_id"] for entry in jsonl(team_a, batch.output_file_id)] == ["one"]


def test_a_file_that_is_not_jsonl_fails_validation_with_a_message(server):
    api = client(server)
    uploaded = api.files.create(file=("prompts.csv", b"custom_id,prompt\nq0,The\n"), purpose="batch")
    batch = run_batch(api, uploaded.id, logs=server.logs)
    assert batch.status == "failed" and batch.failed_at is not None, batch
    (error,) = batch.errors.data
    assert error.code == "invalid_json_line" and error.line == 1 and "not JSONL" in error.message
    assert batch.output_file_id is None and batch.error_file_id is None


def test_bad_requests_are_openai_shaped_4xx(server):
    api = client(server)
    uploaded = upload(api, [line("one", {"model": MODEL, "prompt": "The"})])

    def refusal(kind, call, *args, **kwargs):
        with pytest.raises(kind) as refused:
            call(*args, **kwargs)
        body = refused.value.response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"], body
        return body

    body = refusal(
        openai.BadRequestError,
        api.batches.create,
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
    )
    assert body["param"] == "endpoint" and body["type"] == "invalid_request_error"
    body = refusal(
        openai.BadRequestError,
        api.batches.create,
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="a while",
    )
    assert body["param"] == "completion_window"
    body = refusal(
        openai.NotFoundError,
        api.batches.create,
        input_file_id="file-nope",
        endpoint="/v1/completions",
        completion_window="24h",
    )
    assert body["param"] == "input_file_id"
    assert (
        refusal(openai.BadRequestError, api.files.create, file=("x.jsonl", b"{}\n"), purpose="assistants")["param"]
        == "purpose"
    )
    body = refusal(
        openai.APIStatusError, api.files.create, file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch"
    )
    assert body["code"] == "file_too_large"
    assert refusal(openai.NotFoundError, api.batches.retrieve, "batch_nope")["code"] == "not_found"
    assert refusal(openai.BadRequestError, api.batches.list, limit=0)["param"] == "limit"
    assert refusal(openai.AuthenticationError, client(server, "tok-wrong").files.list)["code"] == "invalid_api_key"
    # Nothing of the refused upload is left behind.
    assert not [path for path in (server.home / "files").iterdir() if path.name.startswith(".upload")]


def test_batches_are_listed_newest_first_a_page_at_a_time(server):
    api = client(server)
    uploaded = upload(api, [line("one", {"model": MODEL, "prompt": "The", "max_tokens": 2, "temperature": 0})])
    made = [
        api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h", metadata={"n": str(i)}
        )
        for i in range(3)
    ]
    first = api.batches.list(limit=2)
    assert [b.id for b in first.data] == [made[2].id, made[1].id] and first.has_more
    second = api.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0].id and second.data[0].metadata == {"n": "0"}
    for batch in made:
        wait(api, batch.id, 120, server.logs)


def left_validating(server, file_id, hours_ago):
    """A batch row as a server writes it before it validates (the server then stopped, or not yet)."""
    from lmq.core.config import load_settings
    from lmq.core.store import session_scope, sessions
    from lmq.core.store.batches import add_batch
    from lmq.core.store.models import utcnow

    with session_scope(sessions(load_settings({**os.environ, **server.env}))) as session:
        batch = add_batch(
            session,
            tenant="team-a",
            endpoint="/v1/completions",
            input_file_id=file_id,
            completion_window="24h",
            metadata=None,
        )
        batch.validation_started_at = utcnow() - timedelta(hours=hours_ago)
    return batch.id


def test_a_validation_a_stopped_server_left_is_taken_up_again(server):
    api = client(server)
    uploaded = upload(api, [line("one", {"model": MODEL, "prompt": "The", "max_tokens": 3, "temperature": 0})])
    batch = wait(api, left_validating(server, uploaded.id, hours_ago=1), 120, server.logs)
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch


def test_a_batch_cancelled_while_validating_makes_no_job(server):
    api = client(server)
    uploaded = upload(api, [line("one", {"model": MODEL, "prompt": "The", "max_tokens": 3, "temperature": 0})])
    batch_id = left_validating(server, uploaded.id, hours_ago=0)
    assert api.batches.retrieve(batch_id).status == "validating"
    cancelled = api.batches.cancel(batch_id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    # The validation, had it been running, finds the batch cancelled and makes no job.
    from lmq.api.app.openai.batches.service import validate
    from lmq.core.config import load_settings

    validate(load_settings({**os.environ, **server.env}), None, batch_id)
    after = api.batches.retrieve(batch_id)
    assert after.status == "cancelled" and after.request_counts.total == 0 and after.output_file_id is None


def test_an_empty_file_fails_validation(server):
    api = client(server)
    batch = run_batch(api, api.files.create(file=("empty.jsonl", b""), purpose="batch").id, logs=server.logs)
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file", batch


# ---------------------------------------------------------------- one line, as the validation reads it


def parse(entry, endpoint="/v1/completions"):
    from lmq.api.app.openai.batches.lines import parse_line
    from lmq.core.config import Limits

    return parse_line(json.dumps(entry).encode(), 7, endpoint, Limits())


def test_a_line_s_openai_settings_become_its_own_generate_params():
    greedy = parse(line("a", {"model": "m", "prompt": "Hi", "temperature": 0, "top_p": 0.5, "stop": "."}))
    assert greedy.input == {"prompt": "Hi", "params": {"sampler": "greedy", "max_new_tokens": 16, "stop": ["."]}}
    sampled = parse(
        line("b", {"model": "m", "prompt": ["Hi"], "temperature": 0.5, "top_p": 0.9, "seed": 3, "max_tokens": 4})
    )
    assert sampled.input["params"] == {
        "sampler": {"name": "top_p", "p": 0.9, "temperature": 0.5},
        "max_new_tokens": 4,
        "seed": 3,
    }
    default = parse(line("c", {"model": "m", "prompt": "Hi", "n": 1, "user": "x"}))
    assert default.input["params"]["sampler"] == {"name": "random", "temperature": 1.0}
    chat = parse(
        line(
            "d",
            {
                "model": "m",
                "max_completion_tokens": 9,
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
                ],
            },
            "/v1/chat/completions",
        ),
        "/v1/chat/completions",
    )
    assert (chat.custom_id, chat.model) == ("d", "m")
    assert chat.input["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert "stop" not in chat.input["params"] and chat.input["params"]["max_new_tokens"] == 9



def test_a_line_s_choices_penalties_and_logprobs_become_its_own_generate_params():
    from lmq.api.app.openai.batches.lines import LineError

    settings = {"n": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"7": -100}, "min_p": 0.1}
    completion = parse(line("a", {"model": "m", "prompt": "Hi", "logprobs": 2, **settings}))
    assert completion.input["params"] == {
        "sampler": {"name": "random", "temperature": 1.0}, "max_new_tokens": 16, "logprobs": 2, **settings
    }
    messages = [{"role": "user", "content": "Hi"}]
    chat = parse(
        line("b", {"model": "m", "messages": messages, "logprobs": True, "top_logprobs": 4}, "/v1/chat/completions"),
        "/v1/chat/completions",
    )
    assert chat.input["params"]["logprobs"] == 4
    chosen_only = {"model": "m", "messages": messages, "logprobs": True}
    assert parse(line("c", chosen_only, "/v1/chat/completions"), "/v1/chat/completions").input["params"]["logprobs"] == 0
    with pytest.raises(LineError, match="top_logprobs needs logprobs"):
        parse(line("d", {"model": "m", "messages": messages, "top_logprobs": 2}, "/v1/chat/completions"),
              "/v1/chat/completions")


def test_a_line_becomes_the_generate_item_a_jobs_input_with_the_same_settings_is():
    """One item model checks both: a line's OpenAI settings and a /v1/jobs input's params give the same item."""
    from lmq.api.app.openai.batches.lines import LineError, parse_line
    from lmq.core.config import Limits
    from lmq.core.domain.requests import parse_job

    body = {"model": "m", "prompt": "Hi", "temperature": 0.5, "top_p": 0.9, "seed": 3, "max_tokens": 4, "stop": "."}
    params = {"sampler": {"name": "top_p", "p": 0.9, "temperature": 0.5}, "seed": 3, "max_new_tokens": 4, "stop": ["."]}
    job = parse_job({"kind": "generate", "preset": "m", "inputs": [{"prompt": "Hi", "params": params}]}, Limits())
    assert parse(line("a", body)).input == job.inputs[0].stored_input()
    # What the item model refuses in a /v1/jobs input, it refuses in a line: here a chat turn over LMQ_MAX_PROMPT_CHARS.
    parts = [{"type": "text", "text": "abc"}, {"type": "text", "text": "def"}]
    chat = line("b", {"model": "m", "messages": [{"role": "user", "content": parts}]}, "/v1/chat/completions")
    with pytest.raises(LineError) as refused:
        parse_line(json.dumps(chat).encode(), 7, "/v1/chat/completions", Limits(prompt_chars=4))
    assert (refused.value.code, refused.value.param) == ("invalid_request", "body.messages[0].content")

@pytest.mark.parametrize(
    "entry, code, param",
    [
        (line("a", {"model": "m", "prompt": "Hi"}, "/v1/chat/completions"), "invalid_url", "url"),
        (line("a", {"model": "m", "prompt": "Hi", "n": 129}), "invalid_request", "body.n"),
        (line("a", {"model": "m", "prompt": "Hi", "logprobs": 21}), "invalid_request", "body.logprobs"),
        (line("a", {"model": "m", "prompt": "Hi", "logit_bias": {"x": 1}}), "invalid_request", "body.logit_bias.x"),
        (line("a", {"model": "m", "prompt": "Hi", "presence_penalty": 3}), "invalid_request", "body.presence_penalty"),
        (line("a", {"model": "m", "prompt": "Hi", "stop": list("abcde")}), "invalid_request", "body.stop"),
        (line("a", {"model": "m", "prompt": "Hi"}, "/v1/responses"), "unsupported_endpoint", "url"),
        (line("a", {"model": "m", "prompt": "Hi", "temperature": 2.5}), "invalid_request", "body.temperature"),
        (line("a", {"model": "m", "prompt": "Hi", "max_tokens": 10**6}), "invalid_request", "body.max_tokens"),
        (line("a", {"model": "m"}), "invalid_request", "body.prompt"),
        ({"method": "POST", "url": "/v1/completions", "body": {}}, "invalid_request", "custom_id"),
        ({**line("a", {"model": "m", "prompt": "Hi"}), "extra": 1}, "invalid_request", "extra"),
        (["not", "an", "object"], "invalid_json", None),
    ],
)
def test_a_line_that_cannot_run_says_why_and_where(entry, code, param):
    from lmq.api.app.openai.batches.lines import LineError

    with pytest.raises(LineError) as refused:
        parse(entry)
    assert (refused.value.code, refused.value.param) == (code, param)
    assert refused.value.message.startswith("line 7")


def test_an_over_long_line_is_its_own_error_and_the_next_line_is_read(tmp_path):
    from lmq.api.app.openai.batches.lines import LineError, max_line_bytes, read_lines
    from lmq.core.config import Limits

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * (max_line_bytes(Limits()) + 10) + b"\n\n{}\n")
    (first, too_long), (number, raw) = read_lines(path, Limits())
    assert first == 1 and isinstance(too_long, LineError) and too_long.code == "line_too_long"
    assert (number, raw) == (3, b"{}\n")


def job_events_of_batch(server, batch_id):
    """The events of the job a batch runs as (its first `state` event names the batch)."""
    import httpx

    headers = {"Authorization": "Bearer tok-a"}
    for job in httpx.get(f"{server.url}/v1/jobs", headers=headers, params={"limit": 500}).json()["jobs"]:
        events = httpx.get(f"{server.url}/v1/jobs/{job['id']}/events", headers=headers).json()["events"]
        if any(event.get("batch") == batch_id for event in events if event["type"] == "state"):
            return events
    raise AssertionError(f"no job names batch {batch_id}")


def test_structured_chat_outputs_validate_against_their_schemas_in_one_engine_pass(server):
    """50 chat lines over 5 JSON schemas and json_object lines on the tiny random model: every output
    parses and validates against its line's schema, and all of them ran in one run of the engine."""
    import jsonschema

    from tests.library.test_structured_outputs import SCHEMAS

    api = client(server)
    names = list(SCHEMAS)
    lines = [
        line(
            f"s{i}",
            {"model": LONG_CHAT_MODEL, "messages": [{"role": "user", "content": f"Describe item {i}"}], "max_tokens": 800,
             "seed": i, "response_format": {"type": "json_schema", "json_schema": {
                 "name": names[i % 5], "schema": SCHEMAS[names[i % 5]], "strict": True}}},
            url="/v1/chat/completions",
        )
        for i in range(50)
    ] + [
        line(f"o{i}", {"model": LONG_CHAT_MODEL, "messages": [{"role": "user", "content": "Any JSON"}], "max_tokens": 800,
                       "seed": 100 + i, "response_format": {"type": "json_object"}}, url="/v1/chat/completions")
        for i in range(3)
    ]
    batch = run_batch(api, upload(api, lines).id, endpoint="/v1/chat/completions", timeout=600, logs=server.logs)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    output = {entry["custom_id"]: entry["response"]["body"]["choices"][0] for entry in jsonl(api, batch.output_file_id)}
    assert len(output) == 53
    for i in range(50):
        choice = output[f"s{i}"]
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[names[i % 5]])
        assert choice["finish_reason"] == "stop"
    for i in range(3):
        assert isinstance(json.loads(output[f"o{i}"]["message"]["content"]), dict)
    decodes = [event for event in job_events_of_batch(server, batch.id) if event["type"] == "decode"]
    assert [(event["rows"], event["formats"]) for event in decodes] == [(53, 6)]


def test_lines_of_different_stops_run_in_one_engine_pass(server, tiny_llama_preset):
    """Completion lines with their own `stop` (a string, up to 4 strings, or none): one run of the
    engine, each line's text what `generate` gives its prompt alone with its stops."""
    api = client(server)
    stops = [" ", ["e", "a", "xyz", "o"], None, "t", ["n", " "]]
    lines = [
        line(f"l{i}", {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 20, "temperature": 0,
                       **({} if stop is None else {"stop": stop})})
        for i, stop in enumerate(stops)
    ]
    batch = run_batch(api, upload(api, lines).id, logs=server.logs)
    assert batch.status == "completed" and batch.error_file_id is None, batch
    output = {entry["custom_id"]: entry["response"]["body"]["choices"][0] for entry in jsonl(api, batch.output_file_id)}
    for i, stop in enumerate(stops):
        prompt = PROMPTS[i % len(PROMPTS)]
        own = {} if stop is None else {"stop": [stop] if isinstance(stop, str) else stop}
        generation = reference(tiny_llama_preset, prompt, max_new_tokens=20, **own)
        assert prompt + output[f"l{i}"]["text"] == generation.text
        assert output[f"l{i}"]["finish_reason"] == generation.finish_reason
    assert [output[f"l{i}"]["finish_reason"] for i in range(len(stops))].count("stop") >= 2  # the stops took effect
    decodes = [event for event in job_events_of_batch(server, batch.id) if event["type"] == "decode"]
    assert [event["rows"] for event in decodes] == [len(stops)]


def test_a_schema_the_grammar_engine_cannot_compile_is_that_line_s_error(server):
    api = client(server)
    chat = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    lines = [
        line("unique", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "u", "schema": {"type": "array", "uniqueItems": True}}}}, url="/v1/chat/completions"),
        line("choice", {**chat, "guided_choice": ["yes", "no"], "temperature": 0}, url="/v1/chat/completions"),
    ]
    batch = run_batch(api, upload(api, lines).id, endpoint="/v1/chat/completions", logs=server.logs)
    assert batch.status == "completed", batch
    (error,) = jsonl(api, batch.error_file_id)
    assert error["custom_id"] == "unique" and error["error"]["code"] == "invalid_request"
    assert "uniqueItems" in error["error"]["message"]
    (done,) = jsonl(api, batch.output_file_id)
    assert done["response"]["body"]["choices"][0]["message"]["content"] in ("yes", "no")
