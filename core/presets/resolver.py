"""The one preset resolver: a handle -> where its preset is, and the local directory holding it.

A handle is, in this order:

1. ``hf://org/name[@revision]``: a Hugging Face repository (huggingface_hub; its cache
   and ``HF_HUB_OFFLINE`` apply), or ``kaggle://owner/model/framework/variant[/version]``
   (kagglehub, when installed);
2. a built-in preset name from a plugin's table (nothing shadows these names);
3. a name the caller's ``lookup`` knows. The service, the workers and the CLI pass the
   SQL store's (``lmq.core.store.presets.store_resolver``); plain library use has none;
4. a local directory, optionally only one under ``local_roots``.

The model library never reads the store or the environment to find a preset: a caller
that knows more names hands the resolver its ``lookup``. This module imports no keras.
"""

import os
import pathlib
import re

from lmq.core.plugins import get_registry
from lmq.core.presets.files import PresetFiles

REMOTE_SCHEMES = ("hf://", "kaggle://")
# Files a preset can need; weights in pickle formats (*.bin, *.pth) are never fetched.
HF_PATTERNS = ["*.json", "*.safetensors", "*.h5", "*.model", "*.spm", "*.txt", "assets/**"]
_REMOTE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # fullmatch: "$" would pass a final newline


class PresetNotFound(ValueError):
    """The handle names nothing lmq can load."""


class PresetResolver:
    """Resolves handles by the rules above.

    ``lookup(name) -> directory or None`` answers for the named presets the caller
    knows. ``local_roots``, when given, limits local directories to those roots (the
    API passes LMQ_PRESET_ROOTS so that a client cannot make the server read its files).
    """

    def __init__(self, lookup=None, local_roots=None):
        self.lookup = lookup
        self.local_roots = None if local_roots is None else tuple(pathlib.Path(r).resolve() for r in local_roots)

    def locate(self, handle):
        """Where ``handle``'s preset is, fetching nothing: a remote handle or built-in name
        as given, a named or local preset as its absolute directory."""
        if isinstance(handle, os.PathLike):
            return str(self._local(pathlib.Path(handle), str(handle)))
        if not isinstance(handle, str) or not handle:
            raise PresetNotFound(f"A preset handle must be a non-empty string, got {handle!r}.")
        if handle.startswith(REMOTE_SCHEMES):
            remote_parts(handle)  # syntax only; nothing is fetched
            return handle
        if _builtin(handle) is not None:
            return handle
        named = self.lookup(handle) if self.lookup is not None else None
        if named is not None:
            return str(pathlib.Path(named).resolve())
        path = self._local(_expand(handle), handle, required=False)
        if path is not None:
            return str(path)
        kinds = ["an hf:// or kaggle:// handle", "a built-in preset name"]
        kinds += ["a stored preset"] if self.lookup is not None else []
        raise PresetNotFound(f"unknown preset {handle!r}: not {', '.join(kinds)} or a local directory")

    def directory(self, handle):
        """The local directory holding ``handle``'s preset; a remote one is fetched into its cache."""
        return self.files(handle).directory

    def files(self, handle):
        """``handle``'s ``PresetFiles``: its directory (fetched if remote), the only place its loaders read."""
        location = self.locate(handle)
        builtin = _builtin(location)
        if builtin is not None:
            location = builtin.handle
        name = handle if isinstance(handle, str) else str(handle)
        if location.startswith("hf://"):
            snapshot = _huggingface(location)  # in the hub cache, snapshots/<revision>/* link into ../../blobs
            blobs = [snapshot.parent.parent / "blobs"] if snapshot.parent.name == "snapshots" else []
            return PresetFiles(snapshot, name, also_inside=blobs)
        if location.startswith("kaggle://"):
            return PresetFiles(_kaggle(location), name)
        return PresetFiles(location, name)

    def _local(self, path, handle, required=True):
        try:
            found = path.is_dir()
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a name too long, a ~user that does not exist
            found = False
        if not found:
            if required:
                raise PresetNotFound(f"Preset {handle!r}: directory {path} does not exist.")
            return None
        if self.local_roots is not None and not any(resolved.is_relative_to(r) for r in self.local_roots):
            raise PresetNotFound(f"preset path {handle!r} is outside the allowed preset roots")
        return resolved


def remote_parts(handle):
    """``hf://org/name[@revision]`` -> ("org/name", revision or None);
    ``kaggle://owner/model/framework/variant[/version]`` -> (that path, None)."""
    scheme, _, rest = handle.partition("://")
    revision = []
    if scheme == "hf":
        rest, at, tail = rest.partition("@")
        revision = [tail] if at else []
        expected, shape = (2,), "hf://org/name[@revision]"
    else:
        expected, shape = (4, 5), "kaggle://owner/model/framework/variant[/version]"
    parts = rest.split("/")
    if len(parts) not in expected or not all(_REMOTE_PART.fullmatch(p) and ".." not in p for p in parts + revision):
        raise PresetNotFound(f"Preset {handle!r}: expected {shape}.")
    return rest, (revision or [None])[0]


def _builtin(name):
    """The ``PresetInfo`` of a built-in preset name, or None."""
    found = get_registry().find_preset(name)
    return None if found is None else found[1]


def _expand(handle):
    try:
        return pathlib.Path(handle).expanduser()
    except RuntimeError:  # ~user with no such user: simply no directory
        return pathlib.Path(handle)


def _huggingface(handle):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = remote_parts(handle)
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HF_PATTERNS)
    except LocalEntryNotFoundError:
        raise PresetNotFound(
            f"Preset {handle!r} is not in the Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE is set)."
        ) from None
    except HfHubHTTPError as error:
        raise PresetNotFound(f"Preset {handle!r}: Hugging Face Hub answered {error}.") from None
    return pathlib.Path(snapshot)


def _kaggle(handle):
    try:
        import kagglehub
    except ImportError:
        raise PresetNotFound(
            f"Preset {handle!r} is a kaggle:// handle, which needs the kagglehub package "
            "(pip install kagglehub)."
        ) from None
    path, _ = remote_parts(handle)
    try:
        return pathlib.Path(kagglehub.model_download(path))
    except Exception as error:
        raise PresetNotFound(f"Preset {handle!r}: kagglehub could not fetch it: {error}") from None
