"""Seq2seq generation: lmq vs transformers' BartForConditionalGeneration on the same random
weights, in one process, greedy and beam search.

    pip install -e ".[bench]"    # transformers, the reference it runs against
    python bench/seq2seq.py [--repeats 3] [--threads 2] [--device cpu]

A Bart of 6 layers each side (d_model 512, 8 heads, feed-forward 2048, vocab 16000),
loaded into lmq through its checkpoint import; fp32; batch 8 of 64-token encoder inputs,
48 new tokens from the decoder start tokens, nothing stopping early. Prints tokens/s for
each sampler and the ratio, and checks both produced the same tokens. lmq and transformers
run in turn; the CPU seconds each used are printed too: on a machine shared with other
work, wall time swings with the others' load, and CPU time with one thread (--threads 1)
does not count waits for a descheduled thread, so it is the steadier figure there.
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
    vocab_size=16000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=128,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.1, pad_token_id=1, bos_token_id=0,
    eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
)
BATCH, INPUT_LENGTH, NEW_TOKENS, BEAMS = 8, 64, 48, 4
START = [2, 0]


def build_models(device):
    from transformers import BartConfig, BartForConditionalGeneration

    from lmq.core.models import Seq2SeqLM

    torch.manual_seed(0)
    hf = BartForConditionalGeneration(BartConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        lm = Seq2SeqLM.from_preset(directory)
    return hf.to(device), lm


def inputs(device):
    generator = np.random.default_rng(0)
    encoder = generator.integers(3, CONFIG["vocab_size"], (BATCH, INPUT_LENGTH))
    encoder[:, 0], encoder[:, -1] = 0, 2
    decoder = np.ones((BATCH, len(START) + NEW_TOKENS), dtype="int64")
    decoder[:, : len(START)] = START
    mask = decoder != 1
    return {
        "encoder_token_ids": encoder,
        "encoder_padding_mask": np.ones_like(encoder, dtype=bool),
        "decoder_token_ids": decoder,
        "decoder_padding_mask": mask,
    }


def run_hf(hf, batch, beams, device):
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(batch["encoder_token_ids"], device=device),
            attention_mask=torch.ones(BATCH, INPUT_LENGTH, dtype=torch.long, device=device),
            decoder_input_ids=torch.tensor([START] * BATCH, device=device),
            max_new_tokens=NEW_TOKENS, min_length=0, eos_token_id=None, forced_bos_token_id=None,
            forced_eos_token_id=None, no_repeat_ngram_size=0, do_sample=False, num_beams=beams,
            length_penalty=0.0, early_stopping=False,
        )
    return out[:, len(START):].tolist()


def run_lmq(lm, batch, beams):
    out = lm.generate(batch, stop_token_ids=None)
    return out["decoder_token_ids"][:, len(START):].tolist()


def timed(runs, repeats):
    """Median wall and CPU seconds of each of ``runs`` (callables), run in turn ``repeats`` times
    (on a shared machine a change of load then slows both sides, not one); and their last results."""
    wall, cpu, results = [[] for _ in runs], [[] for _ in runs], [None] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            results[i] = run()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [statistics.median(s) for s in wall], [statistics.median(s) for s in cpu], results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lmq.core.samplers import BeamSampler

    hf, lm = build_models(args.device)
    batch = inputs(args.device)
    identical = True
    for name, sampler, beams in (("greedy", "greedy", 1), (f"beam({BEAMS})", BeamSampler(num_beams=BEAMS), BEAMS)):
        lm.compile(sampler=sampler)
        run_lmq(lm, batch, beams), run_hf(hf, batch, beams, args.device)  # warm-up
        (lmq_seconds, hf_seconds), (lmq_cpu, hf_cpu), (ours, theirs) = timed(
            [lambda: run_lmq(lm, batch, beams), lambda: run_hf(hf, batch, beams, args.device)], args.repeats
        )
        tokens = BATCH * NEW_TOKENS
        same = ours == theirs
        identical &= same
        print(
            f"{name:8s} lmq {tokens / lmq_seconds:8.1f} tok/s  transformers {tokens / hf_seconds:8.1f} tok/s  "
            f"ratio {hf_seconds / lmq_seconds:.2f}x  (CPU seconds {lmq_cpu:.2f} / {hf_cpu:.2f}: "
            f"{hf_cpu / lmq_cpu:.2f}x)  identical tokens: {same}"
        )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
