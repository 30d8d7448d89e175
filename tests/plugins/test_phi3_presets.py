"""Phi-3 presets: lmq writes what KerasHub 0.32 writes, reads transformers checkpoints, knows the built-in names."""

import json
import shutil

import pytest
import torch

from lmq.core.models import CausalLM
from lmq.core.plugins import get_registry
from lmq.plugins.phi3 import Phi3Backbone, Phi3CausalLM, Phi3CausalLMPreprocessor, Phi3Tokenizer
from model_support import FIXTURES, assert_keras_hub_structure, right_padded
from tests.plugins.test_phi3_parity import LONGROPE, random_hf_phi3

KERAS_HUB_PRESET = FIXTURES / "phi3"
VOCABULARY = KERAS_HUB_PRESET / "assets" / "tokenizer" / "vocabulary.spm"


def test_saved_preset_has_keras_hub_structure(tmp_path):
    """A new random model with the fixture's config and vocabulary saves what KerasHub saved."""
    config = json.loads((KERAS_HUB_PRESET / "config.json").read_text())["config"]
    backbone = Phi3Backbone(**{key: value for key, value in config.items() if key not in ("name", "trainable")})
    lm = Phi3CausalLM(backbone, Phi3CausalLMPreprocessor(Phi3Tokenizer(proto=VOCABULARY), sequence_length=24))
    lm.save_to_preset(tmp_path / "preset")
    assert_keras_hub_structure(tmp_path / "preset", KERAS_HUB_PRESET)


def test_tokenizer_ends_with_endoftext_and_keeps_chat_tokens():
    """As in KerasHub: ``<|endoftext|>`` stops generation; ``<|user|>``/``<|end|>`` are kept in the text."""
    preprocessor = Phi3CausalLMPreprocessor(Phi3Tokenizer(proto=VOCABULARY))
    tokenizer = preprocessor.tokenizer
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (1, 3, 0)
    assert tokenizer.tokenize("<|user|>The<|end|>")[-1] == tokenizer.token_to_id("<|end|>")
    assert preprocessor.generate_postprocess([[1, 4, 357, 5, 6, 3]]) == ["<|user|> The<|assistant|><|end|>"]


def test_longrope_preset_round_trip(tmp_path):
    """A transformers longrope checkpoint saved as a KerasHub preset keeps its factors and logits."""
    hf = random_hf_phi3(
        seed=3, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
        rope_scaling=LONGROPE, sliding_window=9,
    )
    hf.save_pretrained(tmp_path / "hf")
    lm = CausalLM.from_preset(str(tmp_path / "hf"))
    lm.save_to_preset(tmp_path / "again")
    again = CausalLM.from_preset(str(tmp_path / "again"))
    config = again.backbone.get_config()
    assert (config["rope_scaling_type"], config["pretraining_sequence_length"], config["sliding_window"]) == ("su", 16, 9)
    assert config["rope_scaling_long_factor"] == LONGROPE["long_factor"]
    ids, mask = right_padded([[1, *range(30, 50)], [1, 40, 41]])
    assert torch.equal(lm.score(ids, mask), again.score(ids, mask))


def test_transformers_checkpoint_brings_its_sentencepiece_tokenizer(tmp_path):
    hf = random_hf_phi3(seed=1, vocab_size=1004, num_key_value_heads=4)
    hf.save_pretrained(tmp_path)
    shutil.copy(VOCABULARY, tmp_path / "tokenizer.model")
    lm = CausalLM.from_preset(str(tmp_path))
    assert isinstance(lm.preprocessor, Phi3CausalLMPreprocessor)
    assert lm.preprocessor.tokenizer.end_token_id == 3


def test_explicit_attention_factor_is_refused(tmp_path):
    """transformers would scale cos/sin by it instead of by the lengths' ratio."""
    random_hf_phi3(seed=0, num_key_value_heads=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {**LONGROPE, "attention_factor": 1.5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="attention_factor"):
        CausalLM.from_preset(str(tmp_path))


def test_builtin_presets_are_registered():
    presets = Phi3CausalLM.presets
    assert set(presets) == {"phi3_mini_4k_instruct_en", "phi3_mini_128k_instruct_en"}
    assert presets["phi3_mini_128k_instruct_en"].handle == "kaggle://keras/phi3/keras/phi3_mini_128k_instruct_en"
    assert get_registry().for_hf_model_type("phi3").name == "phi3"
