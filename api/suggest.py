""""Did you mean ...?" for a misspelt preset: the closest store and built-in names."""

from __future__ import annotations

import difflib

from sqlalchemy.orm import Session

from lmq.core.plugins import get_registry
from lmq.core.store import queries


def preset_names(session: Session | None, tenant: str | None = None) -> list[str]:
    """Every name a job can give as its preset: the store's (those `tenant` may use, when given)
    and the plugins' built-in ones."""
    stored = [preset.name for preset in queries.list_presets(session, tenant)] if session is not None else []
    builtin = [name for architecture in get_registry().architectures() for name in architecture.presets]
    return stored + builtin


def did_you_mean(name: str, names: list[str]) -> str:
    """" (did you mean 'llama2_7b_en'?)", or "" when nothing is close."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:
        return ""
    names = [repr(match) for match in close]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return f" (did you mean {listed}?)"
