"""Per-row logits processing (penalties, logit bias, min-p) and reported log-probabilities, checked
against transformers' logits processors, vLLM's documented penalty formula and transformers' logits."""

import shutil
from collections import Counter

import pytest
import torch

from lmq.core.models import CausalLM
from lmq.core.samplers.processing import BatchProcessing, RowProcessing
from lmq.plugins.llama import LlamaTokenizer
from model_support import random_hf_llama, train_sentencepiece

PROMPTS = ["Return the number", "Open", "A simple way to write the path of a file"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, the lmq task converted from it)."""
    directory = tmp_path_factory.mktemp("processing")
    spm = train_sentencepiece(directory / "spm")
    hf = random_hf_llama(vocab_size=LlamaTokenizer(proto=spm).vocabulary_size(), seed=5)
    hf.save_pretrained(directory / "model")
    shutil.copy(spm, directory / "model" / "tokenizer.model")
    lm = CausalLM.from_preset(str(directory / "model"))
    lm.compile(sampler="greedy")
    return hf, lm


def rows_of(sequences, starts):
    """The batch's per-row tensors that processing reads: request, sequence, start, length."""
    width = max(len(s) for s in sequences) + 1
    return {
        "request": torch.arange(len(sequences)),
        "sequence": torch.tensor([s + [0] * (width - len(s)) for s in sequences]),
        "start": torch.tensor(starts),
        "length": torch.tensor([len(s) for s in sequences]),
    }


def test_logit_bias_and_min_p_equal_transformers_processors():
    from transformers import MinPLogitsWarper, SequenceBiasLogitsProcessor, TemperatureLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    rows = rows_of([[1, 2, 3], [4, 5], [6]], [1, 1, 1])
    bias = {7: 5.0, 11: -3.5}
    processing = BatchProcessing(
        [RowProcessing(logit_bias=bias), RowProcessing(min_p=0.2), RowProcessing()], vocabulary_size=50
    )
    temperature = torch.tensor([1.0, 0.7, 1.0])
    adjusted, truncated = processing.process(rows, logits, temperature)

    input_ids = rows["sequence"]
    biased = SequenceBiasLogitsProcessor({(token,): value for token, value in bias.items()})(input_ids[:1], logits[:1])
    assert torch.allclose(adjusted[0], biased[0])
    warped = MinPLogitsWarper(0.2)(input_ids[1:2], TemperatureLogitsWarper(0.7)(input_ids[1:2], logits[1:2].clone()))
    assert torch.equal(torch.isinf(truncated[1]), torch.isinf(warped[0])) and torch.isinf(warped[0]).any()
    assert torch.equal(adjusted[1], logits[1]) and torch.equal(truncated[2], logits[2])


def test_presence_and_frequency_penalties_follow_vllm_s_formula_over_generated_tokens_only():
    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    sequences = [[9, 9, 4, 4, 4, 7], [9, 2, 2]]  # prompts [9, 9] and [9]: the prompt's tokens are not counted
    rows = rows_of(sequences, [2, 1])
    processing = BatchProcessing(
        [RowProcessing(presence_penalty=0.5, frequency_penalty=0.25), RowProcessing(frequency_penalty=-1.0)], 30
    )
    adjusted, _ = processing.process(rows, logits, torch.ones(2))
    for row, (sequence, start, presence, frequency) in enumerate(zip(sequences, [2, 1], [0.5, 0.0], [0.25, -1.0])):
        expected = logits[row].clone()
        for token, count in Counter(sequence[start:]).items():  # vLLM: logits -= presence * (count > 0) + frequency * count
            expected[token] -= presence + frequency * count
        assert torch.allclose(adjusted[row], expected)


def test_a_logit_bias_out_of_the_vocabulary_is_refused_naming_it():
    with pytest.raises(ValueError, match="token 64"):
        BatchProcessing([RowProcessing(logit_bias={64: 1.0})], vocabulary_size=64)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0, -1].double()


def test_penalised_greedy_rows_choose_as_transformers_logits_with_vllm_s_formula(pair):
    """Greedy with penalties and a bias, batched beside a plain row, equals a greedy loop over
    transformers' logits processed by hand; the plain row is unchanged."""
    hf, lm = pair
    new = 8
    settings = RowProcessing(presence_penalty=1.5, frequency_penalty=0.75, logit_bias={5: 2.0})
    out = lm.generate(
        PROMPTS[:2], max_new_tokens=new, stop_token_ids=None, return_details=True, processing=[settings, None]
    )
    prompt = lm.preprocessor.generate_preprocess([PROMPTS[0]])[0]
    ids = list(prompt)
    for _ in range(new):
        logits = hf_logits(hf, ids)
        logits[5] += 2.0
        for token, count in Counter(ids[len(prompt):]).items():
            logits[token] -= 1.5 + 0.75 * count
        ids.append(int(logits.argmax()))
    assert out[0].token_ids == ids[len(prompt):]
    assert out[1] == lm.generate(PROMPTS[1:2], max_new_tokens=new, stop_token_ids=None, return_details=True)[0]
    plain = lm.generate(PROMPTS[:1], max_new_tokens=new, stop_token_ids=None, return_details=True)[0]
    assert plain.token_ids != out[0].token_ids  # the penalties changed the tokens


def test_logprobs_equal_the_log_softmax_of_transformers_logits(pair):
    """The chosen token's and the top tokens' log-probabilities, of a greedy row and of a sampled
    row at temperature 1, equal log-softmax of transformers' logits within 1e-4."""
    hf, lm = pair
    out = lm.generate(
        PROMPTS,
        max_new_tokens=6,
        stop_token_ids=None,
        return_details=True,
        sampler=["greedy", {"name": "random", "temperature": 1.0}, "greedy"],
        seed=[0, 3, 0],
        processing=[RowProcessing(logprobs=5), RowProcessing(logprobs=0), None],
    )
    assert out[2].logprobs is None
    for row in (0, 1):
        prompt = lm.preprocessor.generate_preprocess([PROMPTS[row]])[0]
        ids = list(prompt) + out[row].token_ids
        assert len(out[row].logprobs) == len(out[row].token_ids)
        for step, reported in enumerate(out[row].logprobs):
            expected = torch.log_softmax(hf_logits(hf, ids[: len(prompt) + step]), dim=-1)
            assert reported.token_id == out[row].token_ids[step]
            assert abs(reported.logprob - float(expected[reported.token_id])) < 1e-4
            top_values, top_ids = expected.topk(5)
            assert len(reported.top) == (5 if row == 0 else 0)
            for (token, value), expected_value in zip(reported.top, top_values.tolist()):
                assert abs(value - expected_value) < 1e-4 and abs(value - float(expected[token])) < 1e-4
