"""lmq against its peers (transformers, vLLM's CPU build) on issue 22's workloads.

    pip install -e ".[bench]"     # transformers: the reference tokens and the checkpoint
    bench/setup_vllm.sh           # optional: vLLM's CPU build in bench/.vllm-venv
    python bench/peer.py                                   # every workload, median of 3
    python bench/peer.py --repeats 1 --workloads a,ragged  # a quick look
    python bench/peer.py --engines lmq-all,transformers    # without vLLM (skipped anyway without its venv)
    python bench/peer.py --workloads prefix --engines lmq-8,lmq-8-nocache --prompts 16 --repeats 1  # small

One random ~55M-parameter Llama (bench/generate.py's shape: vocab 32000, hidden 512, 8
layers, 8 query and 2 KV heads, intermediate 1376; positions up to 1024) is written once
as a transformers checkpoint (safetensors) in a temporary directory, and every engine
loads it from there, fp32, greedy, from token-id prompts (no tokenizer, no end token:
every row generates exactly its limit). The workloads:

  a        8 prompts of 32 tokens, 64 new each
  b        64 prompts of 8..256 tokens (bench/job_throughput.py's long-tailed lengths), 96 new each
  c        b's prompts, 8..96 new per row (job_throughput's long-tailed limits)
  ragged   6 prompts of 40, 17, 33, 8, 40, 25 tokens, 48 new each
  prefix   64 prompts: one 400-token instruction, then 8..64 tokens of their own; 64 new each

The engines, each a persistent process of its own (``--worker``, JSON lines on a pipe):

  lmq-all       ``CausalLM.generate`` at its default: every prompt admitted at once, in the
                environment lmq's own processes give the CPU libraries (lmq.core.config.RUNTIME_ENVIRONMENT),
                with tcmalloc preloaded where the machine has it, as the ``lmq`` command starts
                (lmq.core.config.allocator_environment; Debian's libtcmalloc-minimal4)
  lmq-8         ``generate(..., max_rows=8)``: 8 rows in flight, the others join as rows finish
  lmq-all-nocache, lmq-8-nocache
                the same with the prefix cache off (``prefix_cache=False``): every row computes
                its whole prompt (the lmq engines above cache prompt blocks, by default)
  transformers  ``generate`` in length-sorted batches of 8, left-padded, each to its
                longest row's limit, rows then cut at their own
  vllm          ``LLM.generate`` with every prompt at once (vLLM schedules them), prefix
                caching on and its cache emptied before every run; run by bench/.vllm-venv's
                python (bench/setup_vllm.sh), with tcmalloc and Intel OpenMP preloaded

Each workload runs once per engine to warm up, then ``--repeats`` times, the engines
taking turns (``--prompts N``: each workload's first N prompts only, for a quick look).
Prints, per engine: tokens/s (median wall time) and tokens per CPU second (median
``time.process_time`` of the engine's process: every thread's CPU time, which the other
jobs of a shared machine disturb less than wall time; a spinning OpenMP pool counts too),
peak resident memory of its process during the workload (VmHWM, reset before each run:
model, runtime and cache together), ratios to vLLM, to transformers and to the same lmq
engine without its prefix cache (of the medians, and round by round: the median of each
round's ratio, which a machine's slow minutes move less), and whether each row's tokens
equal transformers' greedy tokens (mismatching rows are listed). Exits 1 when a row
differs. Figures measured here: docs/peer-bench.md.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_VENV = os.path.join(HERE, ".vllm-venv")
ENGINES = ("lmq-all", "lmq-8", "lmq-all-nocache", "lmq-8-nocache", "transformers", "vllm")
WORKLOADS = ("a", "b", "c", "ragged", "prefix")
VOCAB = 32000
# bench/generate.py's ~55M-parameter shape, with positions for the prefix workload (400 + 64 + 64;
# rotary embeddings do not depend on the maximum).
MODEL = dict(
    vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
)


# -- the workloads ------------------------------------------------------------------


def workloads(names):
    """name -> (description, prompts, limits): token-id prompts and one token limit per row."""
    import numpy as np

    job_rng = np.random.default_rng(0)  # bench/job_throughput.py's job(64, 256, 96): the same rows
    job_lengths = np.clip(8 + job_rng.lognormal(3.2, 1.0, 64), 8, 256).astype(int)
    job_limits = np.clip(8 + job_rng.exponential(96 / 4, 64), 8, 96).astype(int).tolist()
    job_prompts = [job_rng.integers(3, VOCAB, n).tolist() for n in job_lengths]
    rng = np.random.default_rng(22)
    prefix = rng.integers(3, VOCAB, 400).tolist()
    every = {
        "a": ("8 prompts of 32 tokens, 64 new", [rng.integers(3, VOCAB, 32).tolist() for _ in range(8)], [64] * 8),
        "b": ("64 prompts of 8..256 tokens, 96 new", job_prompts, [96] * 64),
        "c": ("b's prompts, 8..96 new per row", job_prompts, job_limits),
        "ragged": (
            "6 prompts of 40, 17, 33, 8, 40, 25 tokens, 48 new",
            [rng.integers(3, VOCAB, n).tolist() for n in (40, 17, 33, 8, 40, 25)],
            [48] * 6,
        ),
        "prefix": (
            "64 prompts = one 400-token prefix + 8..64 own tokens, 64 new",
            [prefix + rng.integers(3, VOCAB, n).tolist() for n in rng.integers(8, 65, 64)],
            [64] * 64,
        ),
    }
    return {name: every[name] for name in names}


def write_checkpoint(directory):
    """The random fp32 Llama, saved the way transformers saves (config.json, model.safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


# -- the engines, each in its worker process -----------------------------------------


class Lmq:
    def __init__(self, checkpoint, max_rows, prefix_cache=True):
        from lmq.core.models import CausalLM

        self.lm = CausalLM.from_preset(checkpoint, device="cpu", dtype="float32")
        self.lm.compile(sampler="greedy")
        self.max_rows = max_rows
        self.prefix_cache = prefix_cache

    def generate(self, prompts, limits):
        import numpy as np

        width = max(len(p) + n for p, n in zip(prompts, limits))
        ids = np.zeros((len(prompts), width), dtype="int64")
        mask = np.zeros((len(prompts), width), dtype=bool)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            mask[i, : len(p)] = True
        out = self.lm.generate(
            {"token_ids": ids, "padding_mask": mask}, max_new_tokens=limits, stop_token_ids=None,
            max_rows=self.max_rows, prefix_cache=self.prefix_cache,
        )
        return [out["token_ids"][i, len(p) : out["padding_mask"][i].sum()].tolist() for i, p in enumerate(prompts)]


class Transformers:
    BATCH = 8

    def __init__(self, checkpoint):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # no end token: every row runs to its limit
        self.model.generation_config.pad_token_id = 0

    def generate(self, prompts, limits):
        torch = self.torch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs = [None] * len(prompts)
        for at in range(0, len(order), self.BATCH):
            index = order[at : at + self.BATCH]
            width = max(len(prompts[i]) for i in index)
            ids = torch.zeros((len(index), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(index):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            with torch.inference_mode():
                out = self.model.generate(
                    ids, attention_mask=mask, do_sample=False, max_new_tokens=max(limits[i] for i in index)
                )
            for row, i in enumerate(index):
                outputs[i] = out[row, width : width + limits[i]].tolist()
        return outputs


class Vllm:
    def __init__(self, checkpoint):
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        self.llm = LLM(
            model=checkpoint, dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
            enable_prefix_caching=True, seed=0,
        )

    def generate(self, prompts, limits):
        self.llm.reset_prefix_cache()  # prefixes shared within a run count, a previous run's do not
        params = [
            self.SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
            for n in limits
        ]
        requests = [self.TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


def _peak_resident_bytes():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def _reset_peak_resident():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def serve(engine, checkpoint, threads):
    """A worker: loads ``engine`` once, then answers one JSON line per request line on stdin."""
    channel = os.fdopen(os.dup(1), "w")  # the replies; whatever the libraries print goes to stderr
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(threads)
    if engine == "lmq-all":
        runner = Lmq(checkpoint, max_rows=None)
    elif engine == "lmq-8":
        runner = Lmq(checkpoint, max_rows=8)
    elif engine == "lmq-all-nocache":
        runner = Lmq(checkpoint, max_rows=None, prefix_cache=False)
    elif engine == "lmq-8-nocache":
        runner = Lmq(checkpoint, max_rows=8, prefix_cache=False)
    elif engine == "transformers":
        runner = Transformers(checkpoint)
    else:
        runner = Vllm(checkpoint)
    channel.write(json.dumps({"ready": True, "resident": _peak_resident_bytes()}) + "\n")
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        _reset_peak_resident()
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = runner.generate(request["prompts"], request["limits"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        reply = {"tokens": tokens, "wall": wall, "cpu": cpu, "peak": _peak_resident_bytes()}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


# -- the driver ----------------------------------------------------------------------


class Worker:
    """An engine's process, asked to generate one workload at a time."""

    def __init__(self, engine, checkpoint, threads, python, env, log_dir):
        self.engine = engine
        self.log_path = os.path.join(log_dir, f"{engine}.log")
        self.log = open(self.log_path, "w")
        command = [python, os.path.abspath(__file__), "--worker", engine, "--checkpoint", checkpoint,
                   "--threads", str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads), **env},
        )
        self.loaded = self._reply()["resident"]

    def run(self, prompts, limits):
        self.process.stdin.write(json.dumps({"prompts": prompts, "limits": limits}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self):
        line = self.process.stdout.readline()
        if not line:
            self.log.flush()
            with open(self.log_path) as log:
                tail = log.read()[-4000:]
            raise RuntimeError(f"the {self.engine} worker ended (its log, {self.log_path}):\n{tail}")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def vllm_environment(venv, threads):
    """How vLLM's CPU build runs best here: preloaded tcmalloc and Intel OpenMP, threads bound
    to cores 0..threads-1, no CPU held back, the engine core in the worker's own process.

    Its idle threads spin 5 ms before they sleep, as vLLM sets Intel OpenMP for the workers it
    starts itself (``vllm.utils.ompmultiprocessing``): at Intel OpenMP's default of 200 ms they
    took 0.2 CPU-seconds after every run, from the engine that ran next."""
    from lmq.core.config import allocator_library

    iomp = os.path.join(venv, "lib", "libiomp5.so")
    preload = [allocator_library(), iomp if os.path.exists(iomp) else None]
    return {
        "LD_PRELOAD": ":".join(filter(None, preload)),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the largest workload needs about 0.3 of it
        "KMP_BLOCKTIME": "5",
    }


def mismatches(rows, reference):
    """(row, first differing position) of each row that differs from the reference."""
    found = []
    for i, (row, expected) in enumerate(zip(rows, reference)):
        if row != expected:
            at = next((k for k, (x, y) in enumerate(zip(row, expected)) if x != y), min(len(row), len(expected)))
            found.append((i, at))
    return found


def report(name, description, prompts, limits, figures, reference_engine):
    tokens = sum(limits)
    lengths = [len(p) for p in prompts]
    print(f"\n({name}) {description}: {len(prompts)} prompts of {min(lengths)}..{max(lengths)} tokens, "
          f"{tokens} new tokens")
    rate = {engine: tokens / statistics.median(f["wall"]) for engine, f in figures.items()}
    per_cpu = {engine: tokens / statistics.median(f["cpu"]) for engine, f in figures.items()}
    for engine, f in figures.items():
        ratios = "".join(
            f"  {rate[engine] / rate[peer]:5.2f}x {peer} (round by round {_paired(f, figures[peer]):.2f}x, "
            f"{per_cpu[engine] / per_cpu[peer]:.2f}x per CPU-s)"
            for peer in ("vllm", "transformers", f"{engine}-nocache") if peer in figures and peer != engine
        )
        wrong = f["mismatches"]
        same = "same tokens" if not wrong else f"{len(wrong)} rows differ (row, first position): {wrong[:8]}"
        print(f"  {engine:13s} {rate[engine]:7.1f} tok/s  {per_cpu[engine]:7.1f} tok/CPU-s  "
              f"peak RSS {max(f['peak']) / 2**20:6.0f} MiB{ratios}  [{same} as {reference_engine}]")


def _paired(figures, peer_figures):
    """The median of one engine's speed over a peer's, run by run: the engines of a round run
    back to back, so a machine that slows down for minutes slows both alike."""
    return statistics.median(theirs / ours for ours, theirs in zip(figures["wall"], peer_figures["wall"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and workload (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and vLLM's OpenMP) threads per engine")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {WORKLOADS}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {ENGINES}")
    parser.add_argument("--prompts", type=int, help="each workload's first N prompts only (a quick look)")
    parser.add_argument("--vllm-venv", default=VLLM_VENV, help="the venv bench/setup_vllm.sh made")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args.worker, args.checkpoint, args.threads)

    from lmq.core.config import RUNTIME_ENVIRONMENT, allocator_environment

    engines = [e for e in args.engines.split(",") if e]
    python = {engine: sys.executable for engine in engines}
    # lmq's engines run as lmq's own processes (the ``lmq`` command, workers) run: with its
    # RUNTIME_ENVIRONMENT, and tcmalloc where the machine has it
    lmq_env = {**RUNTIME_ENVIRONMENT, **allocator_environment()}
    env = {engine: dict(lmq_env) if engine.startswith("lmq") else {} for engine in engines}
    if "vllm" in engines:
        vllm_python = os.path.join(args.vllm_venv, "bin", "python")
        if os.path.exists(vllm_python):
            python["vllm"], env["vllm"] = vllm_python, vllm_environment(args.vllm_venv, args.threads)
        else:
            print(f"vLLM skipped: no venv at {args.vllm_venv} (make it with bench/setup_vllm.sh)")
            engines.remove("vllm")
    reference_engine = "transformers" if "transformers" in engines else engines[0]
    jobs = workloads([w for w in args.workloads.split(",") if w])
    if args.prompts is not None:
        jobs = {name: (text, prompts[: args.prompts], limits[: args.prompts])
                for name, (text, prompts, limits) in jobs.items()}

    with tempfile.TemporaryDirectory(prefix="lmq-peer-") as directory:
        checkpoint = os.path.join(directory, "llama")
        parameters = write_checkpoint(checkpoint)
        print(f"random Llama, {parameters / 1e6:.1f}M parameters, fp32, greedy; {args.threads} threads per engine; "
              f"{args.repeats} timed runs after a warm-up; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs; logs in {directory}")
        workers = {}
        try:
            for engine in engines:
                workers[engine] = Worker(engine, checkpoint, args.threads, python[engine], env[engine], directory)
                print(f"  {engine}: loaded, peak RSS while loading {workers[engine].loaded / 2**20:.0f} MiB")
            all_same = True
            for name, (description, prompts, limits) in jobs.items():
                figures = {engine: {"wall": [], "cpu": [], "peak": [], "mismatches": []} for engine in engines}
                outputs = {}
                for repeat in range(args.repeats + 1):  # the first is the warm-up
                    turn = repeat % len(engines)  # each run starts with the next engine: none always follows one other
                    for engine in engines[turn:] + engines[:turn]:
                        reply = workers[engine].run(prompts, limits)
                        outputs[engine] = reply["tokens"]
                        if repeat:
                            for key in ("wall", "cpu", "peak"):
                                figures[engine][key].append(reply[key])
                    for engine in engines:
                        wrong = mismatches(outputs[engine], outputs[reference_engine])
                        if wrong and not figures[engine]["mismatches"]:
                            figures[engine]["mismatches"] = wrong
                        all_same &= not wrong
                report(name, description, prompts, limits, figures, reference_engine)
            print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
        finally:
            for worker in workers.values():
                worker.close()
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
