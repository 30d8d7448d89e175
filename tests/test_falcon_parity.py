"""FalconBackbone against transformers' FalconForCausalLM (falcon-rw layout): same weights,
same logits, same greedy tokens, ALiBi kept in every decode step."""

import json

import pytest
import torch

from core.models import CausalLM
from plugins.falcon import FalconCausalLM
from tests.model_support import FIXTURES, hf_greedy, lmq_greedy, max_logit_difference

RW_LAYOUT = dict(alibi=True, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True)
CONFIGS = {
    "heads_4": dict(hidden_size=64, num_attention_heads=4),
    # 12 heads: slopes past the closest power of two, not exact in bfloat16
    "heads_12": dict(hidden_size=96, num_attention_heads=12),
}
PROMPTS = [[1, 17, 42, 99, 250, 7, 300, 12, 5, 6, 7], [1, 5, 6, 7, 8], [1, 200, 201, 202, 203, 204, 9]]


def random_hf_falcon(seed, **overrides):
    """Random weights peaked enough for a stable argmax, with random biases and norms
    (transformers starts those at 0 and 1, which would hide a misplaced one).

    SDPA, not eager: transformers 5's eager Falcon adds ALiBi twice (to the scores and
    again through the mask it folded ALiBi into); its SDPA path adds it once, like the
    original Falcon code and KerasHub.
    """
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=400, num_hidden_layers=2, initializer_range=0.15, attn_implementation="sdpa", **RW_LAYOUT, **overrides
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
    return hf, CausalLM.from_preset(str(directory))


def test_loads_as_falcon_with_greedy_default(pair):
    _, lm = pair
    assert isinstance(lm, FalconCausalLM)
    assert lm.preprocessor is None
    assert type(lm.sampler).__name__ == "GreedySampler"


def test_logits_match_on_right_padded_batch(pair):
    assert max_logit_difference(*pair, PROMPTS) <= 1e-4


def test_greedy_tokens_match_per_prompt(pair):
    hf, lm = pair
    assert lmq_greedy(lm, PROMPTS[:1], 40) == hf_greedy(hf, PROMPTS[:1], 40)


def test_greedy_tokens_match_for_batch_of_different_lengths(pair):
    """transformers' ALiBi counts positions from a row's first real token, so its
    left padding and lmq's right padding see the same positions."""
    hf, lm = pair
    assert lmq_greedy(lm, PROMPTS, 32) == hf_greedy(hf, PROMPTS, 32)


@pytest.mark.parametrize(
    "setting, value",
    [("parallel_attn", True), ("multi_query", True), ("alibi", False), ("bias", False), ("new_decoder_architecture", True)],
)
def test_other_falcon_variants_are_refused_by_name(tmp_path, setting, value):
    config = {"model_type": "falcon", "vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, **RW_LAYOUT, setting: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=setting):
        CausalLM.from_preset(str(tmp_path), load_weights=False)


def test_tokenizer_json_converts_to_the_same_tokens(pair, tmp_path):
    """A checkpoint's tokenizer.json (here: the fixture's vocabulary, written by the
    tokenizers library) becomes a FalconTokenizer that tokenizes as transformers does."""
    from transformers import PreTrainedTokenizerFast

    from plugins.falcon import FalconTokenizer

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    assets = FIXTURES / "falcon" / "assets" / "tokenizer"
    FalconTokenizer(assets / "vocabulary.json", assets / "merges.txt").processor.save(str(tmp_path / "tokenizer.json"))
    lm = CausalLM.from_preset(str(tmp_path))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = ["The module provides", "  Return a new\n\nline's 42 <|endoftext|>x", "naïve café"]
    assert lm.preprocessor.tokenizer.tokenize(texts) == [reference.encode(t) for t in texts]
