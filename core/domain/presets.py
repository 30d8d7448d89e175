"""Which presets a tenant may name in a job: one rule for POST /v1/jobs and the Batch API's models.

A refusal is one domain error, PresetNotAllowed, whatever its reason, which each
front end answers in its own way (a 422 naming `preset`, a line's `model_not_found`).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from lmq.core.config import Settings
from lmq.core.names import is_preset_name
from lmq.core.presets import PresetNotFound
from lmq.core.store import queries
from lmq.core.store.presets import store_resolver


class PresetNotAllowed(LookupError):
    """A handle the workers could not load, a path outside LMQ_PRESET_ROOTS, or another tenant's
    preset (by name or by its directory in the store): one message for every refusal, so that a
    client cannot learn which directories, users or other tenants' presets exist."""

    def __init__(self, handle: str):
        super().__init__(
            f"preset {handle!r} is not in the preset store, not a built-in name, not an hf:// or "
            "kaggle:// handle, and not a directory under LMQ_PRESET_ROOTS"
        )
        self.handle = handle


def authorized_preset(session: Session, settings: Settings, handle: str, tenant: str) -> str:
    """The preset a job of `tenant` records for `handle`: the handle as given, but a local directory
    as its absolute path (workers do not share the API's working directory); else PresetNotAllowed."""
    try:
        location = store_resolver(session, tenant=tenant, local_roots=settings.preset_roots).locate(handle)
    except PresetNotFound:
        raise PresetNotAllowed(handle) from None
    if is_preset_name(handle) and queries.get_preset(session, handle, tenant) is not None:
        return handle
    if not store_directory_usable(session, settings, location, tenant):
        raise PresetNotAllowed(handle)
    return location


def store_directory_usable(session: Session, settings: Settings, location: str, tenant: str) -> bool:
    """Whether a local directory may be named by its path: anywhere outside the preset store;
    inside it, neither a fit's unfinished output (a dot name) nor a preset this tenant may not use."""
    store = settings.preset_store.resolve()
    path = Path(location)
    if not path.is_absolute() or not path.is_relative_to(store) or path == store:
        return True
    top = path.relative_to(store).parts[0]
    if top.startswith("."):
        return False
    return queries.get_preset(session, top) is None or queries.get_preset(session, top, tenant) is not None
