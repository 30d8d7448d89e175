"""Helpers for model tests: a real SentencePiece vocabulary, random transformers models."""

import inspect
import json
import pathlib

import numpy as np

import lmq.core  # noqa: F401  (KERAS_BACKEND before keras)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "keras_hub_presets"


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


def tiny_llama(spm_model, sequence_length):
    """A random 2-layer Llama task (GQA, hidden 32) around a SentencePiece vocabulary."""
    from lmq.plugins.llama import LlamaBackbone, LlamaCausalLM, LlamaCausalLMPreprocessor, LlamaTokenizer

    tokenizer = LlamaTokenizer(proto=spm_model)
    backbone = LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
    )
    return LlamaCausalLM(backbone, LlamaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length))


def random_hf_llama(seed=0, **overrides):
    """A transformers LlamaForCausalLM with random weights peaked enough for stable argmax."""
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
    return random_transformers_lm(LlamaForCausalLM, LlamaConfig(**config), seed)


def random_transformers_lm(model_cls, config, seed):
    """A transformers model with random weights that generates without an end token."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def transformers_pair(hf, directory):
    """(transformers model, lmq task loaded from its save_pretrained directory, greedy)."""
    from lmq.core.models import CausalLM

    hf.save_pretrained(directory)
    lm = CausalLM.from_preset(str(directory))
    lm.compile(sampler="greedy")
    return hf, lm


def padded_for_generation(prompts, new):
    """Right-padded prompts with room for ``new`` tokens after the longest."""
    ids, mask = right_padded(prompts)
    room = ((0, 0), (0, max(len(p) for p in prompts) + new - ids.shape[1]))
    return np.pad(ids, room), np.pad(mask, room)


def right_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype="int64")
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def skeleton(value):
    """A JSON value with its leaves dropped, class names kept: what must match KerasHub's."""
    if isinstance(value, dict):
        names = ("class_name", "registered_name", "module")
        return {key: value[key] if key in names else skeleton(item) for key, item in value.items()}
    return None


def datasets(path):
    """{dataset path: (shape, dtype)} of an HDF5 file."""
    import h5py

    found = {}
    with h5py.File(path) as h5_file:
        h5_file.visititems(
            lambda name, item: found.update({name: (item.shape, item.dtype)}) if isinstance(item, h5py.Dataset) else None
        )
    return found


def assert_keras_hub_structure(ours, reference):
    """Same files, JSON keys (nested), class names and modules, parameter count and weight
    paths/shapes/dtypes as the preset KerasHub saved in ``reference``."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.suffix != ".npy")
    assert files(ours) == files(reference)
    for name in ("config.json", "task.json", "preprocessor.json", "tokenizer.json", "metadata.json"):
        saved, expected = (json.loads((d / name).read_text()) for d in (ours, reference))
        assert skeleton(saved) == skeleton(expected), name
    count = lambda d: json.loads((d / "metadata.json").read_text())["parameter_count"]
    assert count(ours) == count(reference)
    assert datasets(ours / "model.weights.h5") == datasets(reference / "model.weights.h5")


def hf_greedy(hf, prompts, new):
    """transformers' greedy completions ([new] ids each); it pads a batch on the left."""
    import torch

    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype="int64")
    mask = np.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=new
        )
    return out[:, width:].tolist()


def lmq_greedy(lm, prompts, new):
    """lmq's greedy completions ([new] ids each) of right-padded prompts, generated on token ids."""
    ids, mask = right_padded(prompts)
    room = ((0, 0), (0, new))
    out = lm.generate({"token_ids": np.pad(ids, room), "padding_mask": np.pad(mask, room)}, stop_token_ids=None)
    return [row[len(p) : len(p) + new].tolist() for row, p in zip(out["token_ids"], prompts)]


def max_logit_difference(hf, lm, prompts):
    """The largest |lmq - transformers| logit over the real tokens of a right-padded batch."""
    import torch

    ids, mask = right_padded(prompts)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits
    return float((lm.score(ids, mask) - reference)[torch.tensor(mask)].abs().max())


def random_weights(backbone, seed=0):
    """Random weights large enough that the next-token distributions are far from flat."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for weight in backbone.weights:
        if len(weight.shape) >= 2:
            weight.assign(torch.randn(tuple(weight.shape), generator=generator) * 0.5)
    return backbone


def assert_greedy_rows_equal(model, prompts, got, expected, tie=1e-4):
    """Greedy completions ``got`` equal ``expected`` (lists of token ids per prompt), except where
    a row parts at a near-tie: its two tokens' logits, one sequence at a time, within ``tie``.

    Two runs of one row in different batches read its keys with different padding, which moves
    the float32 rounding of attention (a few 1e-7); where two tokens are that close, either is
    the greedy token. Everything else must match exactly, and at most a few rows may part.
    """
    import torch

    backbone = model.backbone
    parted = 0
    for prompt, ours, theirs in zip(prompts, got, expected):
        if ours == theirs:
            continue
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert at is not None, (prompt, ours, theirs)  # one stopped where the other went on
        with torch.inference_mode():
            cache = backbone.new_cache(1, len(prompt) + at + 1, prompt_width=len(prompt) + at)
            hidden = backbone.prefill(torch.tensor([prompt + theirs[:at]]), cache)
            logits = model.logits(hidden[0, -1])
        gap = abs(logits[ours[at]].item() - logits[theirs[at]].item())
        assert gap < tie and logits[theirs[at]] >= logits.max() - tie, (prompt, ours, theirs, gap)
        parted += 1
    assert parted <= max(1, len(expected) // 16), f"{parted} of {len(expected)} rows parted at near-ties"


ENGINE_VOCAB = 64


def engine_backbones():
    """Tiny decoders for engine tests, by name: plain Llama, Mistral with a sliding window
    shorter than the prompts, Falcon with ALiBi (each a different cache or attention path)."""
    from lmq.plugins.falcon.falcon_backbone import FalconBackbone
    from lmq.plugins.llama.llama_backbone import LlamaBackbone
    from lmq.plugins.mistral.mistral_backbone import MistralBackbone

    sizes = dict(vocabulary_size=ENGINE_VOCAB, num_layers=2, num_query_heads=4, hidden_dim=32, intermediate_dim=64,
                 num_key_value_heads=2)
    return {
        "llama": lambda: LlamaBackbone(**sizes),
        "mistral_window_4": lambda: MistralBackbone(**sizes, sliding_window=4),
        "falcon_alibi": lambda: FalconBackbone(
            vocabulary_size=ENGINE_VOCAB, num_layers=2, num_attention_heads=4, hidden_dim=32, intermediate_dim=64
        ),
    }


def random_adapter(base_directory, directory, seed, base_name=None, scale=0.5):
    """A random LoRA of rank 2 on every projection (attention and MLP) of the base preset at
    `base_directory`, saved at `directory` as an adapter preset over `base_name` (default: that
    directory), as the fine-tuning API saves one; `up` drawn with standard deviation `scale`."""
    import torch

    from lmq.core.adapters import save_adapter_preset
    from lmq.core.models import CausalLM

    lm = CausalLM.from_preset(str(base_directory))
    for block in lm.backbone.transformer_layers:
        block.attention.enable_lora(2, alpha=4)
        block.feedforward.enable_lora(2, alpha=4, names=block.feedforward.kernel_names())
    generator = torch.Generator().manual_seed(seed)
    for layer in lm.backbone._projection_layers():
        for down, up in layer.lora.values():
            up.assign(torch.randn(tuple(up.shape), generator=generator) * scale)
    save_adapter_preset(lm, directory, base_name or str(base_directory))
    return directory
