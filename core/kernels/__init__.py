"""C++ kernels that lmq builds on the machine it runs on, where torch's own fall short.

``decode_attention`` (``decode_attention.cpp``): the attention of decoding rows, one query
each, over each row's own keys. torch's CPU SDPA works in blocks of queries, and batched
matrix products of one query a row spend most of their time outside the arithmetic: on
bench/peer.py's workload b (64 rows of 57..180 keys, 8 query and 2 KV heads of 64), one
layer's decode attention took about 280 us with this kernel's first form on an AVX-512 CPU,
880 us as two batched products in 4 runs of rows, over 1,000 us with SDPA; reading the keys
and values once took 150 us. It works in the CPU's own vector width: on an AVX2 CPU (AMD
EPYC, Zen 3) the same layer takes 389 us, where 16-float vectors, split by the compiler
through the stack, took 1,272.

``rotary`` (``rotary.cpp``): rotary position embedding of a step's queries and keys in one call,
each in one pass, rounded as torch's five passes and concatenation round it.

``rms_norm`` (``rms_norm.cpp``): RMS norm of each row in one pass (torch's eager form takes
six); its sum of squares is added in another order, so it differs by float rounding.

``argmax`` (``argmax.cpp``): greedy decoding's pick, each row's first largest logit, in two
vectorized passes where torch's argmax keeps an index beside each value (about 5x as fast on
64 rows of 32,000 here).

``silu_mul`` (``silu_mul.cpp``): a gated feed-forward's ``silu(gate) * up`` in one pass where torch
takes two and a tensor between, computed as torch's vectorized SiLU computes it (Sleef's exp), so
the same to the bit: 214 us against 280 over 512 rows of 1,376 here.

``linear`` (``linear.cpp``): a float32 projection through a kernel packed once into panels of
columns (``pack_linear``), each panel read once per call for up to 6 rows at a time, the next one
fetched meanwhile. On an AVX2 CPU (AMD EPYC, Zen 3, 2 threads) it takes 0.4x-0.8x the time of
oneDNN's GEMM at a decode step's 1..64 rows, where oneDNN read a kernel at a third to a half of the
memory's speed, and 0.8x-1.05x at 1,024 rows; over up to 512 inputs it sums as oneDNN's does, to
the bit. With AVX-512, oneDNN's read a kernel at the memory's speed already (docs/peer-bench.md),
and it serves there (``lmq.core.layers.projection.OWN_GEMM``).

``write_kv`` (``write_kv.cpp``): a flattened step's keys and values into their cache rows, one
call for both, where torch's indexed assignment spends about 30 us a call building its index
iterator.

The kernels are compiled together on the first use of any, as one translation unit, by the
machine's C++ compiler (``c++``) for its own CPU and against the installed torch, and kept in
``~/.cache/lmq/kernels`` under a name that hashes the sources, the command and the CPU, so a
later process loads them at once: one build of them all takes about 10 s here, where each alone
took 5-6 s. Without a compiler, or once ``configure(enabled=False)`` ran (a worker does with
``LMQ_COMPILE=off``), a kernel is None and its callers use torch's eager ops.
"""

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "lmq" / "kernels"
log = logging.getLogger(__name__)
_enabled = True


def configure(enabled):
    """Turns lmq's kernels on (the default) or off, for every model of this process from now."""
    global _enabled
    _enabled = enabled


def decode_attention():
    """``torch.ops.lmq_kernels.decode_attention(queries, keys, values, lengths)``, or None."""
    return _operator("decode_attention")


def rotary():
    """``torch.ops.lmq_kernels.rotary(query, key, cos, sin)``, or None."""
    return _operator("rotary")


def argmax():
    """``torch.ops.lmq_kernels.argmax(x)``, or None."""
    return _operator("argmax")


def rms_norm():
    """``torch.ops.lmq_kernels.rms_norm(x, scale, epsilon)``, or None."""
    return _operator("rms_norm")


def silu_mul():
    """``torch.ops.lmq_kernels.silu_mul(gate, up)``, or None."""
    return _operator("silu_mul")


def linear():
    """``torch.ops.lmq_kernels.linear(x, packed, outputs, bias)``, or None."""
    return _operator("linear")


def pack_linear():
    """``torch.ops.lmq_kernels.pack_linear(kernel)`` (``linear``'s panels of a kernel [in, out]), or None."""
    return _operator("pack_linear")


def write_kv():
    """``torch.ops.lmq_kernels.write_kv(cache_keys, cache_values, keys, values, rows, positions)``, or None."""
    return _operator("write_kv")


def _operator(name):
    """``torch.ops.lmq_kernels.{name}`` while lmq's kernels are on and built, else None."""
    return getattr(torch.ops.lmq_kernels, name) if _enabled and _loaded() else None


@functools.cache
def _loaded():
    """Whether lmq's kernels (every ``*.cpp`` here, built as one translation unit: torch's headers
    are parsed once) are loaded as torch operators, compiled first when no build of these sources,
    command and CPU is cached; tried once per process, False (logged) when they cannot be built
    or loaded."""
    compiler = shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler (c++): lmq's kernels are off, torch's ops serve")
        return False
    sources = sorted(HERE.glob("*.cpp"))
    unit = "".join(f'#include "{source}"\n' for source in sources)
    library = Path(torch.utils.cpp_extension.library_paths()[0])
    flags = [
        "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in torch.utils.cpp_extension.include_paths()),
    ]
    # after the source, which needs them
    libraries = [f"-L{library}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{library}"]
    texts = [path.read_text() for path in [*sources, *sorted(HERE.glob("*.h"))]]  # what the unit includes
    build = "\0".join([unit, *texts, compiler, *flags, *libraries, _cpu()])
    key = hashlib.sha256(build.encode()).hexdigest()[:16]
    built = CACHE / f"lmq_kernels-{key}.so"
    try:
        if not built.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=CACHE) as scratch:  # the same directory: os.replace is atomic
                output, source = Path(scratch) / built.name, Path(scratch) / "lmq_kernels.cpp"
                source.write_text(unit)
                command = [compiler, *flags, str(source), *libraries, "-o", str(output)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    log.warning("lmq's kernels did not compile, torch's ops serve:\n%s", done.stderr[-2000:])
                    return False
                os.replace(output, built)
        torch.ops.load_library(str(built))
    except OSError as error:  # an unwritable cache, a library that does not load
        log.warning("lmq's kernels are off, torch's ops serve: %s", error)
        return False
    return True


def _cpu():
    """What -march=native compiles for: the CPU's model and flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as info:
            return "".join(line for line in info.read().split("\n\n")[0].splitlines(True)
                           if line.startswith(("model name", "flags")))
    except OSError:
        return platform.machine() + platform.processor()
