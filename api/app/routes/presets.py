"""GET /v1/presets, /v1/presets/{name} and /v1/architectures: what jobs can name (no model is built);
POST /v1/presets/{name}/shares: let another tenant, or every tenant, use one of yours.

A stored preset belongs to the tenant whose fit or import made it. Another
tenant's preset, unless shared with it, is as absent as a name that never
existed: 404 either way. No answer shows where a preset lies on the server.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy.orm import Session

from lmq.api import schemas
from lmq.api.app.auth import AUTH_ERRORS
from lmq.api.app.dependencies import SessionDep, TenantDep
from lmq.api.suggest import did_you_mean, preset_names
from lmq.core.names import is_preset_name
from lmq.core.plugins import get_registry
from lmq.core.store import queries

NO_PRESET = {404: {"description": "no such preset, or another tenant's"}}

router = APIRouter(tags=["presets"], dependencies=[TenantDep], responses=AUTH_ERRORS)


@router.get("/v1/presets", response_model=schemas.PresetList)
def list_presets(tenant: str = TenantDep, session: Session = SessionDep):
    """Presets in the store that you may use (yours and those shared with you), usable by name."""
    return {"presets": [schemas.preset_summary(preset, tenant) for preset in queries.list_presets(session, tenant)]}


@router.get("/v1/presets/{name}", response_model=schemas.PresetOut, responses=NO_PRESET)
def show_preset(name: str, tenant: str = TenantDep, session: Session = SessionDep):
    """A built-in preset of that name, or else a store preset you may use."""
    if (builtin := get_registry().find_preset(name)) is not None:
        architecture, info = builtin
        return {
            "name": name,
            "architecture": architecture.name,
            "builtin": True,
            "handle": info.handle,
            "description": info.description,
            "details": {"params": info.params},
        }
    if is_preset_name(name) and (stored := queries.get_preset(session, name, tenant)) is not None:
        return schemas.preset_summary(stored, tenant)
    raise HTTPException(404, detail=f"no preset {name!r}{did_you_mean(name, preset_names(session, tenant))}")


@router.post(
    "/v1/presets/{name}/shares", status_code=201, response_model=schemas.PresetShareOut, responses=NO_PRESET
)
def share_preset(share: schemas.PresetShareIn, name: str, tenant: str = TenantDep, session: Session = SessionDep):
    """Let `tenant` use your preset `name` ("*": every tenant). Only the preset's owner can share it."""
    if not is_preset_name(name) or queries.share_preset(session, name, owner=tenant, tenant=share.tenant) is None:
        raise HTTPException(404, detail=f"no preset {name!r} of yours")
    return {"name": name, "shared_with": queries.preset_shares(session, name)}


@router.get("/v1/architectures", response_model=schemas.ArchitectureList)
def list_architectures():
    """Registered architectures and their built-in presets (from the plugins' records: no model is built)."""
    registry = get_registry()
    return {
        "architectures": [architecture_summary(a) for a in registry.architectures()],
        "load_errors": list(registry.load_errors.values()),
    }


def architecture_summary(architecture) -> dict:
    return {
        "name": architecture.name,
        "task_kind": architecture.task_kind,
        "plugin": architecture.plugin,
        "hf_model_types": list(architecture.hf_model_types),
        "presets": [
            {"name": name, "handle": info.handle, "description": info.description, "params": info.params}
            for name, info in sorted(architecture.presets.items())
        ],
    }
