"""Settings from the environment.

Every process (CLI, API, worker) reads the same variables, so one environment
wires a whole deployment. Nothing here imports keras or torch.

    LMQ_HOME                 ~/.lmq: the SQLite database and the preset store
    LMQ_DATABASE_URL         default sqlite:///$LMQ_HOME/lmq.db; postgresql+psycopg://... in production
    LMQ_BROKER_URL           unset: jobs run in-process; redis://...: Celery workers run them
    LMQ_API_TOKENS           token1:tenant-a,token2:tenant-b
    LMQ_PRESET_ROOTS         directories (os.pathsep-separated) the API may load local presets from;
                             default: the preset store and the repository's demo/ (its shipped demo preset)
    LMQ_MODEL_MEMORY_GB      16: weights a worker keeps pinned before evicting the least recently used
    LMQ_JOB_TIMEOUT_S        86400: the longest job; Redis's visibility timeout is set above it
                             (recovery from a dead worker does not wait for it: see LMQ_LEASE_S)
    LMQ_LEASE_S              30: a running job whose worker has not renewed its lease for this long
                             is taken over by another worker (see core/store/leases.py)
    LMQ_HEARTBEAT_S          5: how often a worker renews the lease of the job it runs
    LMQ_SWEEP_S              10: how often each worker re-sends the jobs the broker lost (workers/sweep.py)
    LMQ_MICRO_BATCH_SIZE     16: the most requests a job decodes at once, finished rows refilled
                             (continuous batching). A job may set its own (micro_batch_size); on a GPU,
                             one that does not gets more when its cache holds them (workers/batching.py)
    LMQ_MICRO_BATCH_TOKENS   16384: the KV-cache positions (rows x positions per row) a job decodes in;
                             on a GPU, as many as 80% of its free memory holds when that is more
    LMQ_WORKER_JOBS          4: the jobs a worker (`lmq worker`'s Celery thread pool, or `lmq serve`'s
                             in-process worker) runs at once; generate jobs on one model share its engine
    LMQ_TENANT_ROW_SHARE     0.5: the share of a shared engine's rows one tenant's jobs hold at most while
                             another tenant's wait (1: no bound)
    LMQ_PREFIX_CACHE         on: a generate job computes the KV of a prompt prefix its rows share once
                             (blocks of 16 tokens, in a quarter of LMQ_MICRO_BATCH_TOKENS, least recently
                             used evicted; core/generation/prefix_cache.py); off: every row computes its own
    LMQ_COMPILE              on: a worker's models generate on a CPU with kernels lmq compiles for the machine
                             on first use (core/kernels: C++ decode attention, rotary, RMS norm, argmax); off: torch's eager ops
    LMQ_MAX_INPUTS           100000: inputs (or training examples) per job the API accepts
    LMQ_MAX_PROMPT_CHARS     32768: characters per prompt or training text
    LMQ_MAX_LENGTH           8192: the largest max_length or sequence_length a job may ask for
    LMQ_MAX_NEW_TOKENS       4096: the largest max_new_tokens
    LMQ_MAX_EPOCHS           100: the most epochs a fit job may ask for
    LMQ_MAX_BATCH_SIZE       1024: the largest fit batch size
    LMQ_MAX_FILE_BYTES       209715200 (200 MiB, OpenAI's limit): the largest file POST /v1/files takes
    LMQ_PRESET_QUEUES        preset=queue,...: jobs on these presets go to queue lmq.<kind>.<queue>,
                             served by workers started with `lmq worker --queues <kind>.<queue>`
    LMQ_WORKER_METRICS_PORT  unset: off; a port: each `lmq worker` serves its Prometheus metrics
                             at http://<host>:<port>/metrics (workers/metrics.py)
    LMQ_STORAGE_URL          file://$LMQ_HOME: where uploads, fit checkpoints and presets made here are kept;
                             s3://bucket/prefix for many hosts (AWS_* credentials, AWS_ENDPOINT_URL for an
                             S3-compatible server; docs/storage.md)
    LMQ_STORAGE_RETRY_S      30: how long a read or write of the object store is retried before it fails
    LMQ_PRESET_CACHE_GB      50: the presets from a remote object store each host keeps on its disk
    LMQ_DRAIN_S              60: a worker told to stop (SIGTERM) hands back its job at its next write, and
                             after this long at the latest
    LMQ_DEVICE               auto: where workers run models - cuda when torch sees a GPU, else cpu;
                             or cpu, cuda, cuda:N. On a GPU a preset loads in bfloat16 unless the
                             job asks for a dtype
"""

from __future__ import annotations

import ctypes.util
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEMO_PRESETS = Path(__file__).resolve().parent.parent / "demo"


# What lmq's own generating processes (the CLI, the API, workers: ``workers.runner.pool_from_settings``)
# give the CPU libraries before those first run, unless set already. oneDNN keeps the GEMM of each
# shape it has run (1024 by default), and a continuous batch's steps come in many row counts: on
# issue 22's workloads 16 ran as fast and kept 70 MiB less (docs/peer-bench.md).
RUNTIME_ENVIRONMENT = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}


# The memory allocator lmq's own processes (the ``lmq`` command: its jobs, ``lmq serve``, ``lmq worker``)
# run with where the machine has it: tcmalloc (Debian and Ubuntu: libtcmalloc-minimal4), as vLLM's CPU
# build asks for too. oneDNN's GEMM allocates several buffers on every call, and glibc's malloc made a
# call cost 18 us against tcmalloc's 11 at the smallest shapes here (docs/peer-bench.md).
ALLOCATOR = "tcmalloc_minimal"


def allocator_library() -> str | None:
    """tcmalloc's shared library (its name, for ``LD_PRELOAD``) where the machine has it, else None."""
    return ctypes.util.find_library(ALLOCATOR) if sys.platform.startswith("linux") else None


def allocator_environment(environ=os.environ) -> dict[str, str]:
    """``{"LD_PRELOAD": tcmalloc}`` for a process to start with, where the machine has tcmalloc and
    ``environ`` sets no ``LD_PRELOAD`` (set one, even empty, to choose for yourself); else {}."""
    library = None if "LD_PRELOAD" in environ else allocator_library()
    return {"LD_PRELOAD": library} if library else {}


def set_runtime_environment() -> None:
    """``RUNTIME_ENVIRONMENT`` in this process's environment, where it does not say otherwise."""
    for name, value in RUNTIME_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


class SettingsError(ValueError):
    """An LMQ_* variable that cannot be used."""


@dataclass(frozen=True)
class Limits:
    """What one API request may ask for (LMQ_MAX_*), so that one client cannot swamp the workers."""

    inputs_per_job: int = 100_000
    prompt_chars: int = 32_768
    max_length: int = 8192
    max_new_tokens: int = 4096
    epochs: int = 100
    batch_size: int = 1024
    file_bytes: int = 200 * 2**20


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str | None
    api_tokens: dict[str, str]
    preset_roots: tuple[Path, ...]
    model_memory_gb: float
    job_timeout_s: int
    micro_batch_size: int
    micro_batch_tokens: int
    prefix_cache: bool = True
    compile: bool = True
    limits: Limits = field(default_factory=Limits)
    preset_queues: dict[str, str] = field(default_factory=dict)
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    sweep_s: float = 10.0
    worker_metrics_port: int | None = None
    device: str = "auto"
    storage_url: str = ""
    storage_retry_s: float = 30.0
    preset_cache_gb: float = 50.0
    drain_s: float = 60.0
    worker_jobs: int = 4
    tenant_row_share: float = 0.5

    @property
    def preset_store(self) -> Path:
        """Where fine-tuned and imported presets live on a local object store (LMQ_STORAGE_URL; by default
        $LMQ_HOME/presets). A remote store keeps them as manifests instead (core/storage/presets.py)."""
        url = self.storage_url or home_storage_url(self.home)
        return Path(url.removeprefix("file://")) / "presets" if url.startswith("file://") else self.home / "presets"

    @property
    def embedded(self) -> bool:
        """No broker: jobs run in the process that asks for them."""
        return self.broker_url is None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def visibility_timeout_s(self) -> int:
        """Above the longest job, so Redis never hands a live job to a second worker."""
        return math.ceil(self.job_timeout_s * 1.1) + 1


def _int(environ, name: str, default: int | None, minimum: int = 1) -> int | None:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _switch(environ, name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    if raw.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise SettingsError(f"{name} must be on or off, got {raw!r}")
    return raw.lower() in ("on", "true", "1")


def _float(environ, name: str, default: float) -> float:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _share(environ, name: str, default: float) -> float:
    value = _float(environ, name, default)
    if value > 1:
        raise SettingsError(f"{name} is a share of the rows, at most 1, got {value:g}")
    return value


def _pairs(raw: str, separator: str, variable: str, shape: str) -> dict[str, str]:
    """`a<sep>b,c<sep>d` -> {a: b, c: d}, naming the variable and the entry that does not parse."""
    pairs = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        key, found, value = entry.partition(separator)
        if not found or not key.strip() or not value.strip():
            raise SettingsError(f"{variable} entry {entry!r} is not {shape}")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_api_tokens(raw: str) -> dict[str, str]:
    """`token1:tenant-a,token2:tenant-b` -> {token: tenant}."""
    return _pairs(raw, ":", "LMQ_API_TOKENS", "token:tenant")


def load_settings(environ=None) -> Settings:
    """Read settings now (not at import), so tests and subprocesses see their own env."""
    environ = os.environ if environ is None else environ
    home = Path(environ.get("LMQ_HOME") or Path.home() / ".lmq").expanduser()
    database_url = environ.get("LMQ_DATABASE_URL") or f"sqlite:///{home / 'lmq.db'}"
    roots = environ.get("LMQ_PRESET_ROOTS")
    storage_url = _storage_url(environ.get("LMQ_STORAGE_URL"), home)
    store = Path(storage_url.removeprefix("file://")) if storage_url.startswith("file://") else home
    preset_roots = (
        tuple(Path(p).expanduser().resolve() for p in roots.split(os.pathsep) if p)
        if roots
        else ((store / "presets").resolve(), DEMO_PRESETS)
    )
    return Settings(
        home=home,
        database_url=database_url,
        broker_url=environ.get("LMQ_BROKER_URL") or None,
        api_tokens=parse_api_tokens(environ.get("LMQ_API_TOKENS", "")),
        preset_roots=preset_roots,
        model_memory_gb=_float(environ, "LMQ_MODEL_MEMORY_GB", 16.0),
        job_timeout_s=_int(environ, "LMQ_JOB_TIMEOUT_S", 24 * 3600),
        micro_batch_size=_int(environ, "LMQ_MICRO_BATCH_SIZE", 16),
        micro_batch_tokens=_int(environ, "LMQ_MICRO_BATCH_TOKENS", 16384),
        prefix_cache=_switch(environ, "LMQ_PREFIX_CACHE", True),
        compile=_switch(environ, "LMQ_COMPILE", True),
        limits=load_limits(environ),
        preset_queues=_pairs(environ.get("LMQ_PRESET_QUEUES", ""), "=", "LMQ_PRESET_QUEUES", "preset=queue"),
        worker_metrics_port=_int(environ, "LMQ_WORKER_METRICS_PORT", None),
        device=_device(environ.get("LMQ_DEVICE") or "auto"),
        storage_url=storage_url,
        storage_retry_s=_float(environ, "LMQ_STORAGE_RETRY_S", 30.0),
        preset_cache_gb=_float(environ, "LMQ_PRESET_CACHE_GB", 50.0),
        drain_s=_float(environ, "LMQ_DRAIN_S", 60.0),
        worker_jobs=_int(environ, "LMQ_WORKER_JOBS", 4),
        tenant_row_share=_share(environ, "LMQ_TENANT_ROW_SHARE", 0.5),
        **load_lease_timing(environ),
    )


def _device(raw: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", raw):
        raise SettingsError(f"LMQ_DEVICE must be auto, cpu, cuda or cuda:N, got {raw!r}")
    return raw


def _storage_url(raw: str | None, home: Path) -> str:
    """The object store's root URL; by default the home directory itself, so one machine keeps its bytes where it always has."""
    if not raw:
        return home_storage_url(home)
    scheme, found, rest = raw.partition("://")
    if not found or scheme not in ("file", "s3") or not rest.strip("/"):
        raise SettingsError(f"LMQ_STORAGE_URL must be file:///path or s3://bucket[/prefix], got {raw!r}")
    return raw.rstrip("/")


def home_storage_url(home: Path) -> str:
    return f"file://{home.resolve()}"


def load_lease_timing(environ) -> dict[str, float]:
    """Lease, heartbeat and sweep periods; a heartbeat must come well inside its lease."""
    lease_s = _float(environ, "LMQ_LEASE_S", 30.0)
    heartbeat_s = _float(environ, "LMQ_HEARTBEAT_S", 5.0)
    if heartbeat_s * 2 > lease_s:
        raise SettingsError(
            f"LMQ_HEARTBEAT_S ({heartbeat_s:g}) must be at most half of LMQ_LEASE_S ({lease_s:g}), "
            "or a slow heartbeat loses the lease of a live worker"
        )
    return {"lease_s": lease_s, "heartbeat_s": heartbeat_s, "sweep_s": _float(environ, "LMQ_SWEEP_S", 10.0)}


def load_limits(environ) -> Limits:
    defaults = Limits()
    return Limits(
        inputs_per_job=_int(environ, "LMQ_MAX_INPUTS", defaults.inputs_per_job),
        prompt_chars=_int(environ, "LMQ_MAX_PROMPT_CHARS", defaults.prompt_chars),
        max_length=_int(environ, "LMQ_MAX_LENGTH", defaults.max_length),
        max_new_tokens=_int(environ, "LMQ_MAX_NEW_TOKENS", defaults.max_new_tokens),
        epochs=_int(environ, "LMQ_MAX_EPOCHS", defaults.epochs),
        batch_size=_int(environ, "LMQ_MAX_BATCH_SIZE", defaults.batch_size),
        file_bytes=_int(environ, "LMQ_MAX_FILE_BYTES", defaults.file_bytes),
    )
