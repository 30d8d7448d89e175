"""The preset store: naming, locating and describing presets without keras.

A job names its preset by a handle. Here a handle becomes the location that
`from_preset` loads: a name registered in SQL maps to its directory in the
store; a built-in name and an `hf://` or `kaggle://` handle pass through
unchanged (the model library resolves those); a local directory is its path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy.orm import Session

from core.store.queries import get_preset

REMOTE_SCHEMES = ("hf://", "kaggle://")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownPreset(ValueError):
    """A handle that names nothing lmq can load."""


def check_preset_name(name: str) -> str:
    """A store name is also a directory name: letters, digits, '.', '_', '-'."""
    if not _NAME.match(name or ""):
        raise ValueError(
            f"preset name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _is_builtin(handle: str) -> bool:
    from core.plugins import get_registry

    return get_registry().find_preset(handle) is not None


def locate_preset(
    session: Session | None, handle: str, *, local_roots: tuple[Path, ...] | None = None
) -> str:
    """Where `from_preset` should load `handle` from, or UnknownPreset naming why not.

    `session` is None when there is no database yet, so no store names either.

    `local_roots` limits local directories to those roots (the API passes
    LMQ_PRESET_ROOTS so that a client cannot make the server read its files);
    the CLI passes None because its user may read any directory anyway.
    """
    if not handle:
        raise UnknownPreset("no preset given")
    stored = get_preset(session, handle) if session is not None and _NAME.match(handle) else None
    if stored is not None:
        return stored.path
    if handle.startswith(REMOTE_SCHEMES) or _is_builtin(handle):
        return handle
    path = Path(handle).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        if local_roots is not None and not any(resolved.is_relative_to(r) for r in local_roots):
            raise UnknownPreset(f"preset path {handle!r} is outside LMQ_PRESET_ROOTS")
        return str(resolved)
    raise UnknownPreset(
        f"unknown preset {handle!r}: not in the preset store, not a built-in name, "
        "not an hf:// or kaggle:// handle, and not a local directory"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def preset_architecture(directory: Path) -> str | None:
    """The registered architecture of a preset directory (KerasHub or transformers layout)."""
    from core.plugins import get_registry

    registry = get_registry()
    config = _read_json(directory / "config.json")
    class_name = str(config.get("class_name", "")).rpartition(">")[2]
    architecture = registry.architecture_of_class(class_name) if class_name else None
    if architecture is None and "model_type" in config:
        architecture = registry.for_hf_model_type(config["model_type"])
    return architecture.name if architecture else None



def lookup_preset_path(name: str) -> Path | None:
    """The directory of the preset registered as `name`, so `from_preset("my-model")` finds it.

    Reads the store the environment configures; an embedded database that does
    not exist yet is not created by a lookup.
    """
    from sqlalchemy.engine import make_url

    from core.config import load_settings
    from core.store.db import session_scope, sessions

    if not _NAME.match(name or ""):
        return None
    settings = load_settings()
    if settings.is_sqlite:
        database = make_url(settings.database_url).database
        if not database or not Path(database).is_file():
            return None
    with session_scope(sessions(settings)) as session:
        stored = get_preset(session, name)
        return Path(stored.path) if stored is not None else None
