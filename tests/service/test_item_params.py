"""Per-item inputs of a generate job (workers/inputs.py): each item's own max_new_tokens,
sampler, seed and stops, in one job on a tiny real model, give what `CausalLM.generate`
gives that item alone; an item that cannot run is its own error and the others run."""

import shutil

import pytest

from lmq.api.schemas import result_line
from lmq.core.domain.jobs import job_summary
from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions
from lmq.workers.runner import JobRunner, pool_from_settings

PROMPTS = [
    "Return the absolute value",
    "The",
    "Create a new list from the items",
    "Open file and return a stream",
    "Raise",
    "Return a copy of the string",
]
FIELDS = ("output", "completion_tokens", "finish_reason")


def run_job(preset, inputs, **params):
    settings = load_settings()
    factory = sessions(settings)
    with session_scope(factory) as session:
        job_id = queries.create_generate_job(session, preset=str(preset), inputs=inputs, params=params).id
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    with session_scope(factory) as session:
        return [result_line(item) for item in queries.job_items(session, job_id)], job_summary(
            queries.get_job(session, job_id)
        )


@pytest.fixture(scope="module")
def alone(tiny_llama_preset):
    """What `generate` gives one prompt, by itself, with a sampler and arguments."""
    from lmq.core.models import CausalLM

    lm = CausalLM.from_preset(str(tiny_llama_preset))

    def generate(prompt, sampler="greedy", **arguments):
        lm.compile(sampler=sampler)
        generation = lm.generate(prompt, return_details=True, max_length=40, **arguments)
        return {"output": generation.text, "completion_tokens": generation.completion_tokens,
                "finish_reason": generation.finish_reason}

    return generate


def test_items_with_their_own_params_share_a_job(lmq_home, tiny_llama_preset, alone):
    top_k = {"name": "top_k", "k": 5, "temperature": 1.5}
    top_p = {"name": "top_p", "p": 0.9, "seed": 3}  # seeded by its own seed
    inputs = [
        {"custom_id": "short", "prompt": PROMPTS[0], "params": {"max_new_tokens": 3}},
        {"custom_id": "top_k", "prompt": PROMPTS[1], "params": {"sampler": top_k, "seed": 11, "max_new_tokens": 8}},
        {"custom_id": "random", "prompt": PROMPTS[2], "params": {"sampler": "random", "seed": 5}},
        {"custom_id": "job's", "prompt": PROMPTS[3]},
        {"custom_id": "stop", "prompt": PROMPTS[4], "params": {"stop": ["e"], "stop_token_ids": []}},
        {"custom_id": "sampler seed", "prompt": PROMPTS[5], "params": {"sampler": top_p}},
    ]
    lines, summary = run_job(tiny_llama_preset, inputs, max_length=40, micro_batch_size=4)
    expected = [
        alone(PROMPTS[0], max_new_tokens=3),
        alone(PROMPTS[1], top_k, seed=11, max_new_tokens=8),
        alone(PROMPTS[2], "random", seed=5),
        alone(PROMPTS[3]),
        alone(PROMPTS[4], stop=["e"], stop_token_ids=[]),
        alone(PROMPTS[5], top_p),
    ]
    assert [{field: line[field] for field in FIELDS} for line in lines] == expected
    assert summary["counts"] == {"total": 6, "completed": 6, "failed": 0}
    # The settings took effect: the job's greedy default would have given other outputs.
    assert expected[0]["completion_tokens"] == 3 and expected[0] != alone(PROMPTS[0])
    assert expected[1] != alone(PROMPTS[1], max_new_tokens=8)
    assert expected[4] != alone(PROMPTS[4], stop_token_ids=[])


def test_results_show_every_choice_and_its_log_probabilities(lmq_home, tiny_llama_preset, alone):
    """An item with `n` choices or `logprobs` has them all in its results line (`output` is the
    first choice's text); a plain item's `choices` is null."""
    inputs = [
        {"prompt": PROMPTS[0]},
        {"prompt": PROMPTS[1], "params": {"n": 2, "sampler": "random", "seed": 4, "max_new_tokens": 5}},
        {"prompt": PROMPTS[2], "params": {"logprobs": 2, "max_new_tokens": 4}},
    ]
    (plain, two, scored), _ = run_job(tiny_llama_preset, inputs, max_length=40)
    assert plain["choices"] is None and plain["output"] == alone(PROMPTS[0])["output"]
    # choice i is seeded seed + i, as the OpenAI batch lines' choices are
    made = [alone(PROMPTS[1], "random", seed=4 + i, max_new_tokens=5) for i in range(2)]
    assert [choice["text"] for choice in two["choices"]] == [one["output"] for one in made]
    assert two["output"] == made[0]["output"] and two["completion_tokens"] == 10
    [choice] = scored["choices"]
    assert choice["text"] == scored["output"] == alone(PROMPTS[2], max_new_tokens=4)["output"]
    assert len(choice["logprobs"]) == scored["completion_tokens"] == 4
    for entry in choice["logprobs"]:  # greedy: the chosen token is the most likely
        assert len(entry["top"]) == 2 and entry["top"][0] == [entry["token"], entry["logprob"]]
        assert entry["logprob"] <= 0 and entry["top"][1][1] <= entry["logprob"]


def test_items_that_differ_in_their_stops_run_in_one_engine_pass(lmq_home, tiny_llama_preset, alone):
    """Stop strings (up to 4, or none) and stop_token_ids of each item's own: one run of the engine
    (one `decode` event), each item's output what it gives alone with its stops."""
    params = [{"stop": ["e"]}, {"stop": ["a", "o", "xyz", "n"], "stop_token_ids": []}, {},
              {"stop_token_ids": []}, {"stop": [" "]}, {"stop": ["e"], "stop_token_ids": []}]
    inputs = [{"prompt": prompt, "params": own} for prompt, own in zip(PROMPTS, params)]
    settings = load_settings()
    factory = sessions(settings)
    with session_scope(factory) as session:
        job_id = queries.create_generate_job(
            session, preset=str(tiny_llama_preset), inputs=inputs, params={"max_length": 40}
        ).id
    assert JobRunner(settings, pool_from_settings(settings)).run(job_id) == "succeeded"
    with session_scope(factory) as session:
        lines = [result_line(item) for item in queries.job_items(session, job_id)]
        decodes = [event.data for event in queries.job_events(session, job_id) if event.type == "decode"]
    assert decodes == [{"rows": 6, "formats": 0}]
    expected = [alone(prompt, **own) for prompt, own in zip(PROMPTS, params)]
    assert [{field: line[field] for field in FIELDS} for line in lines] == expected
    assert expected[0] != alone(PROMPTS[0]) and expected[1] != alone(PROMPTS[1], stop_token_ids=[])


def test_the_jobs_seed_goes_by_index_beside_items_seeded_their_own_way(lmq_home, tiny_llama_preset, alone):
    inputs = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "params": {"seed": 100}}, {"prompt": PROMPTS[2]}]
    lines, _ = run_job(tiny_llama_preset, inputs, max_length=40, sampler="random", seed=7, micro_batch_size=2)
    expected = [alone(PROMPTS[0], "random", seed=7), alone(PROMPTS[1], "random", seed=100),
                alone(PROMPTS[2], "random", seed=9)]
    assert [{field: line[field] for field in FIELDS} for line in lines] == expected


def test_an_item_that_cannot_run_is_its_own_error(lmq_home, tiny_llama_preset, alone):
    inputs = [
        {"custom_id": "fine", "prompt": PROMPTS[0]},
        {"custom_id": "seq2seq", "encoder_text": "Summarise this."},
        {"custom_id": "unknown", "prompt": PROMPTS[1], "params": {"temperature": 0.5}},
        {"custom_id": "bad stop", "prompt": PROMPTS[2], "params": {"stop": "e"}},
        {"custom_id": "also fine", "prompt": PROMPTS[3], "params": {"max_new_tokens": 2}},
    ]
    lines, summary = run_job(tiny_llama_preset, inputs, max_length=40)
    fine, seq2seq, unknown, bad_stop, also_fine = lines
    assert {field: fine[field] for field in FIELDS} == alone(PROMPTS[0])
    assert {field: also_fine[field] for field in FIELDS} == alone(PROMPTS[3], max_new_tokens=2)
    assert seq2seq["output"] is None
    assert seq2seq["error"] == (
        "input 1 (custom_id 'seq2seq'): the model is a causal LM: give 'prompt', not 'encoder_text'"
    )
    assert unknown["error"].startswith("input 2 (custom_id 'unknown'): 'params' takes ")
    assert "temperature" in unknown["error"]
    assert bad_stop["error"] == "input 3 (custom_id 'bad stop'): 'stop' must be a list of strings, got 'e'"
    assert summary["counts"] == {"total": 5, "completed": 2, "failed": 3}


def test_a_job_leaves_the_pooled_model_as_it_was_loaded(lmq_home, tiny_llama_preset, monkeypatch):
    """The runner gives each `generate` call its samplers (a per-request list, a search) and
    never compiles the pooled model: its default sampler and its unbuilt optimizer stay."""
    settings = load_settings()
    runner = JobRunner(settings, pool_from_settings(settings))
    lm = runner.pool.get(runner.locate(str(tiny_llama_preset))).model
    sampler, optimizer = lm.sampler, lm.optimizer
    compiled = []
    monkeypatch.setattr(type(lm), "compile", lambda self, *args, **kwargs: compiled.append(kwargs))
    inputs = [
        {"prompt": PROMPTS[0], "params": {"sampler": {"name": "top_k", "k": 5}, "seed": 1}},
        {"prompt": PROMPTS[1], "params": {"sampler": "random", "seed": 2}},
        {"prompt": PROMPTS[2], "params": {"sampler": {"name": "beam", "num_beams": 2}}},
    ]
    factory = sessions(settings)
    with session_scope(factory) as session:
        job_id = queries.create_generate_job(session, preset=str(tiny_llama_preset), inputs=inputs,
                                             params={"max_length": 40}).id
    assert runner.run(job_id) == "succeeded"
    assert (runner.pool.hits, runner.pool.misses) == (1, 1)  # the job ran on this model
    assert compiled == []
    assert lm.sampler is sampler and lm.optimizer is optimizer and not optimizer.built


TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_messages_run_through_the_presets_template(lmq_home, tmp_path, tiny_llama_preset):
    from lmq.core.chat import chat_token_ids, end_of_turn_token_ids, render_chat
    from lmq.core.models import CausalLM

    chat_preset = tmp_path / "chat-preset"
    shutil.copytree(tiny_llama_preset, chat_preset)
    (chat_preset / "chat_template.jinja").write_text(TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Open a file"}]
    inputs = [
        {"custom_id": "chat", "messages": messages, "params": {"max_new_tokens": 6}},
        {"custom_id": "plain", "prompt": PROMPTS[0]},
        {"custom_id": "bad", "messages": [{"role": "user"}]},
    ]
    lines, summary = run_job(chat_preset, inputs, max_length=40)
    lm = CausalLM.from_preset(str(chat_preset))
    lm.compile(sampler="greedy")
    tokenizer = lm.preprocessor.tokenizer
    assert render_chat(tokenizer, messages) == "<system>Be brief.\n<user>Open a file\n<assistant>"
    chat = lm.generate([chat_token_ids(tokenizer, messages)], max_length=40, max_new_tokens=6, stop_token_ids=end_of_turn_token_ids(tokenizer),
                       return_details=True)[0]
    assert (lines[0]["output"], lines[0]["completion_tokens"]) == (chat.text, chat.completion_tokens)
    assert lines[1]["output"] == lm.generate(PROMPTS[0], max_length=40)
    assert lines[2]["output"] is None
    assert lines[2]["error"] == "input 2 (custom_id 'bad'): messages[0] has no 'content'."
    assert summary["counts"] == {"total": 3, "completed": 2, "failed": 1}

    # A preset without a chat template: the chat input fails alone, naming why.
    lines, _ = run_job(tiny_llama_preset, inputs[:2], max_length=40)
    assert "has no chat template" in lines[0]["error"] and lines[1]["error"] is None


@pytest.mark.parametrize(
    "params, field",
    [
        ({"sampler": {"name": "top_p", "p": 1.5}}, "inputs[1].params.sampler.p"),
        ({"max_new_tokens": 0}, "inputs[1].params.max_new_tokens"),
        ({"seed": -1}, "inputs[1].params.seed"),
        ({"stop": "not a list"}, "inputs[1].params.stop"),
        ({"temperature": 0.5}, "inputs[1].params.temperature"),  # job-only or unknown keys are refused
        ({"max_length": 5}, "inputs[1].params.max_length"),
    ],
)
def test_an_inputs_params_are_checked_as_the_jobs_are(params, field):
    from pydantic import ValidationError

    from lmq.core.domain.requests import field_name, parse_job, problems
    from lmq.core.config import Limits

    body = {"kind": "generate", "preset": "x", "inputs": [{"prompt": "a"}, {"prompt": "b", "params": params}]}
    with pytest.raises(ValidationError) as error:
        parse_job(body, Limits())
    assert [field_name(problem["loc"]) for problem in problems(error.value.errors())] == [field]
