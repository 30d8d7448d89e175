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
        return None if stored is None else str(stored_preset_directory(stored.path))

    return PresetResolver(lookup, local_roots=local_roots)


def stored_preset_directory(location: str) -> Path:
    """The local directory of a store preset: its own on a local store; one in this host's cache of
    the object store's presets otherwise (core/storage/presets.py), downloaded once per host."""
    if "://" not in location:
        return Path(location)
    from lmq.core.config import load_settings
    from lmq.core.storage import preset_store

    return preset_store(load_settings()).fetch(location)


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



class PresetRefused(ValueError):
    """A local preset whose files do not parse, or whose declared sizes cannot fit this deployment."""


def check_preset_for_job(location: str | Path, handle: str, settings, job=None) -> None:
    """PresetRefused, naming the file or the field and the size, for the preset `handle` at
    `location` (where a resolver found it) when its JSON does not parse or its declared sizes cannot fit the model pool's budget
    or the LMQ_MAX_* limits; checked before a job is written or a preset imported. `job` (a checked
    request) tells the length it decodes or trains to: its own max_length or sequence_length, else
    none when max_new_tokens bounds every input, else the preset's. A remote handle (hf://,
    kaggle://), or a directory without config.json, is left to the worker that loads it."""
    from lmq.core.presets.sizes import PresetTooLarge, check_preset_fits, machine_memory_bytes

    if not Path(location).is_dir():
        return
    files = PresetFiles(location, handle)
    length, to_preset_length = _job_length(job)
    try:
        if not files.is_file("config.json"):  # not a preset yet: the runner names what it cannot load
            return
        check_preset_fits(
            files,
            int(settings.model_memory_gb * 2**30),
            f"the model pool's LMQ_MODEL_MEMORY_GB ({settings.model_memory_gb:g} GiB)",
            length=length,
            to_preset_length=to_preset_length,
            max_length=settings.limits.max_length,
        )
        if job is None:  # an import: the preset must load, as CausalLM.from_preset checks before building
            check_preset_fits(files, machine_memory_bytes(), "this machine's memory", to_preset_length=True)
    except (PresetFileError, PresetTooLarge) as error:
        raise PresetRefused(str(error)) from None


def _job_length(job) -> tuple[int | None, bool]:
    """(the length `job` asks for, whether it runs to the preset's own sequence length)."""
    if job is None:
        return None, False
    if job.kind == "fit":
        return job.hyperparameters.sequence_length, job.hyperparameters.sequence_length is None
    if job.params.max_length is not None:
        return job.params.max_length, False
    bounded = job.params.max_new_tokens is not None or all(
        item.params is not None and item.params.max_new_tokens is not None for item in job.inputs
    )
    return None, not bounded
