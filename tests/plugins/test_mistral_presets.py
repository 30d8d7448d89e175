"""Mistral presets: lmq writes what KerasHub 0.32 writes, reads transformers checkpoints, knows the built-in names."""

import json

import pytest
import torch

from lmq.core.models import CausalLM
from lmq.core.plugins import get_registry
from lmq.plugins.mistral import MistralBackbone, MistralCausalLM, MistralCausalLMPreprocessor, MistralTokenizer
from model_support import FIXTURES, assert_keras_hub_structure, right_padded

KERAS_HUB_PRESET = FIXTURES / "mistral"


@pytest.fixture
def fresh_lm():
    """A new random model with the fixture's config and vocabulary (nothing loaded from the fixture's weights)."""
    config = json.loads((KERAS_HUB_PRESET / "config.json").read_text())["config"]
    backbone = MistralBackbone(**{key: value for key, value in config.items() if key not in ("name", "trainable")})
    tokenizer = MistralTokenizer(proto=KERAS_HUB_PRESET / "assets" / "tokenizer" / "vocabulary.spm")
    return MistralCausalLM(backbone, MistralCausalLMPreprocessor(tokenizer, sequence_length=24))


def test_saved_preset_has_keras_hub_structure(fresh_lm, tmp_path):
    """Same files, JSON keys (nested), class names and modules, weight paths/shapes/dtypes as KerasHub's preset."""
    fresh_lm.save_to_preset(tmp_path / "preset")
    assert_keras_hub_structure(tmp_path / "preset", KERAS_HUB_PRESET)


def test_fixture_round_trip_keeps_window_and_logits(tmp_path):
    lm = CausalLM.from_preset(str(KERAS_HUB_PRESET))
    lm.save_to_preset(tmp_path / "again")
    again = CausalLM.from_preset(str(tmp_path / "again"))
    assert isinstance(again, MistralCausalLM)
    assert again.backbone.sliding_window == 4
    ids, mask = right_padded([[1, 30, 31, 32, 33, 34, 35, 36], [1, 40, 41]])
    assert torch.equal(lm.score(ids, mask), again.score(ids, mask))


def test_transformers_v02_checkpoint_has_no_window_and_keeps_head_dim(tmp_path):
    """Mistral v0.2 ships ``sliding_window: null``; newer ones a head_dim apart from hidden/heads."""
    from transformers import MistralConfig, MistralForCausalLM

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = MistralConfig(**sizes, num_key_value_heads=2, head_dim=16, sliding_window=None, rms_norm_eps=1e-5, rope_theta=1e6)
    torch.manual_seed(0)
    hf = MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    lm = CausalLM.from_preset(str(tmp_path / "hf"))
    saved = lm.backbone.get_config()
    assert (saved["sliding_window"], saved["head_dim"], saved["rope_max_wavelength"]) == (None, 16, 1e6)
    assert saved["layer_norm_epsilon"] == 1e-5
    ids, mask = right_padded([[1, 5, 6, 7, 8, 9], [1, 2]])
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits
    assert (lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max() <= 1e-4


def test_tied_transformers_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mistral", "tie_word_embeddings": True, "num_attention_heads": 4})
    )
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        CausalLM.from_preset(str(tmp_path))


def test_builtin_presets_are_registered():
    presets = MistralCausalLM.presets
    assert {"mistral_7b_en", "mistral_instruct_7b_en", "mistral_0.2_instruct_7b_en"} <= presets.keys()
    assert presets["mistral_7b_en"].handle == "kaggle://keras/mistral/keras/mistral_7b_en"
    assert get_registry().for_hf_model_type("mistral").name == "mistral"
    assert all(name.startswith("mistral") for name in presets)
