"""Phi3Backbone against transformers' Phi3ForCausalLM: same weights, same logits, same greedy tokens.

The longrope configs pretrain on 16 positions, so prompts of 5..11 tokens start on the
short factors and switch to the long ones while generating (transformers recomputes
its cache at that step; so does lmq), and a 20-token prompt is long from the start.
"""

import pytest
import torch

from lmq.plugins.phi3 import Phi3CausalLM
from model_support import hf_greedy, lmq_greedy, random_transformers_lm, right_padded, transformers_pair

SIZES = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
HALF_HEAD = 8  # head_dim 16: one longrope factor per rotary frequency
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(HALF_HEAD)],
    "long_factor": [1.0 + 2.0 * i for i in range(HALF_HEAD)],
    "original_max_position_embeddings": 16,
}
CONFIGS = {
    "default_rope_gqa": dict(num_key_value_heads=2),
    "longrope_mha": dict(
        num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=16, rope_scaling=LONGROPE
    ),
    "su_gqa_theta": dict(
        num_key_value_heads=2,
        max_position_embeddings=128,
        original_max_position_embeddings=16,
        rope_theta=5e4,
        rope_scaling={**LONGROPE, "rope_type": "su"},
    ),
    "default_rope_window_6": dict(num_key_value_heads=1, sliding_window=6),
}
PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7], [1, 5, 6, 7, 8], [1, 200, 201, 202, 203, 204, 9]]
LONG_PROMPT = [1, *range(100, 119)]  # 20 tokens: past the longrope configs' 16


def random_hf_phi3(seed, **overrides):
    """Random weights, peaked enough (initializer_range) for a stable argmax."""
    from transformers import Phi3Config, Phi3ForCausalLM

    settings = dict(SIZES, initializer_range=0.15, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Phi3Config(**{**settings, **overrides}, attn_implementation="eager")
    return random_transformers_lm(Phi3ForCausalLM, config, seed)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, lmq task loaded from its save_pretrained directory)."""
    hf = random_hf_phi3(seed=len(request.param), **CONFIGS[request.param])
    return transformers_pair(hf, tmp_path_factory.mktemp(request.param))


def test_loads_as_phi3_with_its_rope(pair):
    hf, lm = pair
    assert isinstance(lm, Phi3CausalLM)
    config = lm.backbone.get_config()
    scaled = hf.config.rope_parameters["rope_type"] == "longrope"
    assert config["rope_scaling_type"] == ("su" if scaled else None)
    assert config["pretraining_sequence_length"] == (16 if scaled else 4096)
    assert config["max_sequence_length"] == hf.config.max_position_embeddings
    assert config["rope_max_wavelength"] == hf.config.rope_parameters["rope_theta"]
    assert lm.backbone.sliding_window == hf.config.sliding_window


@pytest.mark.parametrize("prompts", [PROMPTS, [LONG_PROMPT, *PROMPTS]], ids=["short", "long"])
def test_logits_match_on_right_padded_batch(pair, prompts):
    """A batch 11 wide (short factors) and one 20 wide (long factors)."""
    hf, lm = pair
    ids, mask = right_padded(prompts)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits
    assert (lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max() <= 1e-4


@pytest.mark.parametrize("prompts", [[PROMPTS[0]], [LONG_PROMPT], PROMPTS], ids=["short", "long", "batch"])
def test_greedy_tokens_match(pair, prompts):
    """40 new tokens; a batch's rows share transformers' choice of factors (by its longest row)."""
    hf, lm = pair
    assert lmq_greedy(lm, prompts, 40) == hf_greedy(hf, prompts, 40)
