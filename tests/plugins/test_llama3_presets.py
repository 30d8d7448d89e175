"""Llama 3: KerasHub's class names and presets, both end tokens, and transformers checkpoints
that ship only a byte-level BPE ``tokenizer.json``."""

import json

import numpy as np
import pytest
import tokenizers
import torch

from lmq.core.models import CausalLM
from lmq.core.plugins import get_registry
from lmq.core.store.presets import preset_architecture
from lmq.plugins.llama import Llama3CausalLM, Llama3Tokenizer, LlamaCausalLM
from model_support import (
    FIXTURES,
    assert_keras_hub_structure,
    docstring_corpus,
    random_hf_llama,
    train_sentencepiece,
)

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(3)]
# Llama 3's tokenizer.json: a Split regex, then ByteLevel without its own regex.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CHAT = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nReturn a new path<|eot_id|>"


def write_llama3_tokenizer_json(directory, vocab_size=500):
    """A Llama 3-style tokenizer.json trained on real English: BPE, Split + ByteLevel, added tokens."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL + RESERVED,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(docstring_corpus(), trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    """A random transformers Llama checkpoint (rope_theta 500000) with only tokenizer.json."""
    directory = tmp_path_factory.mktemp("llama3_hf")
    reference = write_llama3_tokenizer_json(directory)
    hf = random_hf_llama(vocab_size=reference.get_vocab_size(), rope_theta=500000.0)
    hf.save_pretrained(directory)
    return hf, reference, directory


def test_builtin_llama3_names_resolve_to_the_llama3_classes():
    registry = get_registry()
    for name in ("llama3_8b_en", "llama3_8b_en_int8", "llama3_instruct_8b_en", "llama3_instruct_8b_en_int8"):
        architecture, info = registry.find_preset(name)
        assert architecture.name == "llama3"
        assert info.handle == f"kaggle://keras/llama3/keras/{name}"
        assert architecture.task.endswith(":Llama3CausalLM")
    assert registry.find_preset("llama2_7b_en")[0].name == "llama"
    assert "llama3_8b_en" in Llama3CausalLM.presets and "llama3_8b_en" not in LlamaCausalLM.presets


def test_checkpoint_with_only_tokenizer_json_is_llama3_with_a_preprocessor(llama3_checkpoint):
    hf, _, directory = llama3_checkpoint
    lm = CausalLM.from_preset(str(directory))
    assert isinstance(lm, Llama3CausalLM)
    assert type(lm.backbone).__name__ == "Llama3Backbone"
    assert preset_architecture(directory) == "llama3"  # what the store records for an import
    assert lm.backbone.rope_max_wavelength == 500000.0
    ids = np.array([[5, 17, 42, 99, 250, 7], [5, 6, 7, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask.astype("int64"))).logits.numpy()
    logits = lm.score(ids, mask).numpy()
    assert np.abs(logits - expected)[mask].max() <= 1e-4
    assert lm.generate("Return a new", max_length=12).startswith("Return a new")


def test_checkpoint_tokenizer_matches_its_own_on_english_and_chat_tokens(llama3_checkpoint):
    _, reference, directory = llama3_checkpoint
    tokenizer = CausalLM.from_preset(str(directory)).preprocessor.tokenizer
    texts = ["Return a new path with the suffix changed", "The module provides a simple way to", CHAT]
    assert tokenizer.tokenize(texts) == [reference.encode(t, add_special_tokens=False).ids for t in texts]
    ids = tokenizer.tokenize(CHAT)
    for token in SPECIAL:  # each chat token is one id, never split into bytes
        assert reference.token_to_id(token) in ids or token == "<|end_of_text|>"
    assert tokenizer.detokenize(ids) == CHAT
    assert not set(RESERVED) & set(tokenizer.unsplittable_tokens)


def test_llama2_checkpoint_with_tokenizer_model_stays_llama(tmp_path):
    spm = train_sentencepiece(tmp_path / "spm")
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(spm.read_bytes())
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # Llama 2 repositories ship both
    lm = CausalLM.from_preset(str(tmp_path / "ckpt"))
    assert type(lm) is LlamaCausalLM
    assert preset_architecture(tmp_path / "ckpt") == "llama"


def test_converted_checkpoint_saves_a_keras_hub_llama3_preset(llama3_checkpoint, tmp_path):
    _, _, directory = llama3_checkpoint
    lm = CausalLM.from_preset(str(directory))
    lm.save_to_preset(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["registered_name"] == "keras_hub>Llama3Backbone"
    assert config["module"] == "keras_hub.src.models.llama3.llama3_backbone"
    again = CausalLM.from_preset(str(tmp_path / "saved"))
    ids = np.array([[5, 17, 42, 99]])
    assert np.array_equal(again.score(ids, ids != 0).numpy(), lm.score(ids, ids != 0).numpy())
    assert again.preprocessor.tokenizer.tokenize(CHAT) == lm.preprocessor.tokenizer.tokenize(CHAT)


def test_fixture_round_trip_keeps_keras_hub_structure(tmp_path):
    lm = CausalLM.from_preset(str(FIXTURES / "llama3"))
    lm.save_to_preset(tmp_path / "saved")
    assert_keras_hub_structure(tmp_path / "saved", FIXTURES / "llama3")


def swap_tokens(lm, a, b):
    """Exchanges token ids ``a`` and ``b`` in the embedding and the head: the same model, renamed."""
    embedding = lm.backbone.token_embedding
    for variable, axis in ((embedding.embeddings, 0), (embedding.reverse_embeddings, 1)):
        value = variable.value.detach().clone()
        index = torch.arange(value.shape[axis])
        index[a], index[b] = b, a
        variable.assign(value.index_select(axis, index))


@pytest.mark.parametrize("end", ["<|eot_id|>", "<|end_of_text|>"])
def test_both_end_tokens_stop_generation(end):
    lm = CausalLM.from_preset(str(FIXTURES / "llama3"))
    lm.compile(sampler="greedy")
    tokenizer = lm.preprocessor.tokenizer
    assert set(tokenizer.stop_token_ids) == {tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|end_of_text|>")}
    prompt = "Return a new"
    free = lm.generate(prompt, max_length=24, stop_token_ids=None, return_details=True)
    prompt_ids = lm.preprocessor.generate_preprocess(prompt)[0]
    position = next(i for i, t in enumerate(free.token_ids) if i >= 2 and t not in prompt_ids and t not in free.token_ids[:i])
    swap_tokens(lm, free.token_ids[position], tokenizer.token_to_id(end))
    stopped = lm.generate(prompt, max_length=24, return_details=True)
    assert stopped.token_ids == free.token_ids[:position] + [tokenizer.token_to_id(end)]
    assert stopped.finish_reason == "stop"
