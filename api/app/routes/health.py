"""GET /healthz and /readyz: whether the process answers, and whether the database, the broker and the object store do."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from lmq.api import schemas
from lmq.api.app.dependencies import DispatchDep, SettingsDep
from lmq.core.config import Settings
from lmq.core.storage import storage
from lmq.core.store.db import get_engine

NOT_READY = {503: {"description": "the database, the broker or the object store does not answer"}}

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process answers."""
    return {"ok": True}


@router.get("/readyz", response_model=schemas.Readiness, responses=NOT_READY)
def readyz(response: Response, settings: Settings = SettingsDep, dispatch=DispatchDep):
    """The database, the broker and the object store are reachable; 503 when one is not."""
    database = check_database(settings)
    broker_ok, broker_detail = dispatch.check()
    store = storage(settings).check()
    ready = database["ok"] and broker_ok and store["ok"]
    response.status_code = 200 if ready else 503
    return {"ready": ready, "database": database, "broker": {"ok": broker_ok, "detail": broker_detail}, "storage": store}


def check_database(settings: Settings) -> dict:
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        return {"ok": False, "detail": f"database unreachable: {type(error).__name__}: {error}"}
    return {"ok": True, "detail": "database reachable"}
