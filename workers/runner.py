"""The job runner: what a worker does with a job id.

Celery workers and the embedded mode (`lmq generate`, `lmq fit`) run jobs
through this same code. Running a job is idempotent: a job that is already
finished is left alone, a job another worker holds a live lease on is left to
it, and a job taken over from a dead worker continues with the items that have
no result yet. Every write is fenced by the lease (workers/attempt.py), so a
worker killed or paused at any moment loses at most the rows it had in flight
(results are committed in small groups as rows finish, see ResultGroup), and
never writes over another worker's results.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import threading
import time

from lmq.core.config import Settings, set_runtime_environment
from lmq.core.names import TERMINAL_STATES
from lmq.core.store import JobKind, JobState, batch_files, queries, session_scope, sessions
from lmq.core.store.db import DatabaseUnavailable, transact
from lmq.core.store.leases import Lease, LeaseLost, claim, holder_name
from lmq.core.store.presets import store_resolver
from lmq.workers import metrics
from lmq.workers.attempt import Attempt, ProgressCallback
from lmq.workers.batching import Prompt, RowBudget, is_out_of_memory, row_budget, shared_engine
from lmq.workers.inputs import group_sampler, plan
from lmq.workers.pool import ModelPool, adapter_base

logger = logging.getLogger(__name__)

PLANNING_WINDOW = 4096  # inputs read, tokenized and grouped together (see _pending)
JOB_ARGUMENTS = ("max_length", "strip_prompt")  # every row's; the others may be an item's own (workers/inputs.py)
SHARED_ENGINE = ("engine", "priority", "tenant")  # how rows join the pinned model's shared engine


_MODEL_STACK = threading.Lock()


def import_model_stack() -> None:
    """Imports torch, keras and the model library once, under a lock, before a job uses them.
    Jobs run in threads (LMQ_WORKER_JOBS); two threads importing them at once for the first
    time each find the other's modules half initialized (an ImportError that fails the job)."""
    with _MODEL_STACK:
        import lmq.core.adapters  # noqa: F401
        import lmq.core.models  # noqa: F401
        import lmq.workers.fit  # noqa: F401


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        pool: ModelPool,
        *,
        worker: str | None = None,
        on_progress: ProgressCallback | None = None,
    ):
        self.settings = settings
        self.sessions = sessions(settings)
        self.pool = pool
        self.worker = worker or holder_name()
        self.on_progress = on_progress
        self.planning_window = PLANNING_WINDOW

    def run(self, job_id: str) -> str | None:
        """Run (or continue) a job; returns its state afterwards, None for an unknown id."""

        def claim_job(session) -> tuple[Lease, str, str, str] | None:
            job = claim(session, job_id, self.worker, self.settings.lease_s)
            if job is None:
                return None
            return Lease(job.id, self.worker, job.attempts), job.kind, job.preset, job.tenant

        claimed = transact(self.sessions, claim_job)
        if claimed is not None:
            lease, kind, preset, tenant = claimed
            started = time.perf_counter()
            metrics.job_started(job_id, kind, lease.attempt)
            with Attempt(self.sessions, lease, self.settings, self.on_progress) as attempt:
                self._run_attempt(attempt, kind, preset, tenant)
        state = transact(self.sessions, lambda session: queries.job_state(session, job_id))
        if claimed is not None:
            metrics.job_ended(job_id, kind, state, time.perf_counter() - started)
            if kind == JobKind.generate.value and state in TERMINAL_STATES:
                self._finalize_batch(job_id)
        return state

    def _finalize_batch(self, job_id: str) -> None:
        """A Batch API batch's files are made as its job ends, so that they are there when the
        client next reads the batch; should this fail, the recovery sweep makes them."""
        try:
            transact(self.sessions, lambda session: batch_files.finalize_job_batch(session, job_id))
        except Exception:
            logger.exception("job %s: its batch's files are left to the sweep", job_id)

    def _run_attempt(self, attempt: Attempt, kind: str, preset: str, tenant: str) -> None:
        """Failures of the job fail it; losing the lease or the database does not (another attempt follows)."""
        import_model_stack()
        try:
            location = self.locate(preset, tenant)
            if kind == JobKind.generate.value:
                self._run_generate(attempt, preset, location, tenant)
            else:
                from lmq.workers.fit import run_fit

                run_fit(attempt, location)
        except LeaseLost as lost:
            logger.warning("%s; leaving the job to it", lost)
        except DatabaseUnavailable as error:
            logger.error("job %s: %s; the job is taken up again once its lease expires", attempt.job_id, error)
        except Exception as error:
            if isinstance(error, ValueError):  # a bad value its message names (a refused preset, input): no bug
                logger.error("job %s failed: %s", attempt.job_id, error)
            else:
                logger.exception("job %s failed", attempt.job_id)
            try:
                attempt.finish(JobState.failed, error=f"{type(error).__name__}: {error}")
            except (LeaseLost, DatabaseUnavailable) as lost:
                logger.warning("job %s: could not record the failure: %s", attempt.job_id, lost)

    def locate(self, handle: str, tenant: str | None = None) -> str:
        """Where `handle` is; a store name only among `tenant`'s presets (and those shared with it) when given."""
        with session_scope(self.sessions) as session:
            return store_resolver(session, tenant=tenant).locate(handle)

    def _run_generate(self, attempt: Attempt, preset: str, location: str, tenant: str) -> None:
        job_id = attempt.job_id

        def read_job(session) -> tuple[dict, int, int]:
            job = queries.get_job(session, job_id)
            return dict(job.params), job.total, job.completed + job.failed

        params, total, done = attempt.write(read_job)
        pinned = self.pool.get(location, params.get("dtype"), locate=lambda handle: self.locate(handle, tenant))
        metrics.model_ready(job_id, preset, pinned.hit, pinned.load_seconds, pinned.evicted)
        attempt.event(
            "model",
            preset=preset,
            pool_hit=pinned.hit,
            load_seconds=round(pinned.load_seconds, 3),
            evicted=pinned.evicted,
            pool_hits=self.pool.hits,
            pool_misses=self.pool.misses,
        )
        lm = pinned.model
        arguments = {k: params[k] for k in JOB_ARGUMENTS if params.get(k) is not None}
        row_models = RowModels(self.pool, pinned, location, params.get("dtype"), lambda handle: self.locate(handle, tenant))
        shared = dict(zip(SHARED_ENGINE, (pinned.engine, params.get("priority", 0), tenant)))
        task_kind = getattr(lm, "task_kind", "causal_lm")
        tokenizer = lm.preprocessor.tokenizer
        budget = row_budget(
            lm.backbone, params.get("micro_batch_size"), self.settings.micro_batch_size, self.settings.micro_batch_tokens
        )
        progress = JobProgress(attempt, done, total)
        progress.report()
        after = -1
        while window := attempt.write(self._pending(job_id, after)):
            after = window[-1][0]
            groups, refused = plan(window, params, task_kind, lm.preprocessor, row_models.adapter_of)
            try:
                refusals = ResultGroup(attempt, progress, budget, Choices(tokenizer))
                for index, custom_id, message in refused:
                    refusals.add(queries.ItemResult(index, error=row_error(index, custom_id, message)))
                refusals.commit()
                # Token-sampled rows join the model's shared engine; a search runs in an engine of its own,
                # and so do all rows once the pool has evicted the model (and closed its engine).
                sharing = pinned.engine is not None and not pinned.engine.closed
                for search, prompts in groups.items():
                    own = {**arguments, **shared} if sharing and search is None else arguments
                    self._stream(attempt, lm, prompts, own, budget, progress, refusals.choices)
            except StopRequested:
                return
        attempt.finish(JobState.succeeded)

    def _pending(self, job_id: str, after: int):
        """The next window of unfinished inputs: sorting by length happens within a
        window, so a job of millions of prompts starts at once and stays small in memory."""

        def pending(session) -> list[tuple[int, dict, str | None]]:
            items = queries.pending_items(session, job_id, after=after, limit=self.planning_window)
            return [(item.index, dict(item.input), item.custom_id) for item in items]

        return pending

    def _stream(
        self, attempt, lm, prompts: list[Prompt], arguments: dict, budget: RowBudget, progress, choices: Choices
    ) -> None:
        """Generates ``prompts`` through the decode engine, committing results as rows finish.

        Rows leave and join the batch continuously within ``budget``, each choosing its tokens
        with its own sampler (``group_sampler``), given to this call only: the pooled model is
        shared by every job and left as it was loaded. With ``arguments["engine"]`` (the pooled
        model's shared engine) the rows join the rows of every other job on that model, at
        most ``budget.rows`` of this call's at once, and this thread waits for them (the
        engine's thread steps). Out of memory
        halves the budget (and the shared engine's) and runs again what has no result yet; a ValueError (a prompt
        longer than max_length, say) is split down to the prompt that raised it, which
        gets the message as its error; the others run. An item's choices (n > 1) are rows of
        their own; its result is written once all have finished (``choices``). Each run of the
        engine is a ``decode`` event: its rows, and how many response formats they keep to.
        """
        from lmq.core.generation import EngineClosed  # torch: once a job runs

        group = ResultGroup(attempt, progress, budget, choices)
        while prompts:
            formats = {json.dumps((p.processing or {}).get("response_format"), sort_keys=True) for p in prompts}
            attempt.event("decode", rows=len(prompts), formats=len(formats - {"null"}))  # one engine run
            engine = arguments.get("engine")  # a shared engine keeps its own prefix cache
            prefix_cache = engine.prefix_cache if engine is not None else self._prefix_cache(budget)
            try:
                in_flight = metrics.in_flight(min(len(prompts), budget.rows))
                with in_flight, metrics.prefix_caching(attempt.job_id, prefix_cache):
                    lm.generate(
                        [p.text for p in prompts],
                        sampler=group_sampler(prompts),
                        return_details=True,
                        **arguments,
                        **per_row(prompts),
                        on_result=lambda row, generation: group.add_generation(prompts[row], generation),
                        between_steps=progress.check_now_and_then,
                        max_rows=budget.rows,
                        max_cache_tokens=budget.cache_tokens,
                        prefix_cache=prefix_cache,
                    )
                group.commit()
                return
            except Exception as error:
                group.commit()  # what finished before the error is kept
                prompts = [p for p in prompts if p.index not in group.finished]
                if isinstance(error, EngineClosed):  # the pool evicted the model meanwhile: on in an engine of its own
                    attempt.event("engine_closed", rows=len(prompts))
                    arguments = {k: v for k, v in arguments.items() if k not in SHARED_ENGINE}
                    continue
                if not (is_out_of_memory(error) or isinstance(error, ValueError)):
                    raise
                if is_out_of_memory(error) and engine is not None:
                    engine.shrink(error)
                if is_out_of_memory(error) and budget.rows > 1:
                    attempt.event("split", reason="out_of_memory", size=budget.rows)
                    budget.shrink()
                elif len(prompts) == 1:
                    message = "out of memory on a batch of one" if is_out_of_memory(error) else str(error)
                    error = row_error(prompts[0].index, prompts[0].custom_id, message)
                    group.add(queries.ItemResult(prompts[0].index, error=error))
                    choices.forget(prompts[0].index)
                    group.commit()
                    return
                else:
                    half = len(prompts) // 2
                    self._stream(attempt, lm, prompts[:half], arguments, budget, progress, choices)
                    prompts = prompts[half:]

    def _prefix_cache(self, budget: RowBudget):
        """A decode call's prefix cache, in a quarter of its KV budget; False when LMQ_PREFIX_CACHE is off."""
        if not self.settings.prefix_cache:
            return False
        from lmq.core.generation import PrefixCache  # here: planning a job's batches must not load torch

        return PrefixCache.within(budget.cache_tokens)

    def finish(self, job_id: str, state: JobState, error: str | None = None, **details) -> None:
        """Outside any attempt: `lmq generate` ending its own job on Ctrl-C."""
        with session_scope(self.sessions) as session:
            queries.finish_job(session, job_id, state, error, **details)


class StopRequested(Exception):
    """Cancellation was asked for: the job stops between decode steps."""


class JobProgress:
    """A generate job's progress, reported as rows finish; cancellation checked between steps."""

    def __init__(self, attempt: Attempt, done: int, total: int, check_every_s: float = 1.0):
        self.attempt, self.done, self.total = attempt, done, total
        self.check_every_s = check_every_s
        self.checked = time.monotonic()

    def report(self) -> None:
        self.attempt.report_progress(self.done, self.total)

    def check(self) -> None:
        """Raises StopRequested when the job is to stop (LeaseLost when it is no longer ours)."""
        self.checked = time.monotonic()
        if self.attempt.should_stop():
            raise StopRequested

    def check_now_and_then(self) -> None:
        """Between decode steps: one query a second at most, not one per step."""
        if time.monotonic() - self.checked >= self.check_every_s:
            self.check()


class ResultGroup:
    """Finished rows, committed to SQL a few at a time: a crash redoes at most the rows in
    flight and the last uncommitted few (as many as the budget's rows)."""

    def __init__(self, attempt: Attempt, progress: JobProgress, budget: RowBudget, choices: Choices):
        self.attempt, self.progress, self.budget, self.choices = attempt, progress, budget, choices
        self.results: list[queries.ItemResult] = []
        self.finished: set[int] = set()  # the indices committed or about to be

    def add_generation(self, prompt: Prompt, generation) -> None:
        """A row's generation: its item's result, once every choice of the item has finished."""
        result = self.choices.result(prompt, generation)
        if result is not None:
            self.add(result)

    def add(self, result: queries.ItemResult) -> None:
        self.results.append(result)
        self.finished.add(result.index)
        if len(self.results) >= self.budget.rows:
            self.commit()
            self.progress.check()

    def commit(self) -> None:
        if not self.results:
            return
        results, self.results = self.results, []
        self.attempt.write(lambda session: queries.record_results(session, self.attempt.job_id, results))
        self.progress.done += len(results)
        self.progress.report()
        metrics.results_committed(self.attempt.job_id, results, self.progress.done, self.progress.total)


class Choices:
    """The finished rows of items whose result holds more than a text: several choices (n > 1), or
    log-probabilities. An item's result (its `details`, {"choices": [...]}) is made once all its
    choices have finished; a choice that runs again (after running out of memory) replaces its own."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.finished: dict[int, dict[int, dict]] = {}  # item index -> choice -> the choice

    def result(self, prompt: Prompt, generation) -> queries.ItemResult | None:
        if prompt.choices == 1 and generation.logprobs is None:
            return queries.ItemResult(
                prompt.index,
                output=generation.text,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                finish_reason=generation.finish_reason,
            )
        made = self.finished.setdefault(prompt.index, {})
        made[prompt.choice] = {
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "completion_tokens": generation.completion_tokens,
            "logprobs": None if generation.logprobs is None else [self._logprob(t) for t in generation.logprobs],
        }
        if len(made) < prompt.choices:
            return None
        choices = [made[choice] for choice in range(prompt.choices)]
        del self.finished[prompt.index]
        return queries.ItemResult(
            prompt.index,
            output=choices[0]["text"],
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=sum(choice["completion_tokens"] for choice in choices),
            finish_reason=choices[0]["finish_reason"],
            details={"choices": choices},
        )

    def forget(self, index: int) -> None:
        """The item failed: its other choices' rows are no result."""
        self.finished.pop(index, None)

    def _logprob(self, reported) -> dict:
        """A token's log-probability as the output lines show it: the tokens as text."""
        text = self._text
        return {
            "token": text(reported.token_id),
            "logprob": reported.logprob,
            "top": [[text(token), value] for token, value in reported.top],
        }

    def _text(self, token_id: int) -> str:
        """One token's text, its leading space kept (SentencePiece writes it as '▁')."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and "\u2581" in piece:
            return piece.replace("\u2581", " ")
        return self.tokenizer.detokenize([token_id])


class RowModels:
    """Each row's adapter (`plan`'s `adapter_of`): its item's own `model` (an adapter of the job's
    base, or the base itself), checked without loading anything, then pinned in the pool beside
    the base, once a job; else the job's (the job's preset when it is an adapter preset, else none)."""

    def __init__(self, pool: ModelPool, pinned, location: str, dtype: str | None, locate):
        self.pool, self.pinned, self.dtype, self.locate = pool, pinned, dtype, locate
        self.base = self._base_of(location)
        self.adapters: dict[str, str | None] = {}
        self.refusals: dict[str, str] = {}

    def adapter_of(self, model: str | None) -> str | None:
        if model is None:
            return self.pinned.adapter
        if model not in self.adapters and model not in self.refusals:
            try:
                self.adapters[model] = self._pin(model)
            except ValueError as error:
                self.refusals[model] = str(error)
        if model in self.refusals:
            raise ValueError(self.refusals[model])
        return self.adapters[model]

    def _pin(self, model: str) -> str | None:
        try:
            location = self.locate(model)
            same_base = self._base_of(location) == self.base
        except ValueError as error:  # no such preset (PresetNotFound), or an adapter naming no base
            raise ValueError(f"model {model!r} cannot be used: {error}") from None
        if not same_base:
            raise ValueError(f"model {model!r} is neither the job's base model nor an adapter of it")
        pinned = self.pool.get(location, self.dtype, locate=self.locate)
        if pinned.model is not self.pinned.model:  # the base was evicted and pinned again meanwhile
            raise ValueError(f"model {model!r} could not be pinned beside the job's base model; run it in a job of its own")
        return pinned.adapter

    def _base_of(self, location: str) -> str:
        """The base model's location: the preset's own, or the one its adapter config names."""
        base = adapter_base(location)
        return location if base is None else self.locate(base)


def per_row(prompts: list[Prompt]) -> dict:
    """The rows' seeds, max_new_tokens, stops, processing and adapters as `generate` takes them: one
    value when all rows share it, else a list; in a group with seeded rows an unseeded one draws a
    seed of its own."""
    arguments = {}
    adapters = [p.adapter for p in prompts]
    if any(adapters):
        arguments["adapter"] = adapters if len(set(adapters)) > 1 else adapters[0]
    stops = [None if p.stop is None else list(p.stop) for p in prompts]
    if any(stops):
        arguments["stop"] = stops if len({p.stop for p in prompts}) > 1 else stops[0]
    stop_ids = [p.stop_token_ids if isinstance(p.stop_token_ids, str) else list(p.stop_token_ids) for p in prompts]
    arguments["stop_token_ids"] = stop_ids if len({p.stop_token_ids for p in prompts}) > 1 else stop_ids[0]
    if any(p.processing for p in prompts):
        arguments["processing"] = [row_processing(p.processing) for p in prompts]
    seeds = [p.seed for p in prompts]
    if any(seed is not None for seed in seeds):
        arguments["seed"] = [random.randrange(2**31) if seed is None else seed for seed in seeds]
    new_tokens = [p.max_new_tokens for p in prompts]
    if len(set(new_tokens)) > 1:
        arguments["max_new_tokens"] = new_tokens
    elif new_tokens[0] is not None:
        arguments["max_new_tokens"] = new_tokens[0]
    return arguments


def row_processing(settings: dict | None):
    """A row's processing settings (workers/inputs.PROCESSING) as the engine takes them; logit_bias's
    token ids are JSON keys (strings) until here."""
    if not settings:
        return None
    from lmq.core.samplers.processing import RowProcessing  # torch: once a job runs

    bias = {int(token): value for token, value in settings.get("logit_bias", {}).items()}
    return RowProcessing(**{**settings, "logit_bias": bias})


def row_error(index: int, custom_id: str | None, message: str) -> str:
    """The error of one input, naming it: the message came from a batch of one, whose "Prompt 0" is this input."""
    name = f"input {index}" + ("" if custom_id is None else f" (custom_id {custom_id!r})")
    return f"{name}: {re.sub(r'^Prompt 0 ', 'the prompt ', message)}"


def pool_from_settings(settings: Settings) -> ModelPool:
    """The worker's pool: each causal LM it pins gets a shared engine sized by ``settings``;
    its models use lmq's compiled kernels unless ``LMQ_COMPILE`` is off. The CPU libraries
    get lmq's ``RUNTIME_ENVIRONMENT`` before they first run."""
    from lmq.core import kernels

    set_runtime_environment()
    kernels.configure(enabled=settings.compile)
    return ModelPool(
        int(settings.model_memory_gb * 2**30),
        device=settings.device,
        engine_for=functools.partial(shared_engine, settings=settings),
    )


_process_runner: JobRunner | None = None
_process_runner_lock = threading.Lock()


def process_runner(settings: Settings) -> JobRunner:
    """The runner (and so the model pool) that lives as long as the worker process, shared by
    the jobs it runs at once (LMQ_WORKER_JOBS threads)."""
    global _process_runner
    with _process_runner_lock:
        if _process_runner is None:
            _process_runner = JobRunner(settings, pool_from_settings(settings))
        return _process_runner

