"""Greedy generation: lmq vs transformers on the same random Llama weights, in one process.

    pip install -e ".[bench]"    # transformers, the reference it runs against
    python bench/generate.py [--repeats 3] [--threads 2]

Builds a ~50M-parameter Llama (vocab 32000, hidden 512, 8 layers, 8 query heads,
2 KV heads, intermediate 1376) in transformers, loads the same weights into lmq
through its checkpoint import, and runs fp32 greedy generation on the CPU,
alternating the two, for:
  (a) batch 8, 32-token prompts, 64 new tokens;
  (b) a ragged batch: prompt lengths 8..128, half the rows stopping early on a stop token.
Prints tokens/s for each and the ratio, and checks both produced the same tokens.
"""

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import lmq.core  # noqa: F401  (KERAS_BACKEND)

CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def build_models(device=None, dtype=None):
    """The transformers Llama and lmq's import of it, on ``device`` (LMQ_DEVICE's values;
    by default the CPU) in ``dtype`` (by default float32, bfloat16 on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmq.core.models import CausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        lm = CausalLM.from_preset(directory, device=device or "cpu", dtype=dtype)
    lm.compile(sampler="greedy")
    hf.to(lm.backbone.device, lm.backbone.token_embedding.embeddings.value.dtype)
    return hf, lm


def run_hf(hf, prompts, new_tokens, stop_ids):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=list(stop_ids) or None,
            pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    return _completions(out[:, width:].tolist(), stop_ids), seconds


def run_lmq(lm, prompts, new_tokens, stop_ids):
    width = max(len(p) for p in prompts) + new_tokens
    ids = np.zeros((len(prompts), width), dtype="int64")
    mask = np.zeros((len(prompts), width), dtype=bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = True
    start = time.perf_counter()
    out = lm.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop_ids or None, max_new_tokens=new_tokens
    )
    seconds = time.perf_counter() - start
    rows = [out["token_ids"][i, len(p) : out["padding_mask"][i].sum()].tolist() for i, p in enumerate(prompts)]
    return rows, seconds


def _completions(rows, stop_ids):
    """Cut transformers' rows after the first stop token (it pads finished rows)."""
    cut = []
    for row in rows:
        for i, token in enumerate(row):
            if token in stop_ids:
                row = row[: i + 1]
                break
        cut.append(row)
    return cut


def workloads(hf):
    rng = np.random.default_rng(0)
    uniform = [rng.integers(3, 32000, 32).tolist() for _ in range(8)]
    lengths = np.linspace(8, 128, 8).astype(int)
    ragged = [rng.integers(3, 32000, n).tolist() for n in lengths]
    # Stop tokens that rows 0, 2, 4, 6 produce mid-way and rows 1, 3, 5, 7 never produce.
    free_run, _ = run_hf(hf, ragged, 64, [])
    never = set().union(*(free_run[i] for i in range(1, 8, 2)))
    stops = []
    for i in range(0, 8, 2):
        candidates = [t for t in free_run[i][8:40] if t not in never]
        if candidates:
            stops.append(candidates[0])
    return {"a: batch 8 x 32-token prompts, 64 new": (uniform, 64, []), "b: ragged 8..128, half stop early": (ragged, 64, stops)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, lm = build_models()
    same = True
    for name, (prompts, new_tokens, stops) in workloads(hf).items():
        run_hf(hf, prompts, new_tokens, stops)  # warm-up
        run_lmq(lm, prompts, new_tokens, stops)
        times = {"transformers": [], "lmq": []}
        for _ in range(args.repeats):
            reference, seconds = run_hf(hf, prompts, new_tokens, stops)
            times["transformers"].append(seconds)
            ours, seconds = run_lmq(lm, prompts, new_tokens, stops)
            times["lmq"].append(seconds)
        tokens = sum(len(row) for row in reference)
        identical = ours == reference
        same &= identical
        rate = {k: tokens / statistics.median(v) for k, v in times.items()}
        print(f"({name}) {tokens} new tokens; stop tokens: {stops or 'none'}")
        print(f"    transformers {rate['transformers']:8.1f} tok/s   lmq {rate['lmq']:8.1f} tok/s   "
              f"ratio lmq/transformers {rate['lmq'] / rate['transformers']:.2f}x   identical tokens: {identical}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
