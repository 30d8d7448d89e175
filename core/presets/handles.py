"""Preset handles -> local directories.

Accepted: ``hf://org/name`` (huggingface_hub; its cache and ``HF_HUB_OFFLINE``
apply), ``kaggle://org/model/keras/variant[/version]`` (kagglehub, when
installed), a local directory, a name registered in the SQL preset store, or a
built-in preset name from a plugin's table. This module imports no keras.
"""

import os
import pathlib

# Files a preset can need; weights in pickle formats (*.bin, *.pth) are never fetched.
HF_PATTERNS = ["*.json", "*.safetensors", "*.h5", "*.model", "*.spm", "*.txt", "assets/**"]


class PresetNotFound(ValueError):
    """The handle names nothing lmq can load."""


def resolve_handle(handle):
    """A local directory holding the preset ``handle`` names."""
    if isinstance(handle, pathlib.Path):
        return _local(handle, handle)
    if not isinstance(handle, str) or not handle:
        raise PresetNotFound(f"A preset handle must be a non-empty string, got {handle!r}.")
    if handle.startswith("hf://"):
        return _huggingface(handle)
    if handle.startswith("kaggle://"):
        return _kaggle(handle)
    path = pathlib.Path(handle).expanduser()
    if path.exists() or os.sep in handle or handle.startswith("."):
        return _local(path, handle)
    stored = _stored_preset(handle)
    if stored is not None:
        return _local(stored, handle)
    from core.plugins import get_registry

    builtin = get_registry().find_preset(handle)
    if builtin is not None:
        return resolve_handle(builtin[1].handle)
    raise PresetNotFound(
        f"Unknown preset {handle!r}: not a directory, not an hf:// or kaggle:// handle, "
        "not in the preset store and not a built-in preset name."
    )


def _local(path, handle):
    if not path.is_dir():
        raise PresetNotFound(f"Preset {handle!r}: directory {path} does not exist.")
    return path


def _huggingface(handle):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = handle[len("hf://") :].strip("/")
    if repo_id.count("/") != 1:
        raise PresetNotFound(f"Preset {handle!r}: expected hf://org/name.")
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except LocalEntryNotFoundError:
        raise PresetNotFound(
            f"Preset {handle!r} is not in the Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE is set)."
        ) from None
    except HfHubHTTPError as error:
        raise PresetNotFound(f"Preset {handle!r}: Hugging Face Hub answered {error}.") from None


def _kaggle(handle):
    try:
        import kagglehub
    except ImportError:
        raise PresetNotFound(
            f"Preset {handle!r} is a kaggle:// handle, which needs the kagglehub package "
            "(pip install kagglehub)."
        ) from None
    try:
        return pathlib.Path(kagglehub.model_download(handle[len("kaggle://") :]))
    except Exception as error:
        raise PresetNotFound(f"Preset {handle!r}: kagglehub could not fetch it: {error}") from None


def _stored_preset(name):
    """The directory of a preset registered in the SQL store, if the store knows ``name``."""
    try:
        from core.store import lookup_preset_path
    except ImportError:  # the store is optional for library-only use
        return None
    return lookup_preset_path(name)
