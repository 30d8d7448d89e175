"""One log line per event an operator follows, as `key=value` pairs (logfmt).

The API (logger `lmq.api`) and the workers (logger `lmq.worker`) log each job
state change and each group of results committed this way, always with `job=<id>`, so
`grep job=<id>` over all processes' logs tells one job's story.
"""

from __future__ import annotations

import logging
import re

BARE = re.compile(r"[\w.:/@+-]+")


def logfmt(event: str, **fields) -> str:
    """`event=<event> key=value ...`; values with spaces or quotes are quoted, None is left out."""
    pairs = {"event": event, **{key: value for key, value in fields.items() if value is not None}}
    return " ".join(f"{key}={_value(value)}" for key, value in pairs.items())


def _value(value) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    text = str(value)
    if BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def log_to_stderr(level: str) -> None:
    """The `lmq.*` loggers (lmq.api, lmq.worker) to stderr at `level`, leaving other libraries' logging alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("lmq")
    root.addHandler(handler)
    root.setLevel(logging.getLevelNamesMapping().get(level.upper(), logging.DEBUG))  # uvicorn's "trace": DEBUG
