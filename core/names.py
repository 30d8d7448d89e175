"""The names every part of lmq agrees on: samplers, dtypes, job kinds and states, preset names.

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

PRESET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_PRESET_NAME = re.compile(PRESET_NAME_PATTERN)


class JobKind(str, enum.Enum):
    generate = "generate"
    fit = "fit"


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


TERMINAL_STATES = tuple(s.value for s in JobState if s.terminal)


def is_preset_name(name: str | None) -> bool:
    """Whether `name` can be a store name (which is also a directory name)."""
    return bool(_PRESET_NAME.match(name or ""))


def check_preset_name(name: str | None) -> str:
    """A store name is also a directory name: letters, digits, '.', '_', '-'."""
    if not is_preset_name(name):
        raise ValueError(
            f"preset name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
