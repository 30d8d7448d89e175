"""One token sampler per request (core.samplers.PerRequestSampler): rows with different
samplers, temperatures and seeds decode in one batch, each giving what it gives alone;
a job whose items differ in their samplers runs them in one pass of the decode engine."""

import pytest

import lmq.core.models.generative_task
from lmq.core.generation import DecoderOnlyModel, decode
from lmq.core.samplers import (
    BeamSampler,
    GreedySampler,
    PerRequestSampler,
    RandomSampler,
    TopKSampler,
    TopPSampler,
)
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from lmq.plugins.llama.llama_causal_lm import LlamaCausalLM
from tests.service.test_item_params import FIELDS, PROMPTS, run_job
from tests.library.test_samplers import PROMPTS as ID_PROMPTS
from model_support import random_weights
from tests.library.test_samplers import SIZES, STOP, generate

SAMPLERS = [
    GreedySampler(),
    TopKSampler(k=3, temperature=0.7),
    TopKSampler(k=3, temperature=1.5),
    TopKSampler(k=5),
    TopPSampler(p=0.8, temperature=0.6),
    TopPSampler(p=0.9, k=4, temperature=1.2),
    RandomSampler(temperature=0.5),
    RandomSampler(temperature=2.0),
]


@pytest.fixture(scope="module")
def lm():
    return LlamaCausalLM(random_weights(LlamaBackbone(**SIZES)))


@pytest.fixture(scope="module")
def model(lm):
    return DecoderOnlyModel(lm.backbone)


def alone(model, prompts, limits, samplers, seeds, stop_token_ids=(STOP,)):
    return [
        decode(model, [p], [n], s, stop_token_ids=stop_token_ids, seeds=[seed]).completions[0]
        for p, n, s, seed in zip(prompts, limits, samplers, seeds)
    ]


def test_rows_of_one_prompt_and_seed_follow_their_own_samplers(model):
    """Same prompt, same seed: only its sampler tells one row from another, and each row is
    what its sampler gives it alone - in one batch, and joining a running batch of three."""
    prompts, limits, seeds = [ID_PROMPTS[0]] * len(SAMPLERS), [10] * len(SAMPLERS), [7] * len(SAMPLERS)
    expected = alone(model, prompts, limits, SAMPLERS, seeds, stop_token_ids=())
    for max_rows in (None, 3):
        mixed = decode(model, prompts, limits, PerRequestSampler(SAMPLERS), seeds=seeds, max_rows=max_rows)
        assert mixed.completions == expected
    assert len({tuple(c) for c in expected}) >= 5  # the samplers, not the prompt, make the rows


def test_a_seeded_row_gives_what_it_gives_alone_whatever_its_neighbours(model):
    prompts = (ID_PROMPTS * 2)[: len(SAMPLERS)]
    limits = [6, 0, 4, 8, 3, 9, 7, 5]
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    expected = alone(model, prompts, limits, SAMPLERS, seeds)
    mixed = decode(model, prompts, limits, PerRequestSampler(SAMPLERS), stop_token_ids=[STOP], seeds=seeds)
    assert mixed.completions == expected
    # Other neighbours (reversed, another sampler each, two at a time) change no row.
    order = list(range(len(SAMPLERS)))[::-1]
    shuffled = decode(model, [prompts[i] for i in order], [limits[i] for i in order],
                      PerRequestSampler([SAMPLERS[i] for i in order]), stop_token_ids=[STOP],
                      seeds=[seeds[i] for i in order], max_rows=2)
    assert shuffled.completions == [expected[i] for i in order]
    assert {"stop", "length"} <= set(mixed.finish_reasons)


def test_unseeded_narrow_rows_are_greedy_beside_sampled_ones(model):
    """Without seeds the rows of one kind draw together; a top-k 1 row at any temperature or a
    tiny-p row is still greedy search, its neighbours sampling at other settings."""
    narrow = [GreedySampler(), TopKSampler(k=1, temperature=3.0), TopPSampler(p=1e-6, temperature=0.2)]
    wide = [RandomSampler(temperature=2.0), TopPSampler(p=0.95, temperature=1.5)]
    samplers = [narrow[0], wide[0], narrow[1], wide[1], narrow[2]]
    prompts = ID_PROMPTS + ID_PROMPTS[:1]
    limits = [6, 6, 6, 6, 6]
    greedy = decode(model, prompts, limits, GreedySampler(), stop_token_ids=[STOP]).completions
    mixed = decode(model, prompts, limits, PerRequestSampler(samplers), stop_token_ids=[STOP]).completions
    assert [mixed[i] for i in (0, 2, 4)] == [greedy[i] for i in (0, 2, 4)]


def test_compile_takes_a_sampler_per_prompt_with_their_seeds(lm):
    own = [TopKSampler(k=4, seed=3), TopPSampler(p=0.9, temperature=1.7, seed=4), GreedySampler(),
           RandomSampler(seed=6)]
    prompts = ID_PROMPTS
    expected = [generate(lm, s, prompts=[p], new_tokens=8)[0] for p, s in zip(prompts, own)]
    assert generate(lm, own, prompts=prompts, new_tokens=8) == expected  # the samplers' own seeds
    named = ["greedy", {"name": "top_k", "k": 4}, {"name": "random", "temperature": 0.5}, "top_p"]
    by_name = generate(lm, named, prompts=prompts, new_tokens=8, seed=[1, 2, 3, 4])
    assert by_name[0] == generate(lm, "greedy", prompts=prompts[:1], new_tokens=8)[0]
    for i in (1, 2, 3):
        assert by_name[i] == generate(lm, named[i], prompts=[prompts[i]], new_tokens=8, seed=i + 1)[0]


def test_a_search_or_a_missing_sampler_is_refused_by_name(lm):
    with pytest.raises(ValueError, match="request 1's is 'beam'"):
        lm.compile(sampler=["greedy", BeamSampler(num_beams=2)])
    with pytest.raises(ValueError, match="2 samplers; prompt 3 has none"):
        generate(lm, ["greedy", "top_k"], prompts=ID_PROMPTS)


def test_a_job_of_different_samplers_runs_them_in_one_pass(lmq_home, tiny_llama_preset, monkeypatch):
    """Items with their own samplers, temperatures and seeds (an OpenAI batch's lines) run in
    one call of the decode engine, each giving what `generate` gives it alone, an item with its
    own stops among them; a beam search runs apart."""
    calls = []  # (prompts, sampler) of each pass

    def spy(model, prompts, limits, sampler, **kwargs):
        calls.append((len(prompts), type(sampler).__name__))
        return decode(model, prompts, limits, sampler, **kwargs)

    monkeypatch.setattr(lmq.core.models.generative_task, "decode", spy)
    token_samplers = [
        "greedy",
        {"name": "random", "temperature": 0.6},
        {"name": "top_p", "p": 0.9, "temperature": 1.3},
        {"name": "top_k", "k": 5, "temperature": 0.8},
        {"name": "random", "temperature": 1.7},
    ]
    inputs = [{"prompt": p, "params": {"sampler": s, "seed": 20 + i}}
              for i, (p, s) in enumerate(zip(PROMPTS, token_samplers))]
    inputs.append({"prompt": PROMPTS[5], "params": {"sampler": {"name": "beam", "num_beams": 2}}})
    inputs.append({"prompt": PROMPTS[0], "params": {"sampler": "random", "seed": 9, "stop": ["e"]}})
    lines, summary = run_job(tiny_llama_preset, inputs, max_length=40, micro_batch_size=3)
    assert summary["counts"] == {"total": 7, "completed": 7, "failed": 0}
    assert sorted(calls) == [(1, "BeamSampler"), (6, "PerRequestSampler")]

    from lmq.core.models import CausalLM

    lm = CausalLM.from_preset(str(tiny_llama_preset))
    calls.clear()

    def by_itself(prompt, sampler, **arguments):
        lm.compile(sampler=sampler)
        generation = lm.generate(prompt, return_details=True, max_length=40, **arguments)
        return {"output": generation.text, "completion_tokens": generation.completion_tokens,
                "finish_reason": generation.finish_reason}

    expected = [by_itself(p, s, seed=20 + i) for i, (p, s) in enumerate(zip(PROMPTS, token_samplers))]
    expected.append(by_itself(PROMPTS[5], {"name": "beam", "num_beams": 2}))
    expected.append(by_itself(PROMPTS[0], "random", seed=9, stop=["e"]))
    assert [{field: line[field] for field in FIELDS} for line in lines] == expected
    assert len({e["output"] for e in expected[1:5]}) == 4  # the items' samplers took effect


def test_a_seq2seq_model_takes_a_sampler_per_prompt():
    """KerasHub's Bart preset: each encoder text decodes with its own sampler and seed as it does alone."""
    from lmq.core.models import Seq2SeqLM
    from model_support import FIXTURES, fixture_expected

    bart = Seq2SeqLM.from_preset(str(FIXTURES / "bart"))
    first, second = fixture_expected("bart")["inputs"]
    texts = [first, second, first]
    own = [{"name": "random", "temperature": 0.7}, "greedy", {"name": "top_p", "p": 0.95, "temperature": 1.4}]
    options = dict(max_length=12, stop_token_ids=None, return_details=True)
    expected = []
    for text, sampler, seed in zip(texts, own, (3, 4, 5)):
        bart.compile(sampler=sampler)
        expected.append(bart.generate(text, seed=seed, **options).token_ids)
    bart.compile(sampler=own)
    assert [g.token_ids for g in bart.generate(texts, seed=[3, 4, 5], **options)] == expected
    assert expected[0] != expected[2]
