"""The object store (objects.py), the presets in it and each host's cache of them (presets.py), and fit
checkpoints (checkpoints.py). See docs/storage.md."""

from __future__ import annotations

from functools import lru_cache

from lmq.core.config import Settings, home_storage_url
from lmq.core.storage.objects import Storage, StorageError, StorageRefused, StorageUnavailable
from lmq.core.storage.presets import PresetCorrupt, PresetStore

__all__ = [
    "PresetCorrupt",
    "PresetStore",
    "Storage",
    "StorageError",
    "StorageRefused",
    "StorageUnavailable",
    "preset_store",
    "storage",
]


def storage(settings: Settings) -> Storage:
    """The deployment's object store (one per URL and home, kept for the process)."""
    url = settings.storage_url or home_storage_url(settings.home)
    return _storage(url, str(settings.home), settings.storage_retry_s)


@lru_cache(maxsize=8)
def _storage(url: str, home: str, retry_s: float) -> Storage:
    from pathlib import Path

    return Storage(url, scratch=Path(home) / "tmp", retry_s=retry_s)


def preset_store(settings: Settings) -> PresetStore:
    return PresetStore(storage(settings), settings.home / "cache" / "presets", int(settings.preset_cache_gb * 2**30))
