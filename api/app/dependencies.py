"""What route handlers are handed (FastAPI dependencies): the settings, the dispatch,
a database session and the caller's tenant, all from the app that `create_app` built."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from lmq.api.app.auth import current_tenant
from lmq.core.config import Settings
from lmq.core.store import session_scope, sessions


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_dispatch(request: Request):
    """The CeleryDispatch or InProcessWorker jobs are handed to (lmq.api.app.dispatch)."""
    return request.app.state.dispatch


def open_session(settings: Settings = Depends(app_settings)) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns, rolled back if it raises."""
    with session_scope(sessions(settings)) as session:
        yield session


SettingsDep = Depends(app_settings)
DispatchDep = Depends(app_dispatch)
SessionDep = Depends(open_session)
TenantDep = Depends(current_tenant)
