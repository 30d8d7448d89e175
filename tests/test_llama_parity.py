"""LlamaBackbone against transformers' LlamaForCausalLM: same weights, same logits, same tokens."""

import numpy as np
import pytest
import torch

from core.models import CausalLM
from plugins.llama import LlamaCausalLM
from tests.model_support import random_hf_llama, right_padded

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
    directory = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    hf.save_pretrained(directory)
    lm = CausalLM.from_preset(str(directory))
    lm.compile(sampler="greedy")
    return hf, lm


PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7], [1, 5, 6, 7, 8], [1, 200, 201, 202, 203, 204, 9]]


def test_loads_as_llama_without_tokenizer(pair):
    _, lm = pair
    assert isinstance(lm, LlamaCausalLM)
    assert lm.preprocessor is None


def test_logits_match_on_right_padded_batch(pair):
    hf, lm = pair
    ids, mask = right_padded(PROMPTS)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits.numpy()
    logits = lm.score(ids, mask).numpy()
    assert np.abs(logits - reference)[mask].max() <= 1e-4


def test_greedy_tokens_match_per_prompt(pair):
    hf, lm = pair
    prompt = PROMPTS[0]
    with torch.no_grad():
        reference = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)[0].tolist()
    ids, mask = right_padded([prompt])
    width = len(prompt) + 40
    ids, mask = np.pad(ids, ((0, 0), (0, 40))), np.pad(mask, ((0, 0), (0, 40)))
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][0].tolist() == reference
    assert out["padding_mask"][0].sum() == width


def test_greedy_tokens_match_for_batch_of_different_lengths(pair):
    hf, lm = pair
    new = 32
    # transformers pads on the left for generation; lmq takes right-padded prompts.
    width = max(len(p) for p in PROMPTS)
    left = np.zeros((len(PROMPTS), width), dtype="int64")
    left_mask = np.zeros_like(left)
    for i, p in enumerate(PROMPTS):
        left[i, width - len(p) :] = p
        left_mask[i, width - len(p) :] = 1
    with torch.no_grad():
        reference = hf.generate(
            torch.tensor(left), attention_mask=torch.tensor(left_mask), do_sample=False, max_new_tokens=new
        )[:, width:].tolist()
    ids, mask = right_padded(PROMPTS)
    ids, mask = np.pad(ids, ((0, 0), (0, width + new - ids.shape[1]))), np.pad(mask, ((0, 0), (0, width + new - mask.shape[1])))
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None, max_new_tokens=new)
    for i, prompt in enumerate(PROMPTS):
        assert out["token_ids"][i, len(prompt) : len(prompt) + new].tolist() == reference[i]
