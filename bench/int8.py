"""int8 vs float32 greedy decoding on the bench model of bench/generate.py, in one process.

    pip install -e ".[bench]"    # transformers, which builds the random weights
    python bench/int8.py [--repeats 3] [--threads 2]

Builds bench/generate.py's ~50M-parameter Llama (vocab 32000, hidden 512, 8 layers), loads
it into lmq twice, quantizes one copy with ``quantize("int8")`` (Keras' recipe: int8 kernels
with per-channel scales, activations quantized per token, ``torch._int_mm``), and runs
greedy generation on the CPU, alternating the two, for batch 8 x 32-token prompts and 64
new tokens. Prints tokens/s of each and the ratio (by the wall clock, and per CPU second of
this process, which a shared, loaded machine disturbs less), the bytes of the quantized
layers' weights (and of the whole model) in each, and the largest logit difference.

Measured on the shared 2-core CPU (AVX-512 VNNI), 1 Dec 2026, other agents' jobs running:
  --threads 2, load ~2.6: float32 300 tok/s, int8 649 tok/s: 2.17x (2.14x per CPU second);
  --threads 1, load ~9:   float32 48 tok/s, int8 93 tok/s: 1.95x (1.92x per CPU second);
  two --threads 2 runs at load 3.5-10 gave 0.70x and 0.65x (float32 ~45, int8 ~30 tok/s): each
  int8 projection is ~10 small ops (quantizing the activations) where float32 has one matmul, and
  every op's threads wait for the busy second core; on a shared machine use --threads 1.
  Weights of the quantized layers: 209.5 MiB -> 52.8 MiB (0.252). Logits: max |int8 - float32|
  3.03 of a 12.6 range on these random weights (initializer_range 0.1), same argmax at 68.8%
  of positions; against KerasHub's own int8 (tests/test_int8.py) they agree within 1e-7.
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

import lmq.core  # noqa: F401  (KERAS_BACKEND, before keras)
import keras
from lmq.core.layers.projection import Projections
from lmq.core.models import CausalLM
from generate import build_models, run_lmq  # bench/generate.py, beside this file


def weight_bytes(variables):
    return sum(keras.ops.convert_to_numpy(v.value).nbytes for v in variables)


def projection_variables(lm):
    """The variables of the layers ``quantize`` changes (kernels, their scales, embeddings)."""
    layers = [layer for layer in lm.backbone._flatten_layers() if isinstance(layer, Projections)]
    return [variable for layer in layers for variable in layer.variables]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, float_lm = build_models()
    with tempfile.TemporaryDirectory() as directory:
        float_lm.save_to_preset(directory)
        int8_lm = CausalLM.from_preset(directory)
    float_bytes = weight_bytes(projection_variables(float_lm))
    int8_lm.quantize("int8")
    int8_lm.compile(sampler="greedy")
    models = {"float32": float_lm, "int8": int8_lm}

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, 32).tolist() for _ in range(8)]
    new_tokens = 64
    for lm in models.values():
        run_lmq(lm, prompts, new_tokens, [])  # warm-up
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, lm in models.items():
            cpu_start = time.process_time()
            times[name].append(run_lmq(lm, prompts, new_tokens, [])[1])
            cpu_times[name].append(time.process_time() - cpu_start)
    tokens = len(prompts) * new_tokens
    rate = {name: tokens / statistics.median(seconds) for name, seconds in times.items()}
    cpu_rate = {name: tokens / statistics.median(seconds) for name, seconds in cpu_times.items()}

    batch = {"token_ids": np.array(prompts), "padding_mask": np.ones((8, 32), dtype=bool)}
    with torch.inference_mode():
        logits = {name: keras.ops.convert_to_numpy(lm(batch)) for name, lm in models.items()}
    int8_bytes = weight_bytes(projection_variables(int8_lm))
    print(f"batch 8 x 32-token prompts, {new_tokens} new tokens, {args.threads} threads, median of {args.repeats}")
    print(f"    float32 {rate['float32']:8.1f} tok/s   int8 {rate['int8']:8.1f} tok/s   "
          f"ratio int8/float32 {rate['int8'] / rate['float32']:.2f}x   (wall clock)")
    print(f"    float32 {cpu_rate['float32']:8.1f} tok/s   int8 {cpu_rate['int8']:8.1f} tok/s   "
          f"ratio int8/float32 {cpu_rate['int8'] / cpu_rate['float32']:.2f}x   (per CPU second)")
    print(f"    quantized layers' weights: float32 {float_bytes / 2**20:.1f} MiB, int8 {int8_bytes / 2**20:.1f} MiB "
          f"(ratio {int8_bytes / float_bytes:.3f}); whole model {weight_bytes(float_lm.weights) / 2**20:.1f} -> "
          f"{weight_bytes(int8_lm.weights) / 2**20:.1f} MiB")
    difference = np.abs(logits["int8"] - logits["float32"])
    same_argmax = np.mean(logits["int8"].argmax(-1) == logits["float32"].argmax(-1))
    print(f"    logits: max |int8 - float32| {difference.max():.4f} (float32 logits' max |value| "
          f"{np.abs(logits['float32']).max():.2f}); same argmax for {same_argmax:.1%} of positions")


if __name__ == "__main__":
    main()
