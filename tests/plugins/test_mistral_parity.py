"""MistralBackbone against transformers' MistralForCausalLM, with windows shorter than the sequence.

Same weights, same logits, same greedy tokens, including generations that run
far past the window (where lmq's rolling KV cache overwrites old keys).
"""

import pytest
import torch

from lmq.core.layers import KVCache, RollingKVCache
from lmq.plugins.mistral import MistralCausalLM
from model_support import (
    hf_greedy,
    padded_for_generation,
    random_transformers_lm,
    right_padded,
    transformers_pair,
)

SIZES = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "gqa_window_8": dict(num_key_value_heads=2, sliding_window=8),
    "mqa_window_5_head_dim_24": dict(num_key_value_heads=1, sliding_window=5, head_dim=24),
    "linear_rope_window_6": dict(
        num_key_value_heads=2, sliding_window=6, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    ),
    "no_window": dict(num_key_value_heads=4, sliding_window=None),
}
PROMPTS = [
    [1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7, 81, 82, 83, 84, 90, 91, 92, 93, 94],
    [1, 5, 6, 7, 8],
    [1, 200, 201, 202, 203, 204, 9, 10, 11, 12, 13],
]


def random_hf_mistral(seed, **overrides):
    """Random weights, peaked enough (initializer_range) for a stable argmax."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**SIZES, initializer_range=0.15, rms_norm_eps=1e-5, attn_implementation="eager", **overrides)
    return random_transformers_lm(MistralForCausalLM, config, seed)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, lmq task loaded from its save_pretrained directory)."""
    hf = random_hf_mistral(seed=len(request.param), **CONFIGS[request.param])
    return transformers_pair(hf, tmp_path_factory.mktemp(request.param))


def test_loads_as_mistral_with_its_window(pair):
    hf, lm = pair
    assert isinstance(lm, MistralCausalLM)
    assert lm.backbone.sliding_window == hf.config.sliding_window
    assert lm.backbone.head_dim == hf.config.head_dim


def test_logits_match_on_right_padded_batch(pair):
    """Prompts of 20, 5 and 11 tokens: the windows (5, 6, 8) cut into the long ones."""
    hf, lm = pair
    ids, mask = right_padded(PROMPTS)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits
    assert (lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max() <= 1e-4


def test_greedy_tokens_match_far_past_the_window(pair):
    hf, lm = pair
    prompt, new = PROMPTS[0], 48
    with torch.no_grad():
        reference = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new)[0].tolist()
    ids, mask = padded_for_generation([prompt], new)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][0].tolist() == reference


def test_greedy_tokens_match_for_batch_of_different_lengths(pair):
    """transformers pads on the left for generation; lmq takes right-padded prompts."""
    hf, lm = pair
    new = 40
    reference = hf_greedy(hf, PROMPTS, new)
    ids, mask = padded_for_generation(PROMPTS, new)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None, max_new_tokens=new)
    for i, prompt in enumerate(PROMPTS):
        assert out["token_ids"][i, len(prompt) : len(prompt) + new].tolist() == reference[i]


def test_rolling_cache_stops_growing_at_the_window(pair):
    _, lm = pair
    backbone, window = lm.backbone, lm.backbone.sliding_window
    width = len(PROMPTS[0])
    cache = backbone.new_cache(batch_size=2, max_length=500, prompt_width=width)
    if window is None:
        assert type(cache) is KVCache and cache.max_length == 500
        return
    assert isinstance(cache, RollingKVCache)
    assert cache.max_length == window + width - 1
    backbone.prefill(torch.tensor(right_padded(PROMPTS[:2])[0]), cache)


WINDOWED = sorted(name for name, config in CONFIGS.items() if config["sliding_window"])


@pytest.mark.parametrize("pair", WINDOWED, indirect=True)
@pytest.mark.parametrize("sampler", ["greedy", "beam", "contrastive"])
def test_rolling_cache_gives_what_a_full_cache_gives(pair, sampler, monkeypatch):
    """Every sampler (beam and contrastive reorder cache rows) decodes the same with either cache."""
    _, lm = pair
    lm.compile(sampler=sampler)
    ids, mask = padded_for_generation(PROMPTS, 30)
    rolling = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    monkeypatch.setattr("lmq.core.models.backbone.RollingKVCache", lambda *shape, **window: KVCache(*shape))
    full = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    lm.compile(sampler="greedy")
    assert rolling["token_ids"].tolist() == full["token_ids"].tolist()
