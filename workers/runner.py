"""The job runner: what a worker does with a job id.

Celery workers and the embedded mode (`lmq generate`, `lmq fit`) run jobs
through this same code. Running a job is idempotent: a job that is already
finished is left alone, a redelivered generate job continues with the items
that have no result yet, and every write is conditional, so a worker killed
at any moment loses at most the micro-batch it was running.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

from core.config import Settings
from core.store import JobKind, JobState, queries, session_scope, sessions
from core.store.presets import store_resolver
from workers.batching import Prompt, is_out_of_memory, plan_micro_batches
from workers.pool import ModelPool

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

PLANNING_WINDOW = 4096  # inputs tokenized and sorted together into micro-batches
GENERATE_ARGUMENTS = ("max_length", "max_new_tokens", "stop_token_ids", "stop", "strip_prompt", "seed")


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
        self.worker = worker or worker_name()
        self.on_progress = on_progress
        self.planning_window = PLANNING_WINDOW

    def run(self, job_id: str) -> str | None:
        """Run (or continue) a job; returns its state afterwards, None for an unknown id."""
        with session_scope(self.sessions) as session:
            job = queries.start_job(session, job_id, self.worker)
            claimed = job is not None and (job.kind, job.preset, dict(job.params))
        if claimed:
            kind, preset, params = claimed
            try:
                if kind == JobKind.generate.value:
                    self._run_generate(job_id, preset, params)
                else:
                    from workers.fit import run_fit

                    run_fit(self, job_id)
            except Exception as error:
                logger.exception("job %s failed", job_id)
                self.finish(job_id, JobState.failed, error=f"{type(error).__name__}: {error}")
        with session_scope(self.sessions) as session:
            job = queries.get_job(session, job_id)
            return None if job is None else job.state

    def locate(self, handle: str) -> str:
        with session_scope(self.sessions) as session:
            return store_resolver(session).locate(handle)

    def _run_generate(self, job_id: str, preset: str, params: dict) -> None:
        lease = self.pool.get(self.locate(preset), params.get("dtype"))
        self.event(
            job_id,
            "model",
            preset=preset,
            pool_hit=lease.hit,
            load_seconds=round(lease.load_seconds, 3),
            evicted=lease.evicted,
            pool_hits=self.pool.hits,
            pool_misses=self.pool.misses,
        )
        lm = lease.model
        lm.compile(sampler=params.get("sampler") or "greedy")
        arguments = {k: params[k] for k in GENERATE_ARGUMENTS if params.get(k) is not None}

        tokenize = lm.preprocessor.tokenizer.tokenize
        with session_scope(self.sessions) as session:
            job = queries.get_job(session, job_id)
            total, done = job.total, job.completed + job.failed
        self.report_progress(done, total)
        after = -1
        while window := self._pending(job_id, after):
            after = window[-1][0]
            prompts = [Prompt(index, text, len(tokenize(text))) for index, text in window]
            for batch in plan_micro_batches(
                prompts,
                max_items=params.get("micro_batch_size") or self.settings.micro_batch_size,
                max_tokens=self.settings.micro_batch_tokens,
                new_tokens=params.get("max_new_tokens") or 0,
            ):
                if self.should_stop(job_id):
                    return
                results = self._generate(job_id, lm, batch, arguments)
                with session_scope(self.sessions) as session:
                    queries.record_results(session, job_id, results)
                done += len(batch)
                self.report_progress(done, total)
        self.finish(job_id, JobState.succeeded)

    def _pending(self, job_id: str, after: int) -> list[tuple[int, str]]:
        """The next window of unfinished inputs: sorting by length happens within a
        window, so a job of millions of prompts starts at once and stays small in memory."""
        with session_scope(self.sessions) as session:
            items = queries.pending_items(session, job_id, after=after, limit=self.planning_window)
            return [(item.index, item.input["prompt"]) for item in items]

    def _generate(self, job_id, lm, batch: list[Prompt], arguments: dict) -> list[queries.ItemResult]:
        """Results for one micro-batch; a batch that runs out of memory is split in two.

        A ValueError (a prompt longer than max_length, say) is split down to the
        prompt that raised it, which gets the message as its error; the others run.
        """
        try:
            generations = lm.generate([p.text for p in batch], return_details=True, **arguments)
        except Exception as error:
            out_of_memory = is_out_of_memory(error)
            if not (out_of_memory or isinstance(error, ValueError)):
                raise
            if len(batch) == 1:
                message = "out of memory on a batch of one" if out_of_memory else str(error)
                return [queries.ItemResult(batch[0].index, error=message)]
            if out_of_memory:
                self.event(job_id, "split", reason="out_of_memory", size=len(batch))
            half = len(batch) // 2
            return self._generate(job_id, lm, batch[:half], arguments) + self._generate(
                job_id, lm, batch[half:], arguments
            )
        return [
            queries.ItemResult(
                prompt.index,
                output=generation.text,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                finish_reason=generation.finish_reason,
            )
            for prompt, generation in zip(batch, generations)
        ]

    def event(self, job_id: str, type: str, **data) -> None:
        with session_scope(self.sessions) as session:
            queries.add_event(session, job_id, type, **data)

    def should_stop(self, job_id: str) -> bool:
        """Checked between micro-batches and fit steps: a cancel request is honoured
        here, and a job that a duplicate delivery already finished is left alone."""
        with session_scope(self.sessions) as session:
            state = queries.job_state(session, job_id)
            if state == JobState.cancelling.value:
                queries.finish_job(session, job_id, JobState.cancelled)
            return state != JobState.running.value

    def finish(self, job_id: str, state: JobState, error: str | None = None, **details) -> None:
        with session_scope(self.sessions) as session:
            queries.finish_job(session, job_id, state, error, **details)

    def report_progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)


def worker_name() -> str:
    """This process, as the job records (and Celery, for `lmq worker`) name it; see api.dispatch.runner_is_gone."""
    return f"lmq-{os.getpid()}@{socket.gethostname()}"


def pool_from_settings(settings: Settings) -> ModelPool:
    return ModelPool(int(settings.model_memory_gb * 2**30))


_process_runner: JobRunner | None = None


def process_runner(settings: Settings) -> JobRunner:
    """The runner (and so the model pool) that lives as long as the worker process."""
    global _process_runner
    if _process_runner is None:
        _process_runner = JobRunner(settings, pool_from_settings(settings))
    return _process_runner

