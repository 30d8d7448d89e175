"""A generate job's throughput: continuous batching vs fixed micro-batches vs transformers.

    pip install -e ".[bench]"    # transformers, the reference it runs against
    python bench/job_throughput.py                      # issue 15's job: 256 prompts of 8..512 tokens
    python bench/job_throughput.py --prompts 64 --max-prompt 256   # minutes on a shared 2-core machine
    python bench/job_throughput.py --rows 32            # more rows in flight (one figure per engine)

The job (issue 15's shape): prompts with long-tailed lengths (most short, a few up to
--max-prompt tokens), completions that stop at different points - on a stop token
(the token greedy search emits most, found on a short probe) or at a per-row token
limit drawn long-tailed from 8..--max-new-tokens (standing in for stop strings and
end tokens of a real model, which random weights do not have) - on the ~50M-parameter
Llama of bench/generate.py, greedy, same weights and prompts for every engine:

- lmq continuous: the decode engine as the runner drives it (``generate`` with
  ``max_rows`` rows in flight and the default cache budget; finished rows free their
  cache slots, waiting prompts are prefilled into them, long ones a chunk per step);
- lmq fixed: the micro-batches the runner cut before continuous batching
  (``plan_micro_batches`` below, batches of ``max_rows``), each decoding until
  its last row ends (per-row limits honoured);
- transformers: ``generate`` in length-sorted batches of ``max_rows``, left-padded,
  each running to its longest row's limit, rows then cut at their limit and stop token.

Prints tokens/s (completion tokens of the job / wall time), the time to the first
finished result, the peak memory above the start of each run (resident memory sampled
on a CPU, including the allocator's cached blocks; allocated memory on a GPU), and
whether every engine gave the same tokens on every row. Runs on --device (LMQ_DEVICE's
values; auto: CUDA when there is one), in bfloat16 there by default (--dtype).

Measured 2026-12-01 on the 2-core CPU machine shared with five other agents (load 5-7,
so the figures of one run vary by up to 1.5x from one engine's turn to the next), fp32,
--threads 1, 8 rows, no GPU; every engine gave the same tokens on every row:

  issue 15's job (python bench/job_throughput.py --threads 1): 256 prompts of 9..512
  tokens (median 32), limits 8..128, 10284 completion tokens
    lmq continuous             68.0 tok/s  151.2 s  first result 1.56 s  peak  +72.4 MB
    lmq fixed micro-batches    57.8 tok/s  177.9 s  first result 9.58 s  peak  +30.6 MB
    transformers batches of 8  33.5 tok/s  306.7 s  first result 8.36 s  peak +156.7 MB
    continuous: 1.18x fixed micro-batches, 2.03x transformers
  --prompts 64 --max-prompt 512 --threads 1: 64 prompts of 10..182 tokens, 2869 tokens
    lmq continuous             79.2 tok/s   36.2 s  first result 1.06 s  peak  +28.4 MB
    lmq fixed micro-batches    48.0 tok/s   59.8 s  first result 6.13 s  peak  +16.6 MB
    transformers batches of 8  37.2 tok/s   77.2 s  first result 13.0 s  peak  +32.6 MB
    continuous: 1.65x fixed micro-batches, 2.13x transformers

On this CPU a decode step of 8 rows is compute-bound (about 0.4 GFLOP of weights per
row and step, a third of it the 32000-token head) and the prompts' prefill, the same
work in every engine, is a third to a half of the job: continuous batching keeps the
8 rows full (7.5 of 8 on average) where fixed micro-batches run 2.2x the steps with
rows emptying out, but those emptier steps cost less here. On a GPU, where a step's
cost is the weights read whatever the rows, the step count is the speed-up.
"""

import argparse
import os
import sys
import threading
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import build_models  # noqa: E402  (the bench's shared model)

from lmq.core.config import load_settings  # noqa: E402
from lmq.core.generation import PREFILL_CHUNK, DecoderOnlyModel, decode  # noqa: E402
from lmq.workers.batching import Prompt, cache_positions  # noqa: E402


def job(count, max_prompt, max_new_tokens, seed=0):
    """Prompts (ids) of long-tailed lengths in 8..max_prompt and long-tailed per-row limits."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(8 + rng.lognormal(3.2, 1.0, count), 8, max_prompt).astype(int)
    limits = np.clip(8 + rng.exponential(max_new_tokens / 4, count), 8, max_new_tokens).astype(int)
    prompts = [rng.integers(3, 32000, n).tolist() for n in lengths]
    return prompts, limits.tolist()


class PeakMemory:
    """The peak resident memory of this process above its size at the start, sampled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = _resident()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _resident())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        if torch.cuda.is_available():
            self.peak, self.start = torch.cuda.max_memory_allocated(), 0

    @property
    def megabytes(self):
        return (self.peak - self.start) / 2**20


def _resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_continuous(model, sampler, prompts, limits, stops, rows, cache_tokens, prefill_chunk):
    """The decode engine as ``generate`` and the runner call it: rows refill as they finish."""
    first = []
    start = time.perf_counter()

    def finished(request, completion):
        if not first:
            first.append(time.perf_counter() - start)

    result = decode(
        model, prompts, limits, sampler, stop_token_ids=stops, on_finish=finished,
        max_rows=rows, max_cache_tokens=cache_tokens, prefill_chunk=prefill_chunk,
    )
    return result.completions, time.perf_counter() - start, first[0]


def plan_micro_batches(
    prompts: list[Prompt], *, max_items: int, max_tokens: int, new_tokens: int = 0
) -> list[list[Prompt]]:
    """The fixed micro-batches the runner cut before continuous batching: sorted by length,
    so that a batch, padded to its longest prompt, wastes little on padding; a batch is cut
    at ``max_items`` rows or when rows x (longest prompt + ``new_tokens``) would pass
    ``max_tokens``, which bounds its memory (a longer prompt still runs, alone)."""
    batches: list[list[Prompt]] = []
    current: list[Prompt] = []
    for prompt in sorted(prompts, key=lambda p: (p.length, p.index)):
        padded_cost = (len(current) + 1) * (prompt.length + new_tokens)
        if current and (len(current) == max_items or padded_cost > max_tokens):
            batches.append(current)
            current = []
        current.append(prompt)
    if current:
        batches.append(current)
    return batches


def run_fixed(model, sampler, prompts, limits, stops, rows, cache_tokens):
    """Today's micro-batches: each decodes until its last row has ended."""
    planned = plan_micro_batches(
        [Prompt(i, "", len(p)) for i, p in enumerate(prompts)], max_items=rows, max_tokens=cache_tokens,
        new_tokens=max(limits),
    )
    outputs, first = [None] * len(prompts), None
    start = time.perf_counter()
    for batch in planned:
        index = [p.index for p in batch]
        result = decode(model, [prompts[i] for i in index], [limits[i] for i in index], sampler, stop_token_ids=stops)
        for i, completion in zip(index, result.completions):
            outputs[i] = completion
        first = first or time.perf_counter() - start
    return outputs, time.perf_counter() - start, first


def run_transformers(hf, prompts, limits, stops, rows):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs, first = [None] * len(prompts), None
    start = time.perf_counter()
    for at in range(0, len(order), rows):
        index = order[at : at + rows]
        width = max(len(prompts[i]) for i in index)
        ids = torch.zeros((len(index), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(index):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.inference_mode():
            out = hf.generate(
                ids.to(hf.device), attention_mask=mask.to(hf.device), do_sample=False,
                max_new_tokens=max(limits[i] for i in index), eos_token_id=list(stops), pad_token_id=0,
            )
        for row, i in enumerate(index):
            outputs[i] = _cut(out[row, width:].tolist()[: limits[i]], stops)
        first = first or time.perf_counter() - start
    return outputs, time.perf_counter() - start, first


def _cut(row, stops):
    """A row up to and with its first stop token (transformers pads the rest)."""
    for n, token in enumerate(row):
        if token in stops:
            return row[: n + 1]
    return row


def stop_token(model, sampler, prompts):
    """The token greedy search emits most on a few of the prompts: rows stop on it at different points."""
    probe = decode(model, prompts[:8], [48] * min(8, len(prompts)), sampler)
    return Counter(t for row in probe.completions for t in row).most_common(1)[0][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", type=int, default=8, help="rows in flight / micro-batch size (default 8)")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per decode step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: float32, bfloat16 on a GPU)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, lm = build_models(args.device, args.dtype)
    model, sampler = DecoderOnlyModel(lm.backbone), lm.sampler
    prompts, limits = job(args.prompts, args.max_prompt, args.max_new_tokens)
    stops = (stop_token(model, sampler, prompts),)
    cache_tokens = cache_positions(lm.backbone, load_settings().micro_batch_tokens)
    dtype = lm.backbone.token_embedding.embeddings.value.dtype
    print(f"job: {len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens "
          f"(median {int(np.median([len(p) for p in prompts]))}), limits {min(limits)}..{max(limits)}, "
          f"stop token {stops[0]}, {args.rows} rows, {cache_tokens} cache tokens, device {lm.backbone.device}, "
          f"{dtype}, {args.threads} threads")
    engines = {
        "lmq continuous": lambda: run_continuous(
            model, sampler, prompts, limits, stops, args.rows, cache_tokens, args.prefill_chunk
        ),
        "lmq fixed micro-batches": lambda: run_fixed(model, sampler, prompts, limits, stops, args.rows, cache_tokens),
    }
    if not args.skip_transformers:
        engines[f"transformers batches of {args.rows}"] = lambda: run_transformers(hf, prompts, limits, stops, args.rows)
    figures, reference, all_same = {}, None, True
    for name, run in engines.items():
        with PeakMemory() as memory:
            outputs, seconds, first = run()
        tokens = sum(len(row) for row in outputs)
        reference = reference or outputs
        same = outputs == reference
        all_same &= same
        figures[name] = tokens / seconds
        stopped = sum(1 for row in outputs if row and row[-1] in stops)
        print(f"{name:28s} {tokens / seconds:8.1f} tok/s  {seconds:7.1f} s  first result {first:6.2f} s  "
              f"peak +{memory.megabytes:7.1f} MB  {tokens} tokens ({stopped} rows stopped)  "
              f"same tokens as lmq continuous: {same}")
    continuous = figures["lmq continuous"]
    for name, rate in figures.items():
        if name != "lmq continuous":
            print(f"    lmq continuous / {name}: {continuous / rate:.2f}x")
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
