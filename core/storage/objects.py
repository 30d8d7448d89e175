"""One object store for every byte lmq keeps outside SQL, through fsspec.

`LMQ_STORAGE_URL` names its root: `file://$LMQ_HOME` by default (so one machine keeps its bytes where
it always has), or `s3://bucket/prefix` (s3fs, with the usual AWS_* settings and `AWS_ENDPOINT_URL`
for an S3-compatible server). Keys under the root:

    files/<file id>                           Batch API uploads
    checkpoints/<job id>/latest.json          a fit job's last checkpoint: names its weights, written last
    checkpoints/<job id>/epoch-<n>.weights.h5
    presets/<name>/                           on a local root, a preset's directory, as always;
    presets/<name>/<made by>.json             on another, a preset's manifest (core/storage/presets.py)
    blobs/sha256/<hex>                        on another, the files manifests name, by content

Each object is written whole or not at all (a local file is renamed into place; an S3 object appears
when its upload completes), so a reader never sees half of one. A store that does not answer is
retried with backoff for LMQ_STORAGE_RETRY_S and then a StorageUnavailable naming it; a refusal (bad
credentials, no such bucket) is a StorageRefused at once, since waiting does not mend it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_CHUNK_BYTES = 16 * 2**20  # a file of two chunks or more is uploaded in parts of this size
READ_CHUNK_BYTES = 2**20
# Errors that waiting does not mend: they are raised at once, not retried.
FINAL_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class StorageError(RuntimeError):
    """The object store could not do what was asked; the message names the store, the key and why."""


class StorageUnavailable(StorageError):
    """The object store did not answer, through every retry."""


class StorageRefused(StorageError):
    """The object store refused the request: credentials, permissions, or a bucket that does not exist."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class Storage:
    """The keys under one root URL. Every call is retried while the store is away (see the module)."""

    def __init__(self, url: str, scratch: Path, retry_s: float = 30.0):
        import fsspec

        self.url = url.rstrip("/")
        self.scratch = scratch  # a local directory for what is on its way to or from a remote store
        self.retry_s = retry_s
        protocol = url.partition("://")[0] if "://" in url else "file"
        options = _s3_options() if protocol == "s3" else {}
        try:
            self.fs, self.root = fsspec.url_to_fs(self.url, skip_instance_cache=True, **options)
        except (ImportError, ValueError) as error:
            raise StorageError(f"LMQ_STORAGE_URL {url!r} cannot be used: {error}") from None
        if protocol == "s3":
            self.fs.retries = 1  # `retrying` below does the retrying, within LMQ_STORAGE_RETRY_S
        self.root = self.root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key_of(self, url: str) -> str | None:
        """The key of a URL under this store's root; None for one elsewhere."""
        prefix = self.url + "/"
        return url[len(prefix) :] if url.startswith(prefix) else None

    def local_path(self, key: str) -> Path:
        """Where a key is on this machine's disk; only a local store has one."""
        if not self.is_local:
            raise StorageError(f"{self.url} is not on this machine's disk")
        return Path(self.path(key))

    # ------------------------------------------------------------ the calls, each retried

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, again with backoff (0.5 s, doubling, at most 8 s) for LMQ_STORAGE_RETRY_S while the store
        does not answer; then StorageUnavailable. A refusal is StorageRefused at once; FileNotFoundError
        and the like pass through as they are, since they answer the question."""
        deadline, pause, tries = time.monotonic() + self.retry_s, 0.5, 0
        while True:
            tries += 1
            try:
                return call()
            except PermissionError as error:
                raise StorageRefused(
                    f"object store {self.url} refused to {what}: {error} (check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and that the bucket exists)"
                ) from None
            except FINAL_ERRORS:
                raise
            except Exception as error:
                if not _transient(error):
                    raise
                if time.monotonic() >= deadline:
                    raise StorageUnavailable(
                        f"object store {self.url} did not answer ({what}) in {tries} tries over "
                        f"{self.retry_s:g} s (LMQ_STORAGE_RETRY_S): {type(error).__name__}: {error}"
                    ) from None
                logger.warning("object store %s: %s failed (%s); trying again in %.1f s", self.url, what, error, pause)
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(pause * 2, 8.0)

    def exists(self, key: str) -> bool:
        return self.retrying(f"look for {key}", lambda: self.fs.exists(self.path(key)))

    def list(self, prefix: str) -> list[str]:
        """The keys directly under `prefix/` (files only), sorted; none when there is no such prefix."""

        def listing() -> list[str]:
            try:
                entries = self.fs.ls(self.path(prefix), detail=True)
            except FileNotFoundError:
                return []
            names = (entry["name"].rstrip("/").rpartition("/")[2] for entry in entries if entry["type"] == "file")
            return sorted(f"{prefix}/{name}" for name in names)

        return self.retrying(f"list {prefix}/", listing)

    def read_bytes(self, key: str) -> bytes:
        return self.retrying(f"read {key}", lambda: self.fs.cat_file(self.path(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        """The object whole, or as it was before."""
        if self.is_local:
            target = self.local_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = _beside(target)
            partial.write_bytes(data)
            os.replace(partial, target)
            return
        self.retrying(f"write {key}", lambda: self.fs.pipe_file(self.path(key), data))

    def put_file(self, local: Path, key: str) -> None:
        """Move a local file to `key`: renamed on a local store; on another uploaded (in parts when large)
        and then removed here, even when the upload fails, so a failure leaves nothing half-written."""
        if self.is_local:
            target = self.local_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(local, target)  # a rename on one filesystem
            return
        try:
            self.retrying(
                f"upload {key}",
                lambda: self.fs.put_file(str(local), self.path(key), chunksize=MULTIPART_CHUNK_BYTES),
            )
        finally:
            local.unlink(missing_ok=True)

    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A local path to write `key`'s content to; stored at `key` when the block ends without error.
        The path keeps the key's file name at its end (keras wants `.weights.h5`)."""
        name = key.rpartition("/")[2]
        if self.is_local:
            local = _beside(self.local_path(key))
            local.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.scratch.mkdir(parents=True, exist_ok=True)
            local = self.scratch / f".{secrets.token_hex(8)}.{name}"
        try:
            yield local
            self.put_file(local, key)
        finally:
            local.unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """`key` as a file on this machine for the block: itself on a local store, else a download removed after."""
        if self.is_local:
            path = self.local_path(key)
            if not path.is_file():
                raise FileNotFoundError(f"{self.url_of(key)} does not exist")
            yield path
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        local = self.scratch / f".{secrets.token_hex(8)}.{key.rpartition('/')[2]}"
        try:
            self.get_file(key, local)
            yield local
        finally:
            local.unlink(missing_ok=True)

    def get_file(self, key: str, local: Path) -> None:
        """Download `key` to `local`, which appears only once whole."""
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = _beside(local)
        try:
            self.retrying(f"download {key}", lambda: self.fs.get_file(self.path(key), str(partial)))
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """`key`'s bytes a chunk at a time (an HTTP download streams them), opened now: a store
        that does not answer fails here, before anything is sent."""
        source = self.retrying(f"open {key}", lambda: self.fs.open(self.path(key), "rb"))

        def chunks() -> Iterator[bytes]:
            with source:
                while chunk := source.read(READ_CHUNK_BYTES):
                    yield chunk

        return chunks()

    def delete(self, key: str) -> None:
        def remove() -> None:
            try:
                self.fs.rm_file(self.path(key))
            except FileNotFoundError:
                pass

        self.retrying(f"delete {key}", remove)

    def delete_tree(self, prefix: str) -> None:
        def remove() -> None:
            try:
                self.fs.rm(self.path(prefix), recursive=True)
            except FileNotFoundError:
                pass

        self.retrying(f"delete {prefix}/", remove)

    def check(self) -> dict:
        """For /readyz: whether the store answers (its bucket looked up once, no retries)."""
        try:
            if not self.is_local:
                self.fs.info(self.root.split("/")[0])
        except FileNotFoundError:
            return {"ok": False, "detail": f"object store {self.url}: no such bucket"}
        except PermissionError as error:
            return {"ok": False, "detail": f"object store {self.url} refused: {error}"}
        except Exception as error:
            return {"ok": False, "detail": f"object store {self.url} unreachable: {type(error).__name__}: {error}"}
        return {"ok": True, "detail": f"object store {self.url} reachable"}


def _beside(path: Path) -> Path:
    """A hidden partial file next to `path` that keeps its name at the end, renamed onto it when whole."""
    return path.with_name(f".{secrets.token_hex(8)}.partial.{path.name}")


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _s3_options() -> dict:
    """s3fs takes its credentials from the usual AWS_* variables; the endpoint of an S3-compatible server
    from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, read here so every botocore version honours it. No
    listings cache (another host's writes are seen at once), and botocore tries once: see `retrying`."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {
        "use_listings_cache": False,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 1}},
        **({"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}),
    }


def _transient(error: Exception) -> bool:
    """A store that may answer if asked again: a connection refused, reset or timed out, a 5xx, a throttle."""
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    module = type(error).__module__
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3"))
