"""A batch's output and error files, and the background upkeep that makes them: expiry and finalization.

The files are rendered from the batch's job's items, in input order, whenever
they are read; only their records (ids and sizes) are stored, once, when the
job has ended ("finalized"). The runner finalizes a batch as its job ends; the
recovery sweep that every deployment runs (lmq.workers.recovery) expires the
batches past their completion window and finalizes what the runner missed (a
job cancelled while queued, a runner that died). Reading a batch writes
nothing: until the sweep has recorded them, its expiry is read from its window
and the end of its job from the job (`past_window`).
"""

from __future__ import annotations

import json
import os
import re
from itertools import accumulate
from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lmq.core.names import TERMINAL_STATES
from lmq.core.store import queries
from lmq.core.store.batches import ERROR, OUTPUT, derived_id, finalize, request_expiry
from lmq.core.store.models import Job, JobItem, OpenAIBatch

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
WINDOW = re.compile(r"([1-9][0-9]{0,2})h")
SHORTEST_WINDOW = timedelta(hours=1)


def window_hours(window: str) -> int | None:
    """The hours of a completion window, "24h" -> 24: OpenAI's only window; lmq takes 1h to 720h."""
    match = WINDOW.fullmatch(window)
    return int(match.group(1)) if match and int(match.group(1)) <= 720 else None


def deadline(batch: OpenAIBatch) -> datetime:
    return batch.created_at + timedelta(hours=window_hours(batch.completion_window) or 24)


def past_window(batch: OpenAIBatch, job: Job | None, now: datetime) -> bool:
    """Whether the batch's window ended before its job did (or has ended while its job runs):
    the batch is then expired, whether the sweep has recorded it yet or not."""
    if batch.expired_at is not None:
        return True
    if job is None:
        return False
    ended = job.finished_at if job.state in TERMINAL_STATES else None
    return deadline(batch) < (ended or now)


# ---------------------------------------------------------------- the upkeep


def overdue_batches(session: Session, now: datetime) -> list[str]:
    """Batches whose job still runs past their completion window, expiry not recorded yet."""
    candidates = session.scalars(
        select(OpenAIBatch)
        .join(Job, OpenAIBatch.job_id == Job.id)
        .where(
            OpenAIBatch.expired_at.is_(None),
            Job.state.not_in(TERMINAL_STATES),
            OpenAIBatch.created_at < now - SHORTEST_WINDOW,
        )
    )
    return [batch.id for batch in candidates if deadline(batch) < now]


def unfinalized_batches(session: Session) -> list[str]:
    """Batches whose job has ended and whose files are not recorded yet."""
    return list(
        session.scalars(
            select(OpenAIBatch.id)
            .join(Job, OpenAIBatch.job_id == Job.id)
            .where(OpenAIBatch.finalized_at.is_(None), Job.state.in_(TERMINAL_STATES))
        )
    )


def expire(session: Session, batch_id: str, now: datetime) -> None:
    """Record the batch's expiry (at its deadline) and cancel its job, as a cancel would:
    what finished stays in its output file."""
    batch = session.get(OpenAIBatch, batch_id)
    if batch is None or batch.job is None or not past_window(batch, batch.job, now):
        return
    request_expiry(session, batch, deadline(batch))
    queries.request_cancel(session, batch.job_id)


def expire_job_batch(session: Session, job_id: str, now: datetime) -> None:
    """Expire the batch that `job_id` is the job of, if it is one's and its window has ended. The
    runner asks this between steps, so a running batch stops as its window ends; the sweep's
    `overdue_batches` catches a batch whose runner died."""
    batch = session.scalar(select(OpenAIBatch).where(OpenAIBatch.job_id == job_id, OpenAIBatch.expired_at.is_(None)))
    if batch is not None:
        expire(session, batch.id, now)


def finalize_job_batch(session: Session, job_id: str) -> bool:
    """Finalize the batch that `job_id` is the job of, if it is one's and has ended."""
    batch = session.scalar(select(OpenAIBatch).where(OpenAIBatch.job_id == job_id))
    return batch is not None and finalize_if_ended(session, batch)


def finalize_if_ended(session: Session, batch: OpenAIBatch) -> bool:
    """Record the output and error files of a batch whose job has ended, once; its expiry too
    when the job ended past the window (so that a batch read as expired stays expired)."""
    job = batch.job
    if job is None or job.state not in TERMINAL_STATES or batch.finalized_at is not None:
        return False
    if batch.expired_at is None and past_window(batch, job, job.finished_at):
        request_expiry(session, batch, deadline(batch))
    sizes = {OUTPUT: 0, ERROR: 0}
    for lines, line in file_lines(session, batch):
        sizes[lines] += len(line.encode())
    return finalize(session, batch, {lines: size for lines, size in sizes.items() if size})


# ---------------------------------------------------------------- output and error lines


def output_usage(session: Session, batch: OpenAIBatch) -> dict:
    """The batch's `usage` (`openai.types.BatchUsage`): the sums of its output lines' usage, so it
    always equals what the output file's lines add up to (see `is_output`)."""
    input_tokens = output_tokens = 0
    if batch.job_id is not None:
        sums = [func.coalesce(func.sum(column), 0) for column in (JobItem.prompt_tokens, JobItem.completion_tokens)]
        totals = session.execute(
            select(*sums).where(JobItem.job_id == batch.job_id, JobItem.error.is_(None), JobItem.output.is_not(None))
        ).one()
        input_tokens, output_tokens = int(totals[0]), int(totals[1])
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def is_output(item) -> bool:
    """A line goes to the output file when its item finished with text and no error."""
    return item.error is None and item.output is not None


def file_lines(session: Session, batch: OpenAIBatch, only: str | None = None) -> Iterator[tuple[str, str]]:
    """(OUTPUT or ERROR, the JSONL line) for each line of the batch's input, in input order.
    A line not completed when the job ended goes to the error file, saying why."""
    job = batch.job
    for item in queries.job_items(session, job.id):
        lines = OUTPUT if is_output(item) else ERROR
        if only is not None and lines != only:
            continue
        record = output_line(batch, item) if lines == OUTPUT else error_line(batch, item)
        yield lines, json.dumps(record, ensure_ascii=False) + "\n"


def output_line(batch: OpenAIBatch, item) -> dict:
    """OpenAI's output line: the response a /v1/completions or /v1/chat/completions request would have had."""
    prefix, obj = ("chatcmpl-", "chat.completion") if batch.endpoint == CHAT else ("cmpl-", "text_completion")
    body = {
        "id": derived_id(prefix, batch.id, item.index),
        "object": obj,
        "created": None if item.finished_at is None else int(item.finished_at.timestamp()),
        "model": (item.input or {}).get("model", batch.model),  # the line's adapter of the batch's base, if its own
        "choices": [choice_of(batch, item, index, choice) for index, choice in enumerate(stored_choices(item))],
        "usage": {
            "prompt_tokens": item.prompt_tokens,
            "completion_tokens": item.completion_tokens,
            "total_tokens": (item.prompt_tokens or 0) + (item.completion_tokens or 0),
        },
    }
    return {
        "id": derived_id("batch_req_", batch.id, item.index),
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": derived_id("req_", batch.id, item.index), "body": body},
        "error": None,
    }


def stored_choices(item) -> list[dict]:
    """The item's choices as the runner stored them (workers.runner.Choices), or its one text."""
    if item.details is not None:
        return item.details["choices"]
    return [{"text": item.output, "finish_reason": item.finish_reason, "logprobs": None}]


def choice_of(batch: OpenAIBatch, item, index: int, choice: dict) -> dict:
    """One of the response's choices, its logprobs in the endpoint's shape."""
    logprobs = choice.get("logprobs")
    if batch.endpoint == CHAT:
        message = {"role": "assistant", "content": choice["text"], "refusal": None}
        shown = None if logprobs is None else {"content": [chat_logprob(entry) for entry in logprobs], "refusal": None}
        return {"index": index, "message": message, "logprobs": shown, "finish_reason": choice["finish_reason"]}
    text = completion_text(item.input.get("prompt"), choice["text"])
    return {"index": index, "text": text, "logprobs": completion_logprobs(logprobs), "finish_reason": choice["finish_reason"]}


def chat_logprob(entry: dict) -> dict:
    """A token of a chat choice's `logprobs.content` (OpenAI's ChatCompletionTokenLogprob)."""

    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = [token(text, logprob) for text, logprob in entry["top"]]
    return {**token(entry["token"], entry["logprob"]), "top_logprobs": top}


def completion_logprobs(logprobs: list | None) -> dict | None:
    """A completion choice's `logprobs` (OpenAI's legacy shape): `text_offset` counts from the completion's start."""
    if logprobs is None:
        return None
    tokens = [entry["token"] for entry in logprobs]
    offsets = list(accumulate(map(len, tokens), initial=0))[: len(tokens)]
    return {
        "tokens": tokens,
        "token_logprobs": [entry["logprob"] for entry in logprobs],
        "top_logprobs": [dict(entry["top"]) for entry in logprobs],
        "text_offset": offsets,
    }


def completion_text(prompt: str | None, output: str) -> str:
    """The text after the prompt, as OpenAI's and transformers' incremental detokenizers give it:
    the whole decoded text less the prompt, so that prompt + text is the whole text ("Return the" +
    " current ..."; decoding the completion's tokens alone would drop that leading space). Where the
    tokenizer normalised the prompt's text, what the two texts share at the start is cut."""
    if prompt is None:  # a chat reply, a Bart's output: the job generated the text alone
        return output
    return output[len(os.path.commonprefix([prompt, output])) :]


def error_line(batch: OpenAIBatch, item) -> dict:
    if item.error is None:  # the job ended before this line ran
        if batch.expired_at is not None:
            code, message = (
                "batch_expired",
                "this request could not be run before the batch's completion window expired",
            )
        else:
            code, message = "batch_cancelled", "the batch was cancelled before this request ran"
    else:
        code, message = (item.input or {}).get("error_code", "generation_failed"), item.error
    return {
        "id": derived_id("batch_req_", batch.id, item.index),
        "custom_id": item.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
