"""Falcon against transformers' FalconForCausalLM: same weights, same logits, same greedy
tokens, for the falcon-rw layout (FalconBackbone, ALiBi kept in every decode step) and the
rotary Falcon-7B and 40B layouts (FalconRotaryBackbone)."""

import json

import pytest
import torch

from lmq.core.models import CausalLM
from lmq.plugins.falcon import FalconBackbone, FalconCausalLM, FalconRotaryBackbone
from model_support import FIXTURES, hf_greedy, lmq_greedy, max_logit_difference

RW_LAYOUT = dict(alibi=True, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True)
FALCON_7B_LAYOUT = dict(alibi=False, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
FALCON_40B_LAYOUT = dict(alibi=False, new_decoder_architecture=True, parallel_attn=True, bias=False)
CONFIGS = {
    "heads_4": dict(RW_LAYOUT, hidden_size=64, num_attention_heads=4),
    # 12 heads: slopes past the closest power of two, not exact in bfloat16
    "heads_12": dict(RW_LAYOUT, hidden_size=96, num_attention_heads=12),
    "falcon_7b": dict(FALCON_7B_LAYOUT, hidden_size=64, num_attention_heads=4),
    "falcon_40b": dict(FALCON_40B_LAYOUT, hidden_size=64, num_attention_heads=8, num_kv_heads=2, rope_theta=5000.0),
    "falcon_40b_one_norm": dict(FALCON_40B_LAYOUT, hidden_size=64, num_attention_heads=8, num_kv_heads=4, num_ln_in_parallel_attn=1),
    # rotary, multi-head, attention then MLP, with biases
    "rotary_sequential": dict(alibi=False, multi_query=False, parallel_attn=False, bias=True, hidden_size=64, num_attention_heads=4),
}
BACKBONES = {"heads_4": FalconBackbone, "heads_12": FalconBackbone}
PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7], [1, 5, 6, 7, 8], [1, 200, 201, 202, 203, 204, 9]]


def random_hf_falcon(seed, **settings):
    """Random weights peaked enough for a stable argmax, with random biases and norms
    (transformers starts those at 0 and 1, which would hide a misplaced one).

    SDPA, not eager: transformers 5's eager Falcon adds ALiBi twice (to the scores and
    again through the mask it folded ALiBi into); its SDPA path adds it once, like the
    original Falcon code and KerasHub.
    """
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=400, num_hidden_layers=2, initializer_range=0.15, attn_implementation="sdpa", **settings
    )
    torch.manual_seed(seed)
    model = FalconForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif "ln" in name or "layernorm" in name:
                parameter.normal_(1.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, lmq task loaded from its save_pretrained directory)."""
    hf = random_hf_falcon(seed=len(request.param), **CONFIGS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, CausalLM.from_preset(str(directory)), request.param


def test_loads_as_falcon_with_greedy_default(pair):
    _, lm, layout = pair
    assert isinstance(lm, FalconCausalLM)
    assert type(lm.backbone) is BACKBONES.get(layout, FalconRotaryBackbone)
    assert lm.preprocessor is None
    assert type(lm.sampler).__name__ == "GreedySampler"


def test_logits_match_on_right_padded_batch(pair):
    hf, lm, _ = pair
    assert max_logit_difference(hf, lm, PROMPTS) <= 1e-4


def test_greedy_tokens_match_per_prompt(pair):
    hf, lm, _ = pair
    assert lmq_greedy(lm, PROMPTS[:1], 40) == hf_greedy(hf, PROMPTS[:1], 40)


def test_greedy_tokens_match_for_batch_of_different_lengths(pair):
    """transformers' ALiBi counts positions from a row's first real token, so its
    left padding and lmq's right padding see the same positions (rotary ones too)."""
    hf, lm, _ = pair
    assert lmq_greedy(lm, PROMPTS, 32) == hf_greedy(hf, PROMPTS, 32)


@pytest.mark.parametrize(
    "setting, value",
    [("parallel_attn", True), ("multi_query", True), ("bias", False), ("new_decoder_architecture", True)],
)
def test_alibi_variants_other_than_rw_are_refused_by_name(tmp_path, setting, value):
    config = {"model_type": "falcon", "vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, **RW_LAYOUT, setting: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{setting}=.*alibi=true"):
        CausalLM.from_preset(str(tmp_path), load_weights=False)


@pytest.mark.parametrize("setting, value", [("activation", "relu"), ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0})])
def test_unsupported_rotary_settings_are_refused_by_name(tmp_path, setting, value):
    config = {"model_type": "falcon", "vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, **FALCON_7B_LAYOUT, setting: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation" if setting == "activation" else "dynamic"):
        CausalLM.from_preset(str(tmp_path), load_weights=False)


@pytest.mark.parametrize("layout", ["falcon_7b", "falcon_40b"])
def test_rotary_layouts_save_and_reload_bit_identically_under_lmqs_class_name(layout, tmp_path):
    hf = random_hf_falcon(seed=3, **CONFIGS[layout])
    hf.save_pretrained(tmp_path / "hf")
    lm = CausalLM.from_preset(str(tmp_path / "hf"))
    lm.save_to_preset(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["registered_name"] == "keras_hub>FalconRotaryBackbone"
    again = CausalLM.from_preset(str(tmp_path / "saved"))
    assert isinstance(again, FalconCausalLM) and type(again.backbone) is FalconRotaryBackbone
    assert again.backbone.get_config() == lm.backbone.get_config()
    ids = torch.tensor(PROMPTS[:1])
    assert torch.equal(again.score(ids, ids > 0), lm.score(ids, ids > 0))


def test_tokenizer_json_converts_to_the_same_tokens(pair, tmp_path):
    """A checkpoint's tokenizer.json (here: the fixture's vocabulary, written by the
    tokenizers library) becomes a FalconTokenizer that tokenizes as transformers does."""
    from transformers import PreTrainedTokenizerFast

    from lmq.plugins.falcon import FalconTokenizer

    hf, _, _ = pair
    hf.save_pretrained(tmp_path)
    assets = FIXTURES / "falcon" / "assets" / "tokenizer"
    FalconTokenizer(assets / "vocabulary.json", assets / "merges.txt").processor.save(str(tmp_path / "tokenizer.json"))
    lm = CausalLM.from_preset(str(tmp_path))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = ["The module provides", "  Return a new\n\nline's 42 <|endoftext|>x", "naïve café"]
    assert lm.preprocessor.tokenizer.tokenize(texts) == [reference.encode(t) for t in texts]
