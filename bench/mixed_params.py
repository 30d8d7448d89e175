"""A job whose lines each sample at their own temperature: one pass vs a pass per sampler.

    pip install -e ".[bench]"    # transformers, which builds the bench's random Llama
    python bench/mixed_params.py                  # 64 lines, 32 new tokens each
    python bench/mixed_params.py --lines 256 --device cuda

An OpenAI batch file's lines each carry their own temperature (and top_p): on the
~50M-parameter Llama of bench/generate.py, a job of --lines prompts (8..64 tokens),
each line sampling with its own temperature (every fourth one top-p 0.9, every eighth
greedy), seeded per line, up to --new-tokens tokens each:

- one pass: what the runner does now, ``compile(sampler=[...])`` with each line's
  sampler (``PerRequestSampler``) and one ``generate`` over every line;
- grouped: what it did before, a ``generate`` per distinct sampler, over its lines.

Both run through the decode engine with the same row budget (--rows, default every
line at once), alternating, --repeats times. Prints tokens/s (completion tokens / wall
time, the median run) of each, the ratio, and how many lines got the same tokens both
ways: a line's seed, not its neighbours, decides its draws, but its logits in a batch of
64 differ from its logits in a batch of one or two by float rounding (about 1e-4 on this
model in float32: the matmuls of other shapes), which a near tie between two tokens turns
into another draw, and from there another completion.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import build_models  # noqa: E402  (the bench's shared model)


def job(lines, new_tokens, seed=0):
    """Prompts (ids), each line's sampler (as ``compile`` takes it) and seed."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 32000, int(n)).tolist() for n in rng.integers(8, 65, lines)]
    samplers = []
    for line in range(lines):
        temperature = round(0.3 + 1.2 * line / max(lines - 1, 1), 4)
        if line % 8 == 0:
            samplers.append("greedy")
        elif line % 4 == 0:
            samplers.append({"name": "top_p", "p": 0.9, "temperature": temperature})
        else:
            samplers.append({"name": "random", "temperature": temperature})
    return prompts, samplers, [1000 + line for line in range(lines)], [new_tokens] * lines


def generate(lm, prompts, sampler, seeds, limits, rows):
    """Completions (lists of ids) of ``prompts`` in one ``generate`` call."""
    width = max(len(p) for p in prompts) + max(limits)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=bool)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, True
    lm.compile(sampler=sampler)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None, max_new_tokens=limits,
                      seed=seeds, max_rows=rows)
    ends = out["padding_mask"].sum(axis=1)
    return [row[len(p) : end].tolist() for row, p, end in zip(out["token_ids"], prompts, ends)]


def grouped(lm, prompts, samplers, seeds, limits, rows):
    groups = {}
    for line, sampler in enumerate(samplers):
        groups.setdefault(repr(sampler), []).append(line)
    completions = [None] * len(prompts)
    for lines in groups.values():
        pick = lambda values: [values[line] for line in lines]  # noqa: E731
        for line, completion in zip(lines, generate(lm, pick(prompts), samplers[lines[0]], pick(seeds),
                                                     pick(limits), rows)):
            completions[line] = completion
    return completions, len(groups)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, help="rows in flight at most (default: every line)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: the CPU)")
    parser.add_argument("--dtype", help="float32, bfloat16 (default: float32 on a CPU, bfloat16 on a GPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, lm = build_models(args.device, args.dtype)
    prompts, samplers, seeds, limits = job(args.lines, args.new_tokens)
    generate(lm, prompts[:2], samplers[:2], seeds[:2], [2, 2], None)  # warm up
    times = {"one pass": [], "grouped": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        mixed = generate(lm, prompts, samplers, seeds, limits, args.rows)  # each line its own sampler
        times["one pass"].append(time.perf_counter() - start)
        start = time.perf_counter()
        separate, passes = grouped(lm, prompts, samplers, seeds, limits, args.rows)
        times["grouped"].append(time.perf_counter() - start)
    tokens = sum(len(c) for c in mixed)
    device = lm.backbone.device
    print(f"{args.lines} lines, {len(set(map(repr, samplers)))} distinct samplers, {tokens} completion tokens, "
          f"rows in flight {args.rows or 'all'}, {device}, torch threads {torch.get_num_threads()}")
    rates = {}
    for name, runs in times.items():
        rates[name] = tokens / statistics.median(runs)
        note = "1 generate call" if name == "one pass" else f"{passes} generate calls"
        print(f"  {name:9s} {rates[name]:9.1f} tokens/s  (median of {len(runs)}: {statistics.median(runs):.2f} s, "
              f"{note})")
    print(f"  one pass / grouped: {rates['one pass'] / rates['grouped']:.2f}x")
    same = sum(a == b for a, b in zip(mixed, separate))
    print(f"  lines with the same tokens both ways: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
