"""generate(): ragged batches, per-row stopping, stop strings, limits, streaming, details."""

import shutil

import numpy as np
import pytest

from lmq.core.models import CausalLM, Generation
from lmq.plugins.llama import LlamaTokenizer
from model_support import random_hf_llama, right_padded, train_sentencepiece

PROMPTS = ["Return the number", "Open", "A simple way to write the path of a file", "The"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen")
    spm = train_sentencepiece(directory / "spm")
    hf = random_hf_llama(vocab_size=LlamaTokenizer(proto=spm).vocabulary_size(), seed=3)
    hf.save_pretrained(directory / "model")
    shutil.copy(spm, directory / "model" / "tokenizer.model")
    lm = CausalLM.from_preset(str(directory / "model"))
    lm.compile(sampler="greedy")
    return lm


def _ids(lm, prompts, extra):
    rows = lm.preprocessor.generate_preprocess(prompts)
    ids, mask = right_padded(rows)
    return np.pad(ids, ((0, 0), (0, extra))), np.pad(mask, ((0, 0), (0, extra)))


def test_rows_that_stop_early_and_rows_that_run_to_the_limit(lm):
    """Each row of a batch equals that prompt generated alone, with its own stop and reason."""
    free = lm.generate(PROMPTS, max_length=40, stop_token_ids=None, return_details=True)
    # Stop on a token that rows 0 and 2 produce mid-way and rows 1 and 3 never produce.
    never = set(free[1].token_ids) | set(free[3].token_ids)
    stop = next(t for t in free[0].token_ids[3:] if t not in never)
    stop2 = next((t for t in free[2].token_ids[3:] if t not in never), stop)
    batch = lm.generate(PROMPTS, max_length=40, stop_token_ids=(stop, stop2), return_details=True)
    for i, prompt in enumerate(PROMPTS):
        alone = lm.generate([prompt], max_length=40, stop_token_ids=(stop, stop2), return_details=True)[0]
        assert batch[i] == alone
    assert batch[0].finish_reason == "stop" and batch[0].token_ids[-1] in (stop, stop2)
    assert batch[0].completion_tokens < free[0].completion_tokens
    assert batch[1].finish_reason == "length" and batch[1].token_ids == free[1].token_ids
    assert [g.prompt_tokens + g.completion_tokens for g in (batch[1], batch[3])] == [40, 40]


def test_max_new_tokens_caps_each_row(lm):
    out = lm.generate(PROMPTS, max_length=40, max_new_tokens=5, stop_token_ids=None, return_details=True)
    free = lm.generate(PROMPTS, max_length=40, stop_token_ids=None, return_details=True)
    for capped, full in zip(out, free):
        assert capped.completion_tokens == 5 and capped.finish_reason == "length"
        assert capped.token_ids == full.token_ids[:5]


def test_strip_prompt_returns_only_the_completion(lm):
    full = lm.generate(PROMPTS[0], max_length=20, stop_token_ids=None)
    completion = lm.generate(PROMPTS[0], max_length=20, stop_token_ids=None, strip_prompt=True)
    assert full.startswith(PROMPTS[0]) and not completion.startswith(PROMPTS[0])
    assert completion.strip() and completion.strip() in full


def test_stop_string_spanning_tokens_stops_there_and_is_cut(lm):
    tokenizer = lm.preprocessor.tokenizer
    free = lm.generate(PROMPTS[2], max_length=60, stop_token_ids=None, strip_prompt=True, return_details=True)
    pieces = [tokenizer.detokenize(free.token_ids[:n]) for n in range(len(free.token_ids) + 1)]
    # A stop string made of the last 2 characters of token 4's text and the first 2 of token 5's.
    end4 = len(pieces[4])
    stop = free.text[end4 - 2 : end4 + 2]
    assert len(stop) == 4 and stop not in pieces[4]
    first = free.text.find(stop)
    out = lm.generate(PROMPTS[2], max_length=60, stop_token_ids=None, strip_prompt=True, stop=[stop], return_details=True)
    assert out.finish_reason == "stop"
    assert out.text == free.text[:first]
    # It stopped at the first token whose text completes the stop string, not later.
    stop_token = next(n for n in range(len(pieces)) if stop in pieces[n])
    assert out.completion_tokens == stop_token
    assert out.token_ids == free.token_ids[:stop_token]


def test_stop_string_keeps_the_prompt_when_not_stripped(lm):
    free = lm.generate(PROMPTS[0], max_length=40, stop_token_ids=None, strip_prompt=True)
    stop = free.strip()[3:6]
    out = lm.generate(PROMPTS[0], max_length=40, stop_token_ids=None, stop=[stop])
    assert out.startswith(PROMPTS[0]) and stop not in out[len(PROMPTS[0]) :]


def test_stream_receives_every_new_token_in_order(lm):
    seen = {}
    out = lm.generate(
        PROMPTS, max_length=30, max_new_tokens=8, stop_token_ids=None, return_details=True,
        stream=lambda row, token: seen.setdefault(row, []).append(token),
    )
    assert {row: tokens for row, tokens in seen.items()} == {i: g.token_ids for i, g in enumerate(out)}


def test_details_are_generation_records(lm):
    out = lm.generate(PROMPTS[:2], max_length=24, return_details=True)
    assert all(isinstance(g, Generation) for g in out)
    assert [g.prompt_tokens for g in out] == [len(r) for r in lm.preprocessor.generate_preprocess(PROMPTS[:2])]


def test_token_id_inputs_without_preprocessor(lm):
    ids, mask = _ids(lm, PROMPTS, 10)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    texts = lm.generate(PROMPTS, max_length=ids.shape[1], stop_token_ids=None, return_details=True)
    for i, g in enumerate(texts):
        n = g.prompt_tokens
        assert out["token_ids"][i, n : n + g.completion_tokens].tolist() == g.token_ids
        assert out["padding_mask"][i].sum() == n + g.completion_tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_length=0), "max_length"),
        (dict(max_length=40, max_new_tokens=-1), "max_new_tokens"),
        (dict(max_length=40, stop_token_ids="end"), "stop_token_ids"),
    ],
)
def test_bad_arguments_are_named(lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lm.generate(PROMPTS, **kwargs)


def test_left_padded_ids_are_refused(lm):
    ids, mask = _ids(lm, PROMPTS, 4)
    with pytest.raises(ValueError, match="right-padded"):
        lm.generate({"token_ids": ids, "padding_mask": mask[:, ::-1]})


@pytest.mark.parametrize("sampler", ["beam", "contrastive"])
def test_stop_strings_and_stream_with_search_samplers(lm, sampler):
    """Beam search picks its sequence at the end, contrastive search token by token: either
    way a stop string cuts the sequence the search finds, and stream gets exactly that."""
    lm.compile(sampler=sampler)
    try:
        free = lm.generate(PROMPTS[0], max_length=30, stop_token_ids=None, strip_prompt=True, return_details=True)
        stop = free.text.strip()[2:5]
        seen = []
        out = lm.generate(
            PROMPTS[0], max_length=30, stop_token_ids=None, strip_prompt=True, stop=[stop],
            return_details=True, stream=lambda row, token: seen.append(token),
        )
    finally:
        lm.compile(sampler="greedy")
    assert out.finish_reason == "stop" and stop not in out.text
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(free.token_ids)
    assert seen == out.token_ids


def test_per_prompt_stops_in_one_call_give_each_prompt_what_it_gives_alone(lm):
    """``stop`` and ``stop_token_ids`` with one value per prompt: each row stops at its own (some at
    none), in one pass of two rows at a time, as that prompt does alone with its stops."""
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    free = lm.generate(prompts, max_length=40, stop_token_ids=None, strip_prompt=True, return_details=True)
    stops = [[g.text.strip()[2:4]] for g in free[:4]] + [None, [], [free[6].text.strip()[:2], "zz", "q", "xy"], None]
    stop_ids = [None, "auto", (free[2].token_ids[3],), None, (free[4].token_ids[2],), None, None, ()]
    arguments = dict(max_length=40, strip_prompt=True, return_details=True)
    together = lm.generate(prompts, stop=stops, stop_token_ids=stop_ids, max_rows=2, **arguments)
    for i, prompt in enumerate(prompts):
        assert together[i] == lm.generate(prompt, stop=stops[i], stop_token_ids=stop_ids[i], **arguments)
    assert [g.finish_reason for g in together].count("stop") >= 4
    assert together[7] == free[7]  # no stops: the row runs to its limit


def test_continuous_batching_gives_each_prompt_its_tokens_alone(lm):
    """Two rows in flight, eight prompts of mixed lengths: rows leave on a stop token, a
    stop string or their own max_new_tokens, waiting prompts take their places, and
    every row's output equals that prompt generated alone."""
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    free = lm.generate(prompts[:1], max_length=40, stop_token_ids=None, return_details=True)[0]
    stop_token = free.token_ids[3]
    stop_string = lm.preprocessor.tokenizer.detokenize(free.token_ids[5:7]).strip()[:3]
    limits = [12, 3, 9, 0, 7, 12, 5, 10]
    arguments = dict(max_length=40, stop_token_ids=(stop_token,), stop=[stop_string], return_details=True)
    finished = []
    joined = lm.generate(
        prompts, max_new_tokens=limits, max_rows=2, on_result=lambda row, g: finished.append((row, g)), **arguments
    )
    for i, prompt in enumerate(prompts):
        alone = lm.generate(prompt, max_new_tokens=limits[i], **arguments)
        assert joined[i] == alone
        assert joined[i].completion_tokens <= limits[i]
    assert {"stop", "length"} <= {g.finish_reason for g in joined}
    # Each result came out once, as its row finished, before the call returned; not in prompt order.
    assert sorted(row for row, _ in finished) == list(range(len(prompts)))
    assert all(joined[row] == g for row, g in finished)
    assert [row for row, _ in finished] != list(range(len(prompts)))


def test_the_cache_token_budget_bounds_the_rows_in_flight(lm):
    """A budget of 70 cache positions holds one request of 40 positions at a time: the rows
    never overlap, and the tokens are those of the batch without a budget."""
    together = lm.generate(PROMPTS, max_length=40, stop_token_ids=None, return_details=True)
    seen = []
    budgeted = lm.generate(
        PROMPTS, max_length=40, stop_token_ids=None, return_details=True, max_cache_tokens=70,
        stream=lambda row, token: seen.append(row),
    )
    assert budgeted == together
    runs = [row for n, row in enumerate(seen) if n == 0 or seen[n - 1] != row]
    assert len(runs) == len(PROMPTS)  # one row at a time: each row's tokens in one run


def test_a_per_row_max_new_tokens_list_must_fit_the_prompts(lm):
    with pytest.raises(ValueError, match="max_new_tokens has 2 values for 4 prompts"):
        lm.generate(PROMPTS, max_length=40, max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        lm.generate(PROMPTS, max_length=40, max_new_tokens=[3, 4, -1, 2])
