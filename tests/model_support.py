"""Helpers for model tests: a real SentencePiece vocabulary, random transformers models."""

import inspect
import json
import pathlib

import numpy as np

import core  # noqa: F401  (KERAS_BACKEND before keras)

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "keras_hub_presets"


def fixture_expected(arch):
    return json.loads((FIXTURES / "expected.json").read_text())[arch]


def docstring_corpus(limit=3000):
    """Lines of the standard library's docstrings: real English every Python carries."""
    import collections
    import json as json_module
    import os
    import pathlib as pathlib_module

    lines = []
    for module in (collections, json_module, os, pathlib_module, inspect):
        for _, member in [(None, module), *inspect.getmembers(module)]:
            doc = inspect.getdoc(member) or ""
            lines.extend(line.strip() for line in doc.splitlines() if len(line.strip()) > 20)
    return list(dict.fromkeys(lines))[:limit]


def train_sentencepiece(directory, vocab_size=400):
    """A byte-fallback BPE SentencePiece model with Llama's special ids; returns its path."""
    import sentencepiece

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(docstring_corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "spm"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return directory / "spm.model"


def random_hf_llama(seed=0, **overrides):
    """A transformers LlamaForCausalLM with random weights peaked enough for stable argmax."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.15,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def right_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype="int64")
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask
