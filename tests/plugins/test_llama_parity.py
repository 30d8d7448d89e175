"""LlamaBackbone against transformers' LlamaForCausalLM: same weights, same logits, same tokens."""

import pytest

from lmq.plugins.llama import LlamaCausalLM
from model_support import (
    hf_greedy,
    lmq_greedy,
    max_logit_difference,
    padded_for_generation,
    random_hf_llama,
    transformers_pair,
)

CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4),
    "gqa_untied": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3.1_rope": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, lmq task loaded from its save_pretrained directory)."""
    hf = random_hf_llama(seed=len(request.param), **CONFIGS[request.param])
    return transformers_pair(hf, tmp_path_factory.mktemp(request.param.replace(".", "_")))


PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7], [1, 5, 6, 7, 8], [1, 200, 201, 202, 203, 204, 9]]


def test_loads_as_llama_without_tokenizer(pair):
    _, lm = pair
    assert isinstance(lm, LlamaCausalLM)
    assert lm.preprocessor is None


def test_logits_match_on_right_padded_batch(pair):
    assert max_logit_difference(*pair, PROMPTS) <= 1e-4


def test_greedy_tokens_match_per_prompt(pair):
    """The whole row comes back: prompt, then 40 tokens, all marked in padding_mask."""
    hf, lm = pair
    prompt = PROMPTS[0]
    ids, mask = padded_for_generation([prompt], 40)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][0].tolist() == prompt + hf_greedy(hf, [prompt], 40)[0]
    assert out["padding_mask"][0].sum() == len(prompt) + 40


def test_greedy_tokens_match_for_batch_of_different_lengths(pair):
    """transformers pads the batch on the left for generation; lmq takes it right-padded."""
    hf, lm = pair
    assert lmq_greedy(lm, PROMPTS, 32) == hf_greedy(hf, PROMPTS, 32)
