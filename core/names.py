"""The names every part of lmq agrees on: samplers, dtypes, task kinds, job kinds and states, preset names.

Standard library only, so that the API, the CLI, the HTTP client and the store
can all import them without loading keras or torch (importing `lmq.core.samplers`
would). `tests/test_api_names.py` checks them against the sampler registry.
"""

from __future__ import annotations

import enum
import re

# What each sampler takes besides `temperature` and `seed` (the constructors in core.samplers).
SAMPLER_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "greedy": (),
    "top_k": ("k",),
    "top_p": ("p", "k"),
    "random": (),
    "beam": ("num_beams",),
    "contrastive": ("k", "alpha"),
}
SAMPLER_NAMES = tuple(SAMPLER_ARGUMENTS)

DTYPES = ("float32", "float16", "bfloat16")

# Anchored for OpenAPI (where "$" is the end of the text); Python's "$" also matches before a final
# newline, so names are checked with fullmatch ("abc\n" is no name).
PRESET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_PRESET_NAME = re.compile(PRESET_NAME_PATTERN.strip("^$"))


class TaskKind(str, enum.Enum):
    """What a preset's task is (a plugin's record and the task class say it), and so what its inputs give."""

    causal_lm = "causal_lm"
    seq2seq_lm = "seq2seq_lm"

    @classmethod
    def reading(cls, field: str) -> TaskKind:
        """The task that reads a generate input's `field`: a seq2seq model reads no prompt and no chat."""
        return cls.seq2seq_lm if field == "encoder_text" else cls.causal_lm

    @property
    def prompt_field(self) -> str:
        """The text a generate input gives this task ("messages", a chat, is a causal LM's too)."""
        return "encoder_text" if self is TaskKind.seq2seq_lm else "prompt"

    @property
    def training_fields(self) -> tuple[str, ...]:
        return ("encoder_text", "decoder_text") if self is TaskKind.seq2seq_lm else ("text",)

    @property
    def description(self) -> str:
        return "a sequence-to-sequence model" if self is TaskKind.seq2seq_lm else "a causal LM"

    def fields_read(self, job_kind: str) -> str:
        """What a generate input or a training row of this task gives, as a message names it."""
        if job_kind == JobKind.fit.value:
            return " and ".join(map(repr, self.training_fields))
        return repr(self.prompt_field) + (" (or 'messages')" if self is TaskKind.causal_lm else "")


GENERATE_TEXT_FIELDS = ("prompt", "encoder_text", "messages")  # a generate input gives exactly one


class JobKind(str, enum.Enum):
    generate = "generate"
    fit = "fit"


class JobState(str, enum.Enum):
    # A fine-tuning job whose files an API server is reading (OpenAI's validating_files); then queued.
    validating = "validating"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    # A fit job asked to pause stops at its next step, keeping its checkpoints; resumed, it is queued again.
    pausing = "pausing"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


TERMINAL_STATES = tuple(s.value for s in JobState if s.terminal)


def is_preset_name(name: str | None) -> bool:
    """Whether `name` can be a store name (which is also a directory name)."""
    return isinstance(name, str) and _PRESET_NAME.fullmatch(name) is not None


def check_preset_name(name: str | None) -> str:
    """A store name is also a directory name: letters, digits, '.', '_', '-', and ':' (a fine-tune's
    OpenAI name, ``ft:<base>:<suffix>:<id>``)."""
    if not is_preset_name(name):
        raise ValueError(
            f"preset name {name!r} is not valid: use 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return name
