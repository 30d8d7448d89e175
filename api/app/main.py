"""The HTTP API: submit jobs, follow them, read their results, list presets.

`create_app` wires the resource routers (routes/: jobs, presets, health, metrics, dashboard; openai/: files, batches, fine_tuning)
to one deployment's settings and dispatch; handlers get both, a database
session and the caller's tenant as dependencies (api/app/dependencies.py). The
process stays light: it imports the store, the settings and the plugin
registry's records, never keras or torch, so it starts in about a second and
never builds a model.
"""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from lmq.api.app.dispatch import dispatch_for
from lmq.api.app.openai.batches import routes as openai_batches
from lmq.api.app.openai.batches import service as batch_validation
from lmq.api.app.openai.files import routes as openai_files
from lmq.api.app.openai.fine_tuning import routes as openai_fine_tuning
from lmq.api.app.openai.fine_tuning import validation as fine_tuning_validation
from lmq.api.app.routes import dashboard, health, jobs, presets
from lmq.api.app.routes.metrics import add_metrics
from lmq.api.app.utf8_bodies import Utf8Bodies
from lmq.core.config import Settings, load_settings
from lmq.core.domain.requests import field_name, problems
from lmq.core.storage import StorageError
from lmq.core.store import SchemaOutOfDate
from lmq.workers.recovery import Sweeping

logger = logging.getLogger(__name__)


def validation_sweep(settings: Settings, dispatch) -> Sweeping:
    """The validations of batches and fine-tuning jobs that a stopped server left, taken up at start
    and every LMQ_SWEEP_S beside the routes of every `lmq serve`, broker or not: validation is the
    API's own work (its line parsers, its preset rules), so the API servers, not the workers, do it."""
    steps = [lambda: batch_validation.take_up_validations(settings, dispatch),
             lambda: fine_tuning_validation.take_up_validations(settings, dispatch)]
    return Sweeping("lmq-validations", settings.sweep_s, steps)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        validations = validation_sweep(settings, app.state.dispatch)
        app.state.dispatch.start()
        validations.start()
        yield
        validations.stop()
        app.state.dispatch.stop()

    app = FastAPI(
        title="lmq",
        version="0.1.0",
        description="Batch text generation and queued fine-tuning. Send `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.dispatch = dispatch_for(settings)
    app.include_router(jobs.submit_router(settings.limits))
    app.include_router(jobs.router)
    app.include_router(presets.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    app.include_router(openai_fine_tuning.router)
    # Innermost (added first), so its refusal reaches the route as raised, not inside another middleware's task group.
    app.add_middleware(Utf8Bodies)
    add_metrics(app, settings)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        """422 naming each bad field; the offending input is not echoed back (it may be huge)."""
        found = [
            {"loc": problem["loc"], "msg": problem["msg"], "type": problem["type"]}
            for problem in problems(error.errors())
        ]
        # "inputs[0].prompt: ..." for a body's field, "cursor: ..." for a query parameter.
        message = "; ".join(f"{field_name(p['loc'][1:]) or p['loc'][0]}: {p['msg']}" for p in found[:10])
        return JSONResponse(status_code=422, content={"detail": found, "message": message})

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, error: OperationalError):
        logger.warning("database unavailable: %s", error)
        return JSONResponse(status_code=503, content={"detail": "the database is unavailable; try again"})

    @app.exception_handler(StorageError)
    async def storage_down(request: Request, error: StorageError):
        logger.warning("object store: %s", error)
        return JSONResponse(status_code=503, content={"detail": str(error)})

    @app.exception_handler(SchemaOutOfDate)
    async def schema_out_of_date(request: Request, error: SchemaOutOfDate):
        return JSONResponse(status_code=503, content={"detail": str(error)})
