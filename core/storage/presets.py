"""Presets in the object store, and each host's cache of them.

On a local store a preset is a directory under `presets/`, written beside its final place and renamed
into it, as it has always been. On a remote store (S3) a preset is a **manifest**,
`presets/<name>/<made by>.json`, listing its files by SHA-256; the files themselves are
`blobs/sha256/<hex>`, uploaded first, so a preset becomes visible at once and whole when its
manifest, the last thing written, appears. The SQL store records the manifest's URL: two jobs that
race for a name each write their own manifest, and the one SQL registers is the one everyone reads.

A host reads a remote preset through its **cache**, `$LMQ_HOME/cache/presets/<manifest sha256>/`:
downloaded once per host, every file checked against its hash, the directory renamed into place only
when complete (never half-read), the least recently used evicted past LMQ_PRESET_CACHE_GB.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from hashlib import sha256
from pathlib import Path, PurePosixPath

from lmq.core.storage.objects import Storage, StorageError, sha256_of

MADE_BY = ".lmq-job-id"  # in a local preset directory: the job (or import) that made it
MANIFEST_FORMAT = "lmq-preset/1"


class PresetCorrupt(StorageError):
    """A preset's manifest or files in the object store do not match (a file's hash differs)."""


class PresetStore:
    """Where presets made here are published, and from where any host reads them."""

    def __init__(self, storage: Storage, cache: Path, cache_bytes: int):
        self.storage = storage
        self.cache = cache
        self.cache_bytes = cache_bytes

    def _directory(self, name: str) -> Path:
        return self.storage.local_path(f"presets/{name}")

    def taken(self, name: str) -> bool:
        """Whether anything, registered or not, was published under `name`."""
        if self.storage.is_local:
            return self._directory(name).exists()
        return bool(self.storage.list(f"presets/{name}"))

    def published_by(self, name: str, made_by: str) -> str | None:
        """The location of the preset `made_by` published under `name`, if it did (a job that died
        between publishing and registering finds its preset there)."""
        if self.storage.is_local:
            directory = self._directory(name)
            try:
                found = (directory / MADE_BY).read_text().strip() == made_by
            except FileNotFoundError:
                found = False
            return str(directory) if found else None
        key = f"presets/{name}/{made_by}.json"
        return self.storage.url_of(key) if self.storage.exists(key) else None

    def staging(self, name: str, made_by: str) -> Path:
        """An empty local directory to save the preset `made_by` makes into, before `publish`."""
        if self.storage.is_local:
            staged = self._directory(name).parent / f".{name}.{made_by}.{secrets.token_hex(4)}.partial"
        else:
            staged = self.storage.scratch / "presets" / f"{name}.{made_by}.{secrets.token_hex(4)}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def publish(self, staged: Path, name: str, made_by: str) -> str:
        """Make the staged directory the preset `name`, whole and at once, and return the location the
        SQL store records; FileExistsError when the name is taken. The staged directory is used up."""
        try:
            if self.taken(name):
                raise FileExistsError(name)
            if self.storage.is_local:
                (staged / MADE_BY).write_text(made_by)
                staged.rename(self._directory(name))
                return str(self._directory(name))
            files = {}
            for path in sorted(p for p in staged.rglob("*") if p.is_file() and not p.is_symlink()):
                digest = sha256_of(path)
                blob = f"blobs/sha256/{digest}"
                files[path.relative_to(staged).as_posix()] = {"sha256": digest, "bytes": path.stat().st_size}
                if not self.storage.exists(blob):  # the same file in another preset is stored once
                    with self.storage.staging(blob) as upload:
                        shutil.copyfile(path, upload)
            manifest = {"format": MANIFEST_FORMAT, "name": name, "made_by": made_by, "files": files}
            key = f"presets/{name}/{made_by}.json"
            self.storage.write_bytes(key, json.dumps(manifest, indent=1, sort_keys=True).encode())
            return self.storage.url_of(key)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def remove(self, location: str) -> None:
        """Take back a published preset that was not registered (its blobs may be another's too: kept)."""
        key = self.storage.key_of(location)
        if key is not None:
            self.storage.delete(key)
        elif self.storage.is_local:
            shutil.rmtree(location, ignore_errors=True)

    # ------------------------------------------------------------ reading, through this host's cache

    def fetch(self, location: str) -> Path:
        """The local directory of the preset at `location`: a local one as it is, a remote one from this
        host's cache, downloaded and checked first if it is not there."""
        if "://" not in location:
            return Path(location)
        key = self.storage.key_of(location)
        if key is None:
            raise StorageError(f"preset {location} is not in this deployment's object store ({self.storage.url}, LMQ_STORAGE_URL)")
        raw = self.storage.read_bytes(key)
        cached = self.cache / sha256(raw).hexdigest()
        if not cached.is_dir():
            self._download(_manifest(raw, location), cached)
        os.utime(cached)  # recently used
        self._evict(keep=cached)
        return cached

    def _download(self, manifest: dict, cached: Path) -> None:
        partial = self.cache / f".{cached.name}.{secrets.token_hex(4)}.partial"
        try:
            for relative, entry in manifest["files"].items():
                target = partial / relative
                self.storage.get_file(f"blobs/sha256/{entry['sha256']}", target)
                if sha256_of(target) != entry["sha256"]:
                    raise PresetCorrupt(f"preset {manifest['name']!r}: {relative} does not match its SHA-256 in the manifest")
            partial.mkdir(parents=True, exist_ok=True)
            try:
                partial.rename(cached)
            except OSError:  # another process of this host finished the same download first
                if not cached.is_dir():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _evict(self, keep: Path) -> None:
        """Past the cache's size, remove the least recently used presets (never `keep`, just asked for)."""
        entries = [path for path in self.cache.iterdir() if path.is_dir() and not path.name.startswith(".")]
        sizes = {path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for path in entries}
        total = sum(sizes.values())
        for path in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.cache_bytes:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= sizes[path]


def _manifest(raw: bytes, location: str) -> dict:
    """The manifest, checked: every file a plain relative path inside the preset, with a SHA-256."""
    try:
        manifest = json.loads(raw)
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        usable = isinstance(files, dict) and all(
            _inside(relative) and isinstance(entry, dict) and len(str(entry.get("sha256", ""))) == 64
            for relative, entry in files.items()
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        usable = False
    if not usable:
        raise PresetCorrupt(f"preset manifest {location} is not an {MANIFEST_FORMAT} manifest")
    return manifest


def _inside(relative: str) -> bool:
    path = PurePosixPath(relative)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts
