"""GET /v1/presets, /v1/presets/{name} and /v1/architectures: what jobs can name (no model is built)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy.orm import Session

from api import schemas
from api.auth import AUTH_ERRORS
from api.dependencies import SessionDep, TenantDep
from api.suggest import did_you_mean, preset_names
from core.names import is_preset_name
from core.plugins import get_registry
from core.store import queries

router = APIRouter(tags=["presets"], dependencies=[TenantDep], responses=AUTH_ERRORS)


@router.get("/v1/presets", response_model=schemas.PresetList)
def list_presets(session: Session = SessionDep):
    """Presets in the store: fine-tuning results and imports, usable by name."""
    return {"presets": [schemas.preset_summary(preset) for preset in queries.list_presets(session)]}


@router.get("/v1/presets/{name}", response_model=schemas.PresetOut, responses={404: {"description": "no such preset"}})
def show_preset(name: str, session: Session = SessionDep):
    """A preset in the store, or else a plugin's built-in preset of that name."""
    if is_preset_name(name) and (stored := queries.get_preset(session, name)) is not None:
        return schemas.preset_summary(stored)
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
    raise HTTPException(404, detail=f"no preset {name!r}{did_you_mean(name, preset_names(session))}")


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
