"""OpenAI's fine-tuning API, driven by the official `openai` package against a real `lmq serve`
beside a real `lmq worker` on Redis + PostgreSQL: chat files in, a fine-tuned model out that a
batch then names; events, checkpoints, cancel, pause and resume; bad files failing with
per-line messages before any training; a worker killed mid-epoch, its job resumed once. And
once on the embedded default (SQLite, the server runs the job itself), paused and resumed.

Default settings throughout: the killed worker's job is taken up by the next worker's first
sweep, which sees that the holder's process is gone, not after LMQ_LEASE_S.
"""

import io
import json
import time

import numpy as np
import openai
import pytest
from api_support import TEAM_A, TOKENS, ApiServer, chat_preset, generate_body, import_preset, wait_for_job
from database_support import fresh_database
from model_support import random_adapter
from conftest import _service_urls
from worker_support import Worker

MODEL = "tiny-chat"  # the tiny Llama with Llama 2's chat template, team-a's
ENDED = ("succeeded", "failed", "cancelled")
WORDS = ["value", "key", "file", "error", "list", "name", "path", "line"]


def chat(i):
    word = WORDS[i % len(WORDS)]
    return {
        "messages": [
            {"role": "user", "content": f"Return the {word}"},
            {"role": "assistant", "content": f"Return the {word}."},
        ]
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_preset):
    """`lmq serve` and a worker on a database of this module's own (the Batch API's tests
    name team A's `tiny-chat` too)."""
    import redis

    from lmq.core.store.db import upgrade

    root = tmp_path_factory.mktemp("openai-fine-tuning")
    database_server, broker = _service_urls()
    redis.Redis.from_url(broker).flushdb()
    with fresh_database(database_server, prefix="lmq_fine_tuning") as database:
        upgrade(database)
        env = {"LMQ_HOME": str(root / "home"), "LMQ_DATABASE_URL": database, "LMQ_BROKER_URL": broker}
        import_preset(env, chat_preset(tiny_llama_preset, root), MODEL, "team-a")
        api = ApiServer({**env, "LMQ_API_TOKENS": TOKENS}, root / "server.log")
        api.env, api.root = env, root
        api.workers = [Worker(env, root / "worker-0.log")]
        api.logs = [root / "server.log", root / "worker-0.log"]
        yield api
        api.stop()
        for worker in api.workers:
            worker.stop()


def client(server, token="tok-a"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0)


def upload(api, lines, name="train.jsonl"):
    content = "".join((entry if isinstance(entry, str) else json.dumps(entry)) + "\n" for entry in lines)
    return api.files.create(file=(name, io.BytesIO(content.encode())), purpose="fine-tune")


def wait(api, job_id, server, until=ENDED, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.2)
    tails = "\n".join(log.read_text()[-3000:] for log in server.logs if log.exists())
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s\n{tails}")


def all_events(api, job_id):
    """Every event, oldest first, read page by page as a client follows them (newest first, `after`)."""
    return list(reversed(list(api.fine_tuning.jobs.list_events(job_id, limit=7))))


def steps_recorded(api, job_id):
    return [event.data["step"] for event in all_events(api, job_id) if event.message.startswith("Step ")]


def test_the_whole_cycle_trains_two_checkpoints_and_a_batch_names_the_fine_tuned_model(server):
    api = client(server)
    training = upload(api, [chat(i) for i in range(6)])
    validation = upload(api, [chat(i) for i in range(6, 8)], "valid.jsonl")
    assert training.purpose == "fine-tune"

    job = api.fine_tuning.jobs.create(
        model=MODEL,
        training_file=training.id,
        validation_file=validation.id,
        suffix="demo",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 2},
        metadata={"team": "a"},
    )
    # Created at once; its files are read after the answer (OpenAI's validating_files).
    assert job.id.startswith("ftjob-") and job.status == "validating_files" and job.model == MODEL
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 2)
    assert job.hyperparameters.learning_rate_multiplier == "auto"  # resolved once the files are read
    assert job.fine_tuned_model is None and job.seed == 7 and job.metadata == {"team": "a"}

    done = wait(api, job.id, server)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{MODEL}:demo:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at

    events = all_events(api, job.id)
    messages = [event.message for event in events]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert messages[1] == f"Validating training file {training.id} and validation file {validation.id}"
    assert "Files validated, moving job to queued state" in messages and "Fine-tuning job started" in messages
    assert messages[-1] == f"The job has successfully completed: new fine-tuned model {done.fine_tuned_model}"
    # Three steps an epoch (6 examples, batches of 2), each recorded once, then a checkpoint.
    assert steps_recorded(api, job.id) == [1, 2, 3, 4, 5, 6]
    assert [m for m in messages if m.startswith("Checkpoint")] == [
        "Checkpoint created at step 3 (epoch 1)", "Checkpoint created at step 6 (epoch 2)"
    ]

    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]  # newest first, as OpenAI lists them
    for checkpoint in checkpoints:
        metrics = checkpoint.metrics
        assert metrics.train_loss > 0 and metrics.valid_loss > 0
        assert 0 <= metrics.train_mean_token_accuracy <= 1 and 0 <= metrics.valid_mean_token_accuracy <= 1
        assert checkpoint.fine_tuning_job_id == job.id

    assert api.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    body = {"model": done.fine_tuned_model, "messages": [{"role": "user", "content": "Return the key"}], "max_tokens": 4}
    (output,) = run_chat_batch(api, [body], server)
    assert output["response"]["status_code"] == 200

    # An lmq job names it too.
    with server.client(TEAM_A) as lmq:
        submitted = lmq.post("/v1/jobs", json=generate_body(done.fine_tuned_model, ["Return the"], max_new_tokens=4))
        assert submitted.status_code == 202, submitted.text
        assert wait_for_job(lmq, submitted.json()["id"], 120, server.logs)["status"] == "succeeded"

    listed = api.fine_tuning.jobs.list(limit=1)
    assert listed.data[0].id == job.id
    assert client(server, "tok-b").fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        client(server, "tok-b").fine_tuning.jobs.retrieve(job.id)


def test_a_lora_fine_tune_is_an_adapter_preset_over_its_base_that_a_batch_runs(server):
    from lmq.core.chat import chat_token_ids, end_of_turn_token_ids
    from lmq.core.config import load_settings
    from lmq.core.models import CausalLM
    from lmq.core.store import queries, session_scope, sessions
    from lmq.core.store.presets import store_resolver

    api = client(server)
    job = api.fine_tuning.jobs.create(
        model=MODEL,
        training_file=chat_file(api, 4).id,
        suffix="lora",
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 100, "lora_rank": 4},
    )
    assert job.hyperparameters.lora_rank == 4
    done = wait(api, job.id, server)
    assert done.status == "succeeded", done.error

    settings = load_settings(server.env)
    messages = [{"role": "user", "content": "Return the key"}]
    with session_scope(sessions(settings)) as session:
        stored = queries.get_preset(session, done.fine_tuned_model, "team-a")
        directory = settings.preset_store / done.fine_tuned_model
        assert stored.path == str(directory) and stored.parent == MODEL
        # PEFT's layout over the base the job named, a fraction of the base's size.
        assert json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"] == MODEL
        assert not (directory / "model.weights.h5").exists()
        base_bytes = (settings.preset_store / MODEL / "model.weights.h5").stat().st_size
        assert (directory / "adapter_model.safetensors").stat().st_size < base_bytes / 4
        tuned = CausalLM.from_preset(str(directory), resolver=store_resolver(session, tenant="team-a"))
        base = CausalLM.from_preset(MODEL, resolver=store_resolver(session, tenant="team-a"))
    tokenizer = tuned.preprocessor.tokenizer
    prompt = chat_token_ids(tokenizer, messages)
    assert not np.allclose(tuned.score(np.array([prompt])).numpy(), base.score(np.array([prompt])).numpy())
    tuned.compile(sampler="greedy")
    stop_ids = list(dict.fromkeys([*tokenizer.stop_token_ids, *end_of_turn_token_ids(tokenizer)]))
    (expected,) = tuned.generate([prompt], max_new_tokens=6, strip_prompt=True, stop_token_ids=stop_ids, return_details=True)

    body = {"model": done.fine_tuned_model, "messages": messages, "max_tokens": 6, "temperature": 0}
    (output,) = run_chat_batch(api, [body], server)
    assert output["response"]["body"]["choices"][0]["message"]["content"] == expected.text


def run_chat_batch(api, bodies, server):
    """The output lines of a batch of chat completions, one line per body, in order (the model is the first's)."""
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
             for i, body in enumerate(bodies)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    batch_file = api.files.create(file=("batch.jsonl", io.BytesIO(content)), purpose="batch")
    batch = api.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = api.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.model == bodies[0]["model"], batch
    outputs = [json.loads(text) for text in api.files.content(batch.output_file_id).text.splitlines()]
    if batch.error_file_id:
        outputs += [json.loads(text) for text in api.files.content(batch.error_file_id).text.splitlines()]
    return sorted(outputs, key=lambda output: int(output["custom_id"].split("-")[1]))


def test_four_adapters_of_one_base_in_one_batch_give_each_line_its_tokens_served_alone(server, tiny_llama_preset):
    """One batch whose lines name four adapter presets of team A's tiny-chat and tiny-chat itself: one
    job on the pinned base, every line's reply the one its model gives alone. A line naming a model
    of another base fails on its own, naming it; the others run."""
    from lmq.core.chat import chat_token_ids, end_of_turn_token_ids
    from lmq.core.config import load_settings
    from lmq.core.models import CausalLM
    from lmq.core.store import session_scope, sessions
    from lmq.core.store.presets import store_resolver

    settings = load_settings(server.env)
    names = [f"multi-ft-{i}" for i in range(4)]
    for seed, name in enumerate(names):
        random_adapter(settings.preset_store / MODEL, server.root / name, seed, base_name=MODEL, scale=2)
        import_preset(server.env, server.root / name, name, "team-a")
    (server.root / "other").mkdir()  # the same weights at another place: another base
    import_preset(server.env, chat_preset(tiny_llama_preset, server.root / "other"), "tiny-other", "team-a")
    models = [MODEL, *names]
    prompts = [[{"role": "user", "content": f"Return the {WORDS[i % len(WORDS)]}"}] for i in range(10)]
    bodies = [{"model": models[i % 5], "messages": messages, "max_tokens": 6, "temperature": 0}
              for i, messages in enumerate(prompts)]
    bodies.append({"model": "tiny-other", "messages": prompts[0], "max_tokens": 6, "temperature": 0})

    outputs = run_chat_batch(client(server), bodies, server)
    with session_scope(sessions(settings)) as session:
        resolver = store_resolver(session, tenant="team-a")
        alone = {model: CausalLM.from_preset(model, resolver=resolver) for model in models}
    tokenizer = alone[MODEL].preprocessor.tokenizer
    stop_ids = list(dict.fromkeys([*tokenizer.stop_token_ids, *end_of_turn_token_ids(tokenizer)]))
    expected = []
    for body in bodies[:-1]:
        lm = alone[body["model"]]
        lm.compile(sampler="greedy")
        (reply,) = lm.generate([chat_token_ids(tokenizer, body["messages"])], max_new_tokens=6, strip_prompt=True,
                               stop_token_ids=stop_ids, return_details=True)
        expected.append(reply.text)
    replies = [output["response"]["body"]["choices"][0]["message"]["content"] for output in outputs[:-1]]
    assert replies == expected
    assert len(set(expected)) > 2  # the adapters change the replies
    assert [output["response"]["body"]["model"] for output in outputs[:-1]] == [body["model"] for body in bodies[:-1]]
    assert outputs[-1]["response"] is None
    assert "'tiny-other' is neither the job's base model nor an adapter of it" in outputs[-1]["error"]["message"]


def test_without_a_validation_file_the_events_say_so_and_checkpoints_have_no_valid_loss(server):
    api = client(server)
    job = api.fine_tuning.jobs.create(
        model=MODEL,
        training_file=upload(api, [chat(i) for i in range(2)]).id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
    )
    assert wait(api, job.id, server).status == "succeeded"
    messages = [event.message for event in all_events(api, job.id)]
    assert "No validation file: checkpoints have no valid_loss nor valid_mean_token_accuracy" in messages
    (checkpoint,) = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.metrics.train_loss > 0 and checkpoint.metrics.valid_loss is None


def test_bad_files_fail_validation_naming_each_line_and_nothing_trains(server):
    api = client(server)
    lines = [
        chat(0),
        "not json at all",
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "x" * 40_000}, {"role": "assistant", "content": "ok"}]},
        {"prompt": "a prompt", "text": "and a text"},
    ]
    job = api.fine_tuning.jobs.create(model=MODEL, training_file=upload(api, lines).id)
    assert job.status == "validating_files"
    job = wait(api, job.id, server)
    assert job.status == "failed"
    assert (job.error.code, job.error.param) == ("invalid_training_file", "training_file")
    message = job.error.message
    assert "line 1" not in message
    assert "line 2 is not JSON" in message
    assert "line 3: messages[0].role" in message
    assert "line 4: a chat example needs at least one assistant message" in message
    assert "line 5: messages[0].content" in message and "32768" in message
    assert "line 6: give 'messages' (a chat), 'prompt' and 'completion', or 'text'" in message
    events = all_events(api, job.id)
    assert not [event for event in events if event.type == "metrics"]
    assert events[-1].level == "error" and events[-1].data["error"]["code"] == "invalid_training_file"
    assert api.fine_tuning.jobs.checkpoints.list(job.id).data == []

    not_jsonl = api.files.create(file=("x.jsonl", io.BytesIO(b"[1, 2]\n{\n")), purpose="fine-tune")
    refused = api.fine_tuning.jobs.create(model=MODEL, training_file=chat_file(api).id, validation_file=not_jsonl.id)
    refused = wait(api, refused.id, server)
    assert refused.status == "failed" and refused.error.code == "invalid_validation_file"
    assert "line 1: expected a JSON object, got list" in refused.error.message
    assert "line 2 is not JSON" in refused.error.message
    # Listed newest first, a page at a time.
    assert [j.id for j in api.fine_tuning.jobs.list(limit=1)][:2] == [refused.id, job.id]
    assert api.fine_tuning.jobs.list(limit=1, after=refused.id).data[0].id == job.id


def test_examples_whose_answers_fall_past_the_sequence_length_fail_on_the_worker_before_any_step(server):
    api = client(server)
    long_question = {"role": "user", "content": "Return the value of the key in the file at the path " * 3}
    lines = [chat(0), {"messages": [long_question, {"role": "assistant", "content": "The value."}]}]
    job = api.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(api, lines).id, hyperparameters={"sequence_length": 24}
    )
    failed = wait(api, job.id, server)
    assert "Files validated, moving job to queued state" in [e.message for e in all_events(api, job.id)]  # well formed
    assert failed.status == "failed" and (failed.error.code, failed.error.param) == ("invalid_training_file", "training_file")
    assert "example 2: none of its trained tokens is within the model's sequence length (24 tokens" in failed.error.message
    assert "example 1" not in failed.error.message
    assert not [event for event in all_events(api, job.id) if event.message.startswith("Step ")]


def validating_job(api, env, holder):
    """A fine-tuning job left validating by `holder` (an API server's name), as a stopped server leaves one."""
    from lmq.api.app.openai.fine_tuning.validation import VALIDATION_LEASE_S
    from lmq.core.config import load_settings
    from lmq.core.domain.fine_tuning import FINE_TUNING, fine_tuned_model_name, openai_job_id
    from lmq.core.names import JobKind
    from lmq.core.store import leases, queries, session_scope, sessions

    training = chat_file(api)
    shown = {"model": MODEL, "training_file": training.id, "validation_file": None, "suffix": None, "seed": 1,
             "metadata": None,
             "hyperparameters": {"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto"}}
    with session_scope(sessions(load_settings(env))) as session:
        job = queries.create_job(session, kind=JobKind.fit, preset=MODEL, params={FINE_TUNING: shown}, tenant="team-a")
        job.output_preset = fine_tuned_model_name(MODEL, None, job.id)
        leases.hold_validation(job, holder, VALIDATION_LEASE_S)
        return openai_job_id(job.id)


def test_a_validation_whose_server_stopped_is_taken_up_by_a_running_one(server):
    """A job left validating_files by a server whose process is gone is validated by the running
    server's sweep (every LMQ_SWEEP_S), then trains; one held by a live server is left to it,
    and can be cancelled (not paused) meanwhile."""
    import subprocess

    from lmq.core.store import leases

    api = client(server)
    stopped = subprocess.Popen(["true"])
    stopped.wait()
    orphan = validating_job(api, server.env, leases.holder_name(stopped.pid))
    held = validating_job(api, server.env, leases.holder_name())  # this test's process: alive, validating "for ever"
    done = wait(api, orphan, server)
    assert done.status == "succeeded", done.error
    assert "Files validated, moving job to queued state" in [event.message for event in all_events(api, orphan)]
    assert done.hyperparameters.n_epochs == 1 and done.hyperparameters.batch_size == 2  # "auto": the 2 examples
    assert api.fine_tuning.jobs.retrieve(held).status == "validating_files"
    with pytest.raises(openai.ConflictError, match="is validating_files: it cannot be paused"):
        api.fine_tuning.jobs.pause(held)
    assert api.fine_tuning.jobs.cancel(held).status == "cancelled"


def chat_file(api, count=2):
    return upload(api, [chat(i) for i in range(count)])


def test_bad_requests_are_openai_errors_naming_the_parameter(server):
    api = client(server)
    training = chat_file(api)
    with pytest.raises(openai.NotFoundError) as unknown_model:
        api.fine_tuning.jobs.create(model="no-such-model", training_file=training.id)
    assert unknown_model.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as unknown_file:
        api.fine_tuning.jobs.create(model=MODEL, training_file="file-" + "0" * 24)
    assert unknown_file.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as both:
        api.fine_tuning.jobs.create(
            model=MODEL, training_file=training.id, hyperparameters={"n_epochs": 1},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        )
    assert both.value.body["param"] == "hyperparameters"
    with pytest.raises(openai.BadRequestError) as bad_epochs:
        api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, hyperparameters={"n_epochs": 0})
    assert bad_epochs.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as bad_suffix:
        api.fine_tuning.jobs.create(model=MODEL, training_file=training.id, suffix="no spaces")
    assert bad_suffix.value.body["param"] == "suffix"


def long_job(api, epochs=3, examples=24):
    """A job of `examples` steps an epoch (batches of 1): long enough to be stopped in the middle."""
    return api.fine_tuning.jobs.create(
        model=MODEL, training_file=chat_file(api, examples).id, hyperparameters={"n_epochs": epochs, "batch_size": 1}
    )


def wait_for_step(api, job_id, server, step, timeout=300):
    """Until the job has recorded `step`, read from its newest events (one request a poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = api.fine_tuning.jobs.list_events(job_id, limit=10).data
        if any(event.message.startswith("Step ") and event.data["step"] >= step for event in newest):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach step {step}: {api.fine_tuning.jobs.retrieve(job_id)}")


def test_a_running_job_is_cancelled_at_its_next_step(server):
    api = client(server)
    job = long_job(api)
    wait_for_step(api, job.id, server, 2)
    api.fine_tuning.jobs.cancel(job.id)
    cancelled = wait(api, job.id, server)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert len(steps_recorded(api, job.id)) < 72
    assert all_events(api, job.id)[-1].message == "The job was cancelled"
    with pytest.raises(openai.ConflictError):
        api.fine_tuning.jobs.cancel(job.id)


def test_a_paused_job_stops_and_resumed_goes_on_from_its_checkpoint(server):
    api = client(server)
    # Room to pause before the end on a quiet machine too: a pause is seen within a second.
    job = long_job(api, epochs=2, examples=150)
    wait_for_step(api, job.id, server, 152)  # into the second epoch: the first is checkpointed
    api.fine_tuning.jobs.pause(job.id)
    paused = wait(api, job.id, server, until=("paused",))
    steps_then = steps_recorded(api, job.id)
    time.sleep(2)
    assert api.fine_tuning.jobs.retrieve(job.id).status == "paused" and steps_recorded(api, job.id) == steps_then
    assert paused.fine_tuned_model is None

    api.fine_tuning.jobs.resume(job.id)
    done = wait(api, job.id, server)
    assert done.status == "succeeded", done.error
    # The steps of the unfinished epoch are trained again and recorded once.
    assert steps_recorded(api, job.id) == list(range(1, 301))
    messages = [event.message for event in all_events(api, job.id)]
    assert "The job is paused" in messages and "Fine-tuning job resumed" in messages
    assert "Resumed from the checkpoint of epoch 1 (step 150)" in messages
    assert [c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data] == [300, 150]


def test_a_worker_killed_mid_epoch_leaves_the_job_to_another_which_resumes_it_once(server):
    api = client(server)
    job = long_job(api, epochs=2, examples=60)
    wait_for_step(api, job.id, server, 65)  # early in the second epoch: the kill comes before its end
    killed = server.workers[0]
    killed.kill()
    log = server.root / "worker-1.log"
    server.workers.append(Worker(server.env, log))
    server.logs.append(log)
    done = wait(api, job.id, server)
    assert done.status == "succeeded", done.error
    assert steps_recorded(api, job.id) == list(range(1, 121))
    assert [c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data] == [120, 60]
    messages = [event.message for event in all_events(api, job.id)]
    assert "Fine-tuning job taken up again (attempt 2)" in messages
    assert f"The worker running the job ({killed.name}) has exited" in messages  # not waited out for LMQ_LEASE_S
    assert messages.count("Resumed from the checkpoint of epoch 1 (step 60)") == 1
    assert len([m for m in messages if m.startswith("The job has successfully completed")]) == 1


def test_on_the_embedded_default_a_fine_tuning_job_runs_in_the_server_itself(tmp_path, tiny_llama_preset, lmq_home):
    """No broker, no database server: `lmq serve` on SQLite runs the job in its own thread, and pause and
    resume hand it back to that thread."""
    env = {"LMQ_HOME": str(lmq_home)}
    import_preset(env, chat_preset(tiny_llama_preset, tmp_path), MODEL, "team-a")
    embedded = ApiServer({**env, "LMQ_API_TOKENS": TOKENS}, tmp_path / "server.log")
    embedded.logs = [tmp_path / "server.log"]
    try:
        api = client(embedded)
        job = api.fine_tuning.jobs.create(
            model=MODEL, training_file=chat_file(api, 60).id, hyperparameters={"n_epochs": 2, "batch_size": 1}
        )
        wait_for_step(api, job.id, embedded, 62)  # a pause is seen within a second: well before the end
        api.fine_tuning.jobs.pause(job.id)
        assert wait(api, job.id, embedded, until=("paused",)).status == "paused"
        api.fine_tuning.jobs.resume(job.id)
        done = wait(api, job.id, embedded)
        assert done.status == "succeeded", done.error
        assert steps_recorded(api, job.id) == list(range(1, 121))
        assert [c.step_number for c in api.fine_tuning.jobs.checkpoints.list(job.id).data] == [120, 60]
        assert api.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    finally:
        embedded.stop()
