"""A preset is a closed world: the one place its loaders turn a file name into a path.

Every file a loader opens (configs, weights, safetensors shards an index names,
tokenizer assets) is named relative to the preset's directory and checked here
first, with symlinks resolved: a name that is absolute or holds ``..``, or that
resolves (through a symlinked file or directory) to a place outside the preset,
is refused. A Hugging Face snapshot's files are the hub cache's links into the
repository's ``blobs/``, so for one of those the blobs count as inside too.

Refusals are ``PresetFileError``, which names the preset and the file and never
quotes what a file holds: a tenant reads job errors, and a preset is not theirs to read.
"""

import json
import os
import pathlib
import shutil


class PresetFileError(ValueError):
    """A preset's file is refused or unreadable; the message names the preset and the file."""


class PresetFileMissing(PresetFileError, FileNotFoundError):
    """A file the preset needs is not there."""


class PresetFiles:
    """The files of the preset ``name`` (its handle, for messages) in ``directory``.

    ``also_inside``: directories its files may resolve into besides ``directory``
    (a Hugging Face snapshot's ``blobs/``).
    """

    def __init__(self, directory, name=None, also_inside=(), prefix=""):
        self.directory = pathlib.Path(directory)
        self.name = str(directory) if name is None else str(name)
        self._roots = tuple(pathlib.Path(p).resolve() for p in (self.directory, *also_inside))
        self._prefix = prefix  # where ``directory`` is in the preset, for messages

    def __fspath__(self):
        """The directory, so that a plugin's ``load_assets(directory)`` that takes a path still works;
        reading through ``read_bytes``/``read_text``/``read_json`` keeps it inside the preset."""
        return str(self.directory)

    def error(self, relative, problem, kind=PresetFileError):
        return kind(f"Preset {self.name!r}, file {self._prefix}{relative}: {problem}")

    def path(self, relative):
        """The real path of ``relative`` (a str like ``"assets/tokenizer/merges.txt"``), checked to be inside."""
        if not isinstance(relative, str) or not relative or "\x00" in relative or len(relative) > 255:
            raise PresetFileError(f"Preset {self.name!r}: a file name must be a short relative path.")
        parts = pathlib.PurePosixPath(relative).parts
        if relative.startswith(("/", "\\")) or ".." in parts or "\\" in relative:
            raise self.error(relative, "names a place outside the preset; refused")
        try:
            resolved = (self.directory / relative).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise self.error(relative, "cannot be resolved; refused") from None
        if not any(resolved.is_relative_to(root) for root in self._roots):
            raise self.error(relative, "is a link to a place outside the preset; refused")
        return resolved

    def is_file(self, relative):
        """Whether the preset has the file; a name that leads outside is refused, not absent."""
        return self.path(relative).is_file()

    def is_dir(self, relative):
        return self.path(relative).is_dir()

    def file(self, relative):
        """The checked path of a file that must exist."""
        path = self.path(relative)
        if not path.is_file():
            raise self.error(relative, "not found", PresetFileMissing)
        return path

    def read_bytes(self, relative):
        path = self.file(relative)
        try:
            return path.read_bytes()
        except OSError as error:
            raise self.error(relative, f"cannot be read ({error.strerror})") from None

    def read_text(self, relative):
        try:
            return self.read_bytes(relative).decode("utf-8")
        except UnicodeDecodeError:  # its message quotes the bytes
            raise self.error(relative, "is not UTF-8 text") from None

    def read_json(self, relative, kind=dict):
        """The file's JSON, which must be a ``kind``."""
        text = self.read_text(relative)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # bad syntax, a number of over 4300 digits, deep nesting
            if isinstance(error, json.JSONDecodeError):
                where = f" (line {error.lineno}, column {error.colno})"
            else:
                where = " (nested too deeply)" if isinstance(error, RecursionError) else " (a number too long to read)"
            raise self.error(relative, f"is not valid JSON{where}") from None
        if not isinstance(data, kind):
            raise self.error(relative, f"must hold a JSON {'object' if kind is dict else kind.__name__}")
        return data

    def copy_to(self, target):
        """Copies the preset's files into the new directory ``target`` as plain files (``lmq presets
        import``); a link leading outside, or any linked directory, is refused before anything is read."""
        files = []
        for top, directories, names in os.walk(self.directory):  # links to directories are not followed
            here = pathlib.Path(top).relative_to(self.directory)
            for name in directories + names:
                relative = (here / name).as_posix()
                if (self.directory / relative).is_symlink() and self.path(relative).is_dir():
                    raise self.error(relative, "is a linked directory; refused")
                files += [] if name in directories else [(relative, self.path(relative))]
        target.mkdir(parents=True)
        for relative, path in files:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)

    def sub(self, relative):
        """The files under the subdirectory ``relative`` (a tokenizer's assets), still inside this preset."""
        if not self.is_dir(relative):
            raise self.error(relative, "directory not found", PresetFileMissing)
        return PresetFiles(self.path(relative), self.name, self._roots, prefix=f"{self._prefix}{relative}/")


def preset_files(directory):
    """``directory`` as ``PresetFiles``: a tokenizer's ``load_assets`` takes either, as KerasHub's takes a path."""
    return directory if isinstance(directory, PresetFiles) else PresetFiles(directory)
