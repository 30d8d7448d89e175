"""What a worker did, for Prometheus and for the log: tokens, rows in flight and
committed, the model pool, jobs and leases.

The metrics live in this process's default registry. `lmq worker` serves them
on LMQ_WORKER_METRICS_PORT from a thread of their own (prometheus_client's
HTTP server), so they answer while the job threads run.
Tokens per second is `rate(lmq_generated_tokens_total[1m])`. The job runner
calls the functions below at each step; each also logs one `key=value` line
(core/logfmt.py) on the `lmq.worker` logger.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from lmq.core.logfmt import logfmt

logger = logging.getLogger("lmq.worker")

# Seconds from a tiny job on a CPU to a day-long fine-tuning run.
JOB_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

GENERATED_TOKENS = Counter("lmq_generated_tokens", "Tokens generated (completion tokens of finished rows)")
PROMPT_TOKENS = Counter("lmq_prompt_tokens", "Prompt tokens processed by generate jobs")
GENERATED_ROWS = Counter("lmq_generated_rows", "Inputs finished by generate jobs", ["outcome"])
ROWS_IN_FLIGHT = Gauge("lmq_rows_in_flight", "Inputs the decode engine may hold now (at most its row budget)")
POOL_HITS = Counter("lmq_model_pool_hits", "Jobs that found their model pinned in the pool")
POOL_MISSES = Counter("lmq_model_pool_misses", "Jobs that had to load their model")
POOL_EVICTIONS = Counter("lmq_model_pool_evictions", "Models evicted from the pool to make room")
MODEL_LOAD_SECONDS = Histogram("lmq_model_load_seconds", "Time to load a model into the pool", buckets=LOAD_BUCKETS)
FIT_STEPS = Counter("lmq_fit_steps", "Training steps run by fit jobs")
JOB_SECONDS = Histogram(
    "lmq_job_duration_seconds", "One attempt at a job, by kind and the state it left the job in",
    ["kind", "state"], buckets=JOB_BUCKETS,
)
PREFIX_QUERIED_TOKENS = Counter("lmq_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache")
PREFIX_HIT_TOKENS = Counter("lmq_prefix_cache_hit_tokens", "Prompt tokens the prefix cache held (not computed)")
PREFIX_HIT_RATE = Gauge("lmq_prefix_cache_hit_rate", "Share of the last decode call's prompt tokens found cached")
PREFIX_BLOCKS = Gauge("lmq_prefix_cache_blocks", "Blocks of prompt KV the prefix cache of the last decode call holds")
PREFIX_CAPACITY = Gauge("lmq_prefix_cache_capacity_blocks", "Blocks the prefix cache of the last decode call may hold")
LEASE_RENEWALS = Counter("lmq_lease_renewals", "Lease renewals (every fenced write and heartbeat)")
LEASE_RECOVERIES = Counter("lmq_lease_recoveries", "Jobs taken over from a worker whose lease had run out")


def serve(port: int | None) -> None:
    """Serve /metrics on `port` in a daemon thread; nothing when the port is unset."""
    if port is not None:
        start_http_server(port)
        logger.info(logfmt("metrics_server", port=port))


def job_started(job_id: str, kind: str, attempt: int) -> None:
    """The job was claimed; a second or later attempt took it over from a worker whose lease ran out."""
    if attempt > 1:
        LEASE_RECOVERIES.inc()
    logger.info(logfmt("job_state", job=job_id, state="running", kind=kind, attempt=attempt))


def job_ended(job_id: str, kind: str, state: str | None, seconds: float) -> None:
    """After an attempt: the state it left (running, when the lease was lost to another worker)."""
    JOB_SECONDS.labels(kind=kind, state=state or "unknown").observe(seconds)
    logger.info(logfmt("job_state", job=job_id, state=state, kind=kind, seconds=seconds))


def model_ready(job_id: str, preset: str, hit: bool, load_seconds: float, evicted: list[str]) -> None:
    (POOL_HITS if hit else POOL_MISSES).inc()
    if not hit:
        MODEL_LOAD_SECONDS.observe(load_seconds)
    POOL_EVICTIONS.inc(len(evicted))
    logger.info(
        logfmt("model", job=job_id, preset=preset, pool_hit=hit, load_seconds=load_seconds, evicted=len(evicted))
    )


@contextmanager
def in_flight(rows: int):
    """Counts `rows` in lmq_rows_in_flight while the block runs."""
    ROWS_IN_FLIGHT.inc(rows)
    try:
        yield
    finally:
        ROWS_IN_FLIGHT.dec(rows)


def results_committed(job_id: str, results, done: int, total: int) -> None:
    """A group of finished rows (queries.ItemResult) is in SQL: the scheduler's tick."""
    prompt_tokens = sum(result.prompt_tokens or 0 for result in results)
    completion_tokens = sum(result.completion_tokens or 0 for result in results)
    errors = sum(result.error is not None for result in results)
    PROMPT_TOKENS.inc(prompt_tokens)
    GENERATED_TOKENS.inc(completion_tokens)
    GENERATED_ROWS.labels(outcome="error").inc(errors)
    GENERATED_ROWS.labels(outcome="ok").inc(len(results) - errors)
    logger.info(
        logfmt(
            "results", job=job_id, rows=len(results), errors=errors, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, done=done, total=total,
        )
    )


_PREFIX_COUNTED = weakref.WeakKeyDictionary()  # PrefixCache -> (queried, hit) tokens already counted


@contextmanager
def prefix_caching(job_id: str, cache):
    """Around a decode call with a ``PrefixCache`` (its own, or a shared engine's, which jobs
    use at once; or False: none): what it found since last counted, and holds, once it ends.
    The hit rate over time is
    ``rate(lmq_prefix_cache_hit_tokens_total[5m]) / rate(lmq_prefix_cache_queried_tokens_total[5m])``."""
    try:
        yield
    finally:
        if cache and cache.queried_tokens:  # an encoder-decoder's call looks nothing up
            queried, hit = _PREFIX_COUNTED.get(cache, (0, 0))
            _PREFIX_COUNTED[cache] = (cache.queried_tokens, cache.hit_tokens)
            PREFIX_QUERIED_TOKENS.inc(cache.queried_tokens - queried)
            PREFIX_HIT_TOKENS.inc(cache.hit_tokens - hit)
            PREFIX_HIT_RATE.set(cache.hit_rate)
            PREFIX_BLOCKS.set(len(cache.blocks))
            PREFIX_CAPACITY.set(cache.capacity)
            logger.info(
                logfmt(
                    "prefix_cache", job=job_id, queried_tokens=cache.queried_tokens, hit_tokens=cache.hit_tokens,
                    blocks=len(cache.blocks), capacity=cache.capacity,
                )
            )


def fit_step(job_id: str, step: int, total: int, loss: float | None) -> None:
    FIT_STEPS.inc()
    logger.info(logfmt("fit_step", job=job_id, step=step, total=total, loss=loss))
