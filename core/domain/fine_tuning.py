"""OpenAI's fine-tuning jobs as lmq fit jobs: their training lines, hyperparameters, names and statuses.

A fine-tuning job is one fit job (one `jobs` row, run by workers/fit.py as any fit job). What
OpenAI's API shows beyond the fit job (its files, suffix, seed, metadata, method, the
hyperparameters as given) is kept in the job's params under `fine_tuning`; its events and
checkpoints are the fit job's events. The training rows are the file's lines as checked here:
chat lines (`{"messages": [...]}`, the loss on assistant turns), prompt/completion lines (the
loss on the completion) or lmq's own `{"text"}`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lmq.core.config import Limits
from lmq.core.domain.fields import Strict, text
from lmq.core.domain.fit import FIT_DEFAULTS
from lmq.core.domain.requests import field_name, problems
from lmq.core.names import JobState

FINE_TUNING = "fine_tuning"  # the key of a fit job's params that holds what OpenAI's API shows
JOB_ID_PREFIX = "ftjob-"
AUTO = "auto"
AUTO_EPOCHS = 3  # OpenAI's usual choice for a small file
SUFFIX_PATTERN = r"[A-Za-z0-9._-]{1,40}"
BASE_IN_NAME_CHARS = 40
MAX_LINE_PROBLEMS = 10  # a file's problems named in its error; the count says how many more


class TrainingFileInvalid(ValueError):
    """A training or validation file that cannot train: OpenAI's `invalid_training_file`
    (or `invalid_validation_file`), its message naming each bad line."""

    def __init__(self, param: str, problems: list[str], count: int | None = None):
        count = len(problems) if count is None else count
        which = "training" if param == "training_file" else "validation"
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        super().__init__(f"The {which} file is invalid: " + "; ".join(problems) + more)
        self.param, self.code = param, f"invalid_{which}_file"


# ---------------------------------------------------------------- training lines


@lru_cache
def training_lines(limits: Limits) -> tuple[type[Strict], ...]:
    """The kinds of line a training file holds, with this deployment's limits: a chat, a prompt
    and its completion, a text (in LINE_KINDS' order)."""
    Content = text(limits.prompt_chars, min_length=0)

    class Message(Strict):
        role: Literal["system", "user", "assistant"]
        content: Content
        name: text(64, label=True) | None = None
        weight: Literal[0, 1] | None = None  # OpenAI's: 0 leaves an assistant turn out of the loss

        @model_validator(mode="after")
        def weight_on_assistant_turns(self):
            if self.weight is not None and self.role != "assistant":
                raise PydanticCustomError("weight", "only an assistant message has a 'weight'")
            return self

    class Chat(Strict):
        messages: list[Message] = Field(min_length=1, max_length=1024)

        @model_validator(mode="after")
        def an_assistant_turn(self):
            if not any(message.role == "assistant" for message in self.messages):
                raise PydanticCustomError("assistant", "a chat example needs at least one assistant message")
            return self

    class Completion(Strict):
        prompt: Content
        completion: text(limits.prompt_chars)

    class Text(Strict):
        text: text(limits.prompt_chars)

    return Chat, Completion, Text


LINE_KINDS = {"messages": 0, "prompt": 1, "completion": 1, "text": 2}


def check_training_line(value: Any, number: int, limits: Limits) -> dict:
    """The training row a parsed line gives (as the fit job stores it), or a ValueError naming the line."""
    if not isinstance(value, dict):
        raise ValueError(f"line {number}: expected a JSON object, got {type(value).__name__}")
    kinds = {LINE_KINDS[key] for key in value if key in LINE_KINDS}
    if len(kinds) != 1:
        raise ValueError(
            f"line {number}: give 'messages' (a chat), 'prompt' and 'completion', or 'text'"
            + (f", not {sorted(key for key in value if key in LINE_KINDS)}" if kinds else "")
        )
    kind = training_lines(limits)[kinds.pop()]  # the kind its keys name, so the errors are that kind's
    try:
        checked = kind.model_validate(value)
    except ValidationError as error:
        found = problems(error.errors())
        named = "; ".join(f"{field_name(p['loc'])}: {p['msg']}" if p["loc"] else p["msg"] for p in found[:3])
        raise ValueError(f"line {number}: {named}") from None
    return checked.model_dump(exclude_none=True)


# ---------------------------------------------------------------- hyperparameters


def fit_hyperparameters(given: dict, examples: int) -> dict:
    """OpenAI's hyperparameters (each a value or "auto") as a fit job's, with "auto" resolved:
    3 epochs, batches of up to 8 (fewer for a smaller file), the fit default learning rate x 1."""
    epochs = given.get("n_epochs", AUTO)
    batch_size = given.get("batch_size", AUTO)
    multiplier = given.get("learning_rate_multiplier", AUTO)
    fit = {
        "epochs": AUTO_EPOCHS if epochs == AUTO else epochs,
        "batch_size": max(1, min(FIT_DEFAULTS.batch_size, examples)) if batch_size == AUTO else batch_size,
        "learning_rate": FIT_DEFAULTS.learning_rate * (1.0 if multiplier == AUTO else multiplier),
    }
    fit.update({name: given[name] for name in LMQ_HYPERPARAMETERS if given.get(name) is not None})
    return fit


LMQ_HYPERPARAMETERS = ("lora_rank", "sequence_length")


def shown_hyperparameters(fit: dict) -> dict:
    """A fit job's hyperparameters as OpenAI's job object shows them (resolved, lmq's extras beside)."""
    shown = {
        "n_epochs": fit.get("epochs", FIT_DEFAULTS.epochs),
        "batch_size": fit.get("batch_size", FIT_DEFAULTS.batch_size),
        "learning_rate_multiplier": fit.get("learning_rate", FIT_DEFAULTS.learning_rate) / FIT_DEFAULTS.learning_rate,
    }
    return shown | {name: fit[name] for name in LMQ_HYPERPARAMETERS if fit.get(name) is not None}


# ---------------------------------------------------------------- names and statuses


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<suffix>:<id>`, a store name: the base as the last part of its handle (a path's
    or a hub name's), its other characters as '-'; the id is the job's first 8 hex digits."""
    last = re.split(r"[/\\]", base.rstrip("/\\"))[-1] or "model"
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", last)[:BASE_IN_NAME_CHARS].lstrip("._-") or "model"
    return f"ft:{slug}:{suffix or ''}:{job_id[:8]}"


def openai_job_id(job_id: str) -> str:
    return JOB_ID_PREFIX + job_id


def lmq_job_id(fine_tuning_job_id: str) -> str | None:
    """The fit job's id of `ftjob-<id>`; None for any other string."""
    if not fine_tuning_job_id.startswith(JOB_ID_PREFIX):
        return None
    job_id = fine_tuning_job_id.removeprefix(JOB_ID_PREFIX)
    return job_id if re.fullmatch(r"[0-9a-f]{32}", job_id) else None


OPENAI_STATUS = {
    JobState.validating: "validating_files",
    JobState.queued: "queued",
    JobState.running: "running",
    JobState.cancelling: "running",  # until the worker stops
    JobState.pausing: "running",
    JobState.paused: "paused",
    JobState.succeeded: "succeeded",
    JobState.failed: "failed",
    JobState.cancelled: "cancelled",
}


def openai_status(state: str) -> str:
    return OPENAI_STATUS[JobState(state)]
