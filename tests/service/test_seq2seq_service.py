"""Sequence-to-sequence jobs through the service, on a tiny random Bart preset: generate jobs
of `encoder_text` inputs and fit jobs of `encoder_text`/`decoder_text` rows, by `lmq generate`
and `lmq fit` (embedded), POST /v1/jobs (`lmq serve` alone) and a real Celery worker on Redis
and PostgreSQL, give what `Seq2SeqLM.generate` gives; inputs of the other task are refused."""

import json

import numpy as np
import pytest
from api_support import ApiServer, wait_for_job
from worker_support import broker, events, finished, results, submit, wait_for, workers  # noqa: F401  fixtures

from lmq.api.cli import main
from lmq.core.config import load_settings
from lmq.core.domain.jobs import create_fit_job
from lmq.core.store import queries, session_scope, sessions
from model_support import FIXTURES

TEXTS = [
    "Return the absolute value of a number.",
    "Open file and return a stream.",
    "The",
    "Create a new list from the items of an iterable, in the order that they are given.",
    "Raise an error.",
]
PAIRS = [
    {"encoder_text": "Return the number of items in a container.", "decoder_text": "Number of items."},
    {"encoder_text": "This class implements a queue of tasks.", "decoder_text": "A queue."},
] * 2
FIELDS = ("output", "prompt_tokens", "completion_tokens", "finish_reason")


@pytest.fixture(scope="module")
def bart_preset(tmp_path_factory):
    """KerasHub's tiny Bart with fresh random weights (its own answer only end tokens), sequences of 32."""
    from lmq.core.models import Seq2SeqLM

    lm = Seq2SeqLM.from_preset(str(FIXTURES / "bart"))
    rng = np.random.default_rng(0)
    for variable in lm.backbone.weights:
        scale = variable.path.endswith("gamma")
        variable.assign((scale + rng.normal(0.0, 0.1 if scale else 0.2, variable.shape)).astype("float32"))
    lm.preprocessor.encoder_sequence_length = lm.preprocessor.decoder_sequence_length = 32
    directory = tmp_path_factory.mktemp("bart") / "preset"
    lm.save_to_preset(str(directory))
    return directory


def reference(preset, texts, sampler="greedy", **arguments):
    """What `Seq2SeqLM.generate` gives `texts` together: the results a job must give."""
    from lmq.core.models import Seq2SeqLM

    lm = Seq2SeqLM.from_preset(str(preset))
    lm.compile(sampler=sampler)
    return [
        {"output": g.text, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
         "finish_reason": g.finish_reason}
        for g in lm.generate(texts, return_details=True, **arguments)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def encoder_inputs(texts):
    return [{"custom_id": f"s{i}", "encoder_text": text} for i, text in enumerate(texts)]


def picked(lines):
    return [{field: line[field] for field in FIELDS} for line in lines]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lmq_generate_runs_encoder_texts_as_seq2seq_lm_generate_does(lmq_home, tmp_path, bart_preset):
    source = write_jsonl(tmp_path / "in.jsonl", encoder_inputs(TEXTS))
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--preset", str(bart_preset), source, "-o", str(output), "--max-length", "12"]
    assert main([*argv, "--micro-batch-size", "2"]) == 0
    lines = read_lines(output)
    assert [line["custom_id"] for line in lines] == [f"s{i}" for i in range(len(TEXTS))]
    expected = reference(bart_preset, TEXTS, max_length=12)
    assert picked(lines) == expected
    assert all(line["error"] is None for line in lines)
    assert len({e["output"] for e in expected}) == len(TEXTS)  # the random weights answer each text its own way


def test_an_encoder_text_longer_than_the_encoder_sequence_is_truncated(lmq_home, tmp_path, bart_preset):
    """As KerasHub truncates it (end token kept): the text past 32 tokens changes nothing."""
    long = " ".join(TEXTS * 3)
    rows = [{"encoder_text": long}, {"encoder_text": long + " And a tail that is cut off."}]
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--preset", str(bart_preset), write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(output)]
    assert main([*argv, "--max-length", "12"]) == 0
    lines = read_lines(output)
    assert picked(lines) == reference(bart_preset, [long, long], max_length=12)
    assert lines[0]["output"] == lines[1]["output"] and lines[0]["error"] is None


def test_each_input_with_its_own_sampler_gets_what_it_would_alone(lmq_home, tmp_path, bart_preset):
    beam, top_k = {"name": "beam", "num_beams": 3}, {"name": "top_k", "k": 5}
    rows = [
        {"encoder_text": TEXTS[1], "params": {"sampler": beam}},
        {"encoder_text": TEXTS[0], "params": {"sampler": top_k, "seed": 4, "max_new_tokens": 6}},
        {"encoder_text": TEXTS[3]},
    ]
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--preset", str(bart_preset), write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(output)]
    assert main([*argv, "--max-length", "14"]) == 0
    expected = [
        *reference(bart_preset, [TEXTS[1]], beam, max_length=14),
        *reference(bart_preset, [TEXTS[0]], top_k, seed=4, max_new_tokens=6, max_length=14),
        *reference(bart_preset, [TEXTS[3]], max_length=14),
    ]
    assert picked(read_lines(output)) == expected
    assert expected[0] != reference(bart_preset, [TEXTS[1]], max_length=14)[0]  # beam search is not greedy here


@pytest.mark.parametrize(
    "command, rows, message",
    [
        ("generate", [{"prompt": "a causal LM's input"}],
         "in.jsonl line 1: 'prompt': preset {preset!r} is a sequence-to-sequence model: give 'encoder_text', "
         "not 'prompt'"),
        ("generate", [{"encoder_text": "fine"}, {"messages": [{"role": "user", "content": "hi"}]}],
         "in.jsonl line 2: 'messages': preset {preset!r} is a sequence-to-sequence model"),
        ("fit", [{"encoder_text": "q", "decoder_text": "a"}, {"text": "a causal LM's row"}],
         "in.jsonl line 2: 'text': preset {preset!r} is a sequence-to-sequence model: give 'encoder_text' and "
         "'decoder_text', not 'text'"),
        ("fit", [{"encoder_text": "q"}], "in.jsonl line 1: missing field 'decoder_text'"),
    ],
)
def test_inputs_a_seq2seq_preset_does_not_read_are_refused_naming_the_line(
    capsys, lmq_home, tmp_path, bart_preset, command, rows, message
):
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    extra = ["--output-preset", "never-made"] if command == "fit" else []
    with pytest.raises(SystemExit) as exit:
        main([command, "--preset", str(bart_preset), source, *extra])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(preset=str(bart_preset)) in err, err
    assert not lmq_home.exists()  # refused before the store was touched


def test_bart_fit_lowers_the_loss_and_the_next_job_uses_its_preset_by_name(lmq_home, tmp_path, bart_preset):
    train = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    argv = ["fit", "--preset", str(bart_preset), train, "--output-preset", "tuned-bart", "--epochs", "4",
            "--batch-size", "4", "--learning-rate", "0.01", "--sequence-length", "16"]
    assert main(argv) == 0
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        fit_job = queries.list_jobs(session, kind="fit")[0]
        losses = [e.data["loss"] for e in queries.job_events(session, fit_job.id) if e.type == "step"]
        tuned = queries.get_preset(session, "tuned-bart")
        path, architecture, parent = tuned.path, tuned.architecture, tuned.parent
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (architecture, parent) == ("bart", str(bart_preset))

    source = write_jsonl(tmp_path / "in.jsonl", encoder_inputs([pair["encoder_text"] for pair in PAIRS[:2]]))
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--preset", "tuned-bart", source, "-o", str(output), "--max-length", "10"]) == 0
    texts = [pair["encoder_text"] for pair in PAIRS[:2]]
    expected = reference(path, texts, max_length=10)
    assert picked(read_lines(output)) == expected
    assert expected != reference(bart_preset, texts, max_length=10)  # the tuned weights, not the base's


def test_the_http_api_runs_seq2seq_jobs_and_refuses_the_other_tasks_inputs(lmq_home, tmp_path, bart_preset):
    env = {"LMQ_HOME": str(lmq_home), "LMQ_PRESET_ROOTS": str(bart_preset.parent)}
    server = ApiServer(env, tmp_path / "server.log")
    preset = str(bart_preset)
    body = {"kind": "generate", "preset": preset, "inputs": encoder_inputs(TEXTS[:3]), "params": {"max_length": 12}}
    try:
        with server.client() as client:
            accepted = client.post("/v1/jobs", json=body)
            assert accepted.status_code == 202, accepted.text
            summary = wait_for_job(client, accepted.json()["id"], 120, [server.log])
            lines = [json.loads(line) for line in client.get(f"/v1/jobs/{summary['id']}/results").text.splitlines()]

            refused = client.post("/v1/jobs", json={**body, "inputs": [{"encoder_text": "a"}, {"prompt": "b"}]})
            fit = {"kind": "fit", "preset": preset, "training_data": [{"text": "x"}], "output_preset": "never-made"}
            refused_fit = client.post("/v1/jobs", json=fit)
            listed = client.get("/v1/jobs").json()["jobs"]
    finally:
        server.stop()
    assert summary["status"] == "succeeded" and summary["counts"]["completed"] == 3
    assert picked(lines) == reference(bart_preset, TEXTS[:3], max_length=12)
    assert refused.status_code == 422
    assert refused.json()["message"].startswith(
        f"inputs[1].prompt: preset {preset!r} is a sequence-to-sequence model: give 'encoder_text', not 'prompt'"
    )
    assert refused_fit.status_code == 422 and refused_fit.json()["message"].startswith("training_data[0].text: preset ")
    assert len(listed) == 1  # neither refusal left a job


def test_seq2seq_jobs_on_a_celery_worker(capsys, tmp_path, workers, bart_preset):
    """Redis + PostgreSQL + a real `lmq worker`: a generate job, a fit job, and a job on the fit's preset."""
    worker = workers()
    source = write_jsonl(tmp_path / "in.jsonl", encoder_inputs(TEXTS))
    job_id = submit(capsys, "generate", "--preset", str(bart_preset), source, "--max-length", "12",
                    "--micro-batch-size", "2")
    assert wait_for(lambda: finished(job_id), 180, "the generate job", [worker.log])["status"] == "succeeded"
    assert picked(results(job_id)) == reference(bart_preset, TEXTS, max_length=12)

    train = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    fit_id = submit(capsys, "fit", "--preset", str(bart_preset), train, "--output-preset", "worker-bart",
                    "--epochs", "3", "--batch-size", "4", "--learning-rate", "0.01", "--sequence-length", "16")
    summary = wait_for(lambda: finished(fit_id), 180, "the fit job", [worker.log])
    assert summary["status"] == "succeeded", summary
    losses = [step["loss"] for step in events(fit_id, "step")]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    tuned_id = submit(capsys, "generate", "--preset", "worker-bart", source, "--max-length", "12")
    assert wait_for(lambda: finished(tuned_id), 120, "the tuned job", [worker.log])["status"] == "succeeded"
    with session_scope(sessions(load_settings())) as session:
        path = queries.get_preset(session, "worker-bart").path
    assert picked(results(tuned_id)) == reference(path, TEXTS, max_length=12)


PAIR_FIELDS = "'encoder_text' and 'decoder_text'"


@pytest.mark.parametrize("causal", [True, False], ids=["pairs for a causal preset", "texts for a seq2seq preset"])
def test_a_fit_job_whose_rows_its_preset_cannot_read_fails_saying_so(lmq_home, bart_preset, tiny_llama_preset, causal):
    """Where submission could not tell (a preset only a worker sees, such as hf://), the runner does."""
    from lmq.workers.runner import JobRunner, pool_from_settings

    preset, rows = (tiny_llama_preset, PAIRS) if causal else (bart_preset, [{"text": "some text"}])
    settings = load_settings()
    with session_scope(sessions(settings)) as session:
        job_id = create_fit_job(
            session, preset=str(preset), training_data=rows, validation_data=None, hyperparameters={},
            output_preset="never-made",
        ).id
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "failed"
    with session_scope(sessions(settings)) as session:
        error = queries.get_job(session, job_id).error
        assert queries.get_preset(session, "never-made") is None
    if causal:
        assert error == f"ValueError: the preset is a LlamaCausalLM: its training rows give 'text', not {PAIR_FIELDS}"
    else:
        assert error == f"ValueError: the preset is a BartSeq2SeqLM: its training rows give {PAIR_FIELDS}, not 'text'"
