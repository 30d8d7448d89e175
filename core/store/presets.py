"""The preset store: locating and describing presets without keras.

A job names its preset by a handle, which `lmq.core.presets.PresetResolver`
resolves; here the resolver is handed the store's names, each mapped to its
directory in the store.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from lmq.core.names import is_preset_name
from lmq.core.presets import PresetResolver
from lmq.core.presets.files import PresetFileError, PresetFiles
from lmq.core.store.queries import get_preset


def store_resolver(
    session: Session | None, *, tenant: str | None = None, local_roots: tuple[Path, ...] | None = None
) -> PresetResolver:
    """The preset resolver that also knows the names registered in the store.

    `session` is None when there is no database yet, so no store names either.
    `tenant` limits the names to the presets that tenant may use (the API and
    the workers pass the job's tenant); None, for the CLI's local user, knows them all.
    `local_roots` limits local directories to those roots (the API passes
    LMQ_PRESET_ROOTS so that a client cannot make the server read its files);
    the CLI passes None because its user may read any directory anyway.
    """

    def lookup(name: str) -> str | None:
        stored = get_preset(session, name, tenant) if session is not None and is_preset_name(name) else None
        return None if stored is None else stored.path

    return PresetResolver(lookup, local_roots=local_roots)


def _read_json(directory: Path, name: str) -> dict:
    try:
        return PresetFiles(directory).read_json(name)
    except PresetFileError:  # not there, not JSON, or a link out of the preset
        return {}


def preset_architecture(directory: Path) -> str | None:
    """The registered architecture of a preset directory (KerasHub or transformers layout)."""
    from lmq.core.plugins import get_registry

    registry = get_registry()
    config = _read_json(directory, "config.json")
    class_name = str(config.get("class_name", "")).rpartition(">")[2]
    architecture = registry.architecture_of_class(class_name) if class_name else None
    if architecture is None and "model_type" in config:
        architecture = registry.for_hf_model_type(config["model_type"], directory)
    return architecture.name if architecture else None
