"""lmq and transformers on one GPU: tokens/s at batch 1, 64 and 256, and at batch 1 the
share of the HBM bandwidth bound reached. Run it through bench/gpu.sh, which brings
keras and lmq's other pure-Python needs from wheels to a Python that has only torch and
transformers.

    bench/gpu.sh                  # Llama-3-8B shape (the 1B shape when the GPU's free memory is short)
    bench/gpu.sh --shape 1b       # Llama-3.2-1B shape
    bench/gpu.sh --smoke          # tiny shape on the CPU: the script end to end, without a GPU

The model: a Llama-3-8B-shaped Llama (vocab 128256, hidden 4096, 32 layers, 32 query and 8
KV heads, intermediate 14336) with random bf16 weights (--dtype), built by transformers on the
device, saved as a transformers checkpoint (in /dev/shm when it has room) and loaded from
there by lmq (``CausalLM.from_preset(directory, device=...)``, LMQ_DEVICE's values). Every
row: a random 128-token prompt, greedy, 128 new tokens, no end token. lmq generates every
row at once (its default); transformers one ``generate`` over the batch. Each engine warms
up at each batch size (8 new tokens) before its timed run; the engines alternate.

The bandwidth bound at batch 1: each decode step reads every weight once (the input
embedding table aside, of which it reads one row; a tied head reads it whole), so a step
cannot beat weight bytes / peak bandwidth. The step time is (time for 128 new tokens -
time for 1) / 127, which leaves the prefill out. The peak is the GPU's data-sheet HBM
bandwidth, by device name (``--peak-tbps`` for others).
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
# Data-sheet HBM bandwidth, TB/s; the first name contained in the device's name wins.
PEAK_TBPS = (
    ("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H800", 3.35),
    ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864),
    ("A10G", 0.6), ("L4", 0.3),
)
# Free memory the 8B shape needs: two copies of its bf16 weights (lmq's and transformers') and the
# KV caches of 256 rows of 256 positions.
EIGHT_B_NEEDS = 48 * 2**30


def build_checkpoint(shape, device, directory, dtype):
    """transformers' Llama of ``shape`` with random ``dtype`` weights on ``device``, saved in ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # no end token: every row runs to its limit
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model


def weight_bytes_per_step(model):
    """The bytes one decode step reads: every weight, the input embedding table aside when untied."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        embedding = model.get_input_embeddings().weight
        total -= embedding.numel() * embedding.element_size()
    return total


def peak_bandwidth(device_name, override):
    if override:
        return override * 1e12
    for name, tbps in PEAK_TBPS:
        if name in device_name:
            return tbps * 1e12
    return None


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_lmq(lm, prompts, new_tokens):
    ids = np.concatenate([prompts, np.zeros((len(prompts), new_tokens), dtype="int64")], axis=1)
    mask = np.zeros(ids.shape, dtype=bool)
    mask[:, : prompts.shape[1]] = True
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=new_tokens, stop_token_ids=None)
    return out["token_ids"][:, prompts.shape[1] :]


def run_transformers(model, prompts, new_tokens):
    ids = torch.as_tensor(prompts, device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens)
    return out[:, prompts.shape[1] :].cpu().numpy()


def timed(run, device):
    """(tokens, seconds, peak device memory above the start in bytes; 0 on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    synchronize(device)
    start = time.perf_counter()
    tokens = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    above = torch.cuda.max_memory_allocated() - start_memory if device.startswith("cuda") else 0
    return tokens, seconds, above


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, few tokens")
    parser.add_argument("--shape", choices=SHAPES, help="default: 8b, or 1b when the GPU's free memory is short")
    parser.add_argument("--device", default=os.environ.get("LMQ_DEVICE", "auto"), help="auto, cuda, cuda:N, cpu")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="float32: the same kernels' arithmetic, so every row's tokens should match")
    parser.add_argument("--peak-tbps", type=float, help="the GPU's peak memory bandwidth, when its name is not known")
    parser.add_argument("--time-limit", type=float, default=420, help="seconds; later runs are skipped past it")
    args = parser.parse_args()
    started = time.perf_counter()
    import lmq.core  # noqa: F401  (KERAS_BACKEND, before keras)
    from lmq.core.models import CausalLM
    from lmq.core.models.task import resolve_device

    if args.smoke:
        args.shape, args.device, args.batches, args.prompt_tokens, args.new_tokens = "tiny", "cpu", "1,4,8", 16, 8
    device = resolve_device(args.device)
    on_gpu = device.startswith("cuda")
    device_name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    if args.shape is None:
        free = torch.cuda.mem_get_info(device)[0] if on_gpu else 0
        args.shape = "8b" if free >= EIGHT_B_NEEDS else "1b"
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40 * 2**30 else None
    with tempfile.TemporaryDirectory(dir=scratch, prefix="lmq-gpu-") as directory:
        hf = build_checkpoint(args.shape, device, directory, args.dtype)
        lm = CausalLM.from_preset(directory, device=device, dtype=args.dtype)
    lm.compile(sampler="greedy")
    step_bytes = weight_bytes_per_step(hf)
    parameters = sum(p.numel() for p in hf.parameters())
    print(f"{device_name}: Llama {args.shape} shape, {parameters / 1e9:.3g}B parameters, {args.dtype}, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy; "
          f"built and loaded in {time.perf_counter() - started:.0f} s")

    engines = {"lmq": lambda p, n: run_lmq(lm, p, n), "transformers": lambda p, n: run_transformers(hf, p, n)}
    rng = np.random.default_rng(0)
    step_seconds = {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt_tokens)).astype("int64")
        outputs = {}
        for name, run in engines.items():
            if time.perf_counter() - started > args.time_limit:
                print(f"  batch {batch:3d} {name}: skipped, past --time-limit {args.time_limit:.0f} s")
                continue
            run(prompts, 8)  # warm-up at this batch size
            outputs[name], seconds, memory = timed(lambda: run(prompts, args.new_tokens), device)
            line = (f"  batch {batch:3d} {name:12s} {batch * args.new_tokens / seconds:9.1f} tok/s  {seconds:6.2f} s"
                    + (f"  peak {memory / 2**30:5.1f} GiB above the weights" if on_gpu else ""))
            if batch == 1:
                _, first, _ = timed(lambda: run(prompts, 1), device)
                step_seconds[name] = (seconds - first) / (args.new_tokens - 1)
                line += f"  decode step {step_seconds[name] * 1e3:6.2f} ms"
            print(line)
        if len(outputs) == 2:
            same = sum(np.array_equal(a, b) for a, b in zip(outputs["lmq"], outputs["transformers"]))
            print(f"  batch {batch:3d} rows with identical tokens ({args.dtype}): {same}/{batch}")

    peak = peak_bandwidth(device_name, args.peak_tbps)
    bound = step_bytes / peak if peak else None
    print(f"batch 1 bandwidth bound: {step_bytes / 1e9:.2f} GB of weights per step" + (
        f" / {peak / 1e12:.2f} TB/s = {bound * 1e3:.2f} ms" if bound else " (peak bandwidth unknown: --peak-tbps)"))
    for name, seconds in step_seconds.items():
        reached = f"{bound / seconds:.1%} of the bound" if bound else "n/a"
        print(f"  {name:12s} {step_bytes / seconds / 1e9:8.1f} GB/s of weights  {reached}")
    print(f"finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
