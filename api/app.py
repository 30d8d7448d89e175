"""The HTTP API: submit jobs, follow them, read their results, list presets.

SQL is the source of truth: a job is written there first and then handed to
a runner (api.dispatch). The process stays light: it imports the store, the
settings and the plugin registry's records, never keras or torch, so it starts
in about a second and never builds a model.
"""

import logging
import re
from collections.abc import Iterator
from contextlib import asynccontextmanager

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from api import schemas
from api.auth import current_tenant
from api.dispatch import BrokerUnavailable, dispatch_for
from api.jobs import OutputPresetTaken, store_job
from core.config import Settings, load_settings
from core.names import is_preset_name
from core.plugins import get_registry
from core.presets import PresetNotFound
from core.store import JobKind, JobState, SchemaOutOfDate, queries, session_scope, sessions
from core.store.db import get_engine
from core.store.presets import store_resolver

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
NDJSON = "application/x-ndjson"
# Documented in OpenAPI beside each route's own answer (FastAPI adds the 422 itself).
AUTH_ERRORS = {401: {"description": "a missing or unknown bearer token"}}
JOB_ERRORS = {**AUTH_ERRORS, 404: {"description": "no such job, or another tenant's"}}
NOT_READY = {503: {"description": "the database or the broker does not answer"}}
SUBMIT_ERRORS = {
    **AUTH_ERRORS,
    409: {"description": "the fit job's output_preset is already in the store"},
    503: {"description": "the broker could not take the job (it is recorded as failed)"},
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    dispatch = dispatch_for(settings)
    JobRequest = schemas.job_request(settings.limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatch.start()
        yield
        dispatch.stop()

    app = FastAPI(
        title="lmq",
        version="0.1.0",
        description="Batch text generation and queued fine-tuning. Send `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    add_error_handlers(app)

    def open_session() -> Iterator[Session]:
        with session_scope(sessions(settings)) as session:
            yield session

    Tenant = Depends(current_tenant)
    DB = Depends(open_session)

    # ------------------------------------------------------------ jobs

    @app.post("/v1/jobs", status_code=202, response_model=schemas.JobOut, responses=SUBMIT_ERRORS, tags=["jobs"])
    def submit_job(
        response: Response,
        job: JobRequest = Body(discriminator="kind"),
        idempotency_key: str | None = Header(
            None, min_length=1, max_length=128, description="resubmitting with the same key returns the same job"
        ),
        tenant: str = Tenant,
    ):
        """Queue a generate or fit job; 202 with the job, which then runs on a worker."""
        try:
            with session_scope(sessions(settings)) as session:
                if idempotency_key:
                    earlier = queries.find_job_by_idempotency_key(session, tenant, idempotency_key)
                    if earlier is not None:
                        return replayed(response, earlier)
                preset = checked_preset(session, settings, job.preset)
                try:
                    stored = store_job(session, job, preset, tenant=tenant, idempotency_key=idempotency_key)
                except OutputPresetTaken as error:
                    raise HTTPException(409, detail=f"output_preset: {error}") from None
                summary = queries.job_summary(stored)
        except IntegrityError:
            # The same key arrived twice at once: the request that wrote first made the job.
            if idempotency_key is None:
                raise
            with session_scope(sessions(settings)) as session:
                earlier = queries.find_job_by_idempotency_key(session, tenant, idempotency_key)
            if earlier is None:
                raise
            return replayed(response, earlier)
        try:
            dispatch.submit(summary["id"], summary["kind"])
        except BrokerUnavailable as error:
            raise HTTPException(503, detail=str(error)) from None
        response.headers["Location"] = f"/v1/jobs/{summary['id']}"
        return summary

    @app.get("/v1/jobs", response_model=schemas.JobPage, responses=AUTH_ERRORS, tags=["jobs"])
    def list_jobs(
        status: JobState | None = None,
        kind: JobKind | None = None,
        limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
        tenant: str = Tenant,
        session: Session = DB,
    ):
        """This tenant's jobs, newest first, a page at a time."""
        if cursor is not None and find_job(session, cursor, tenant) is None:
            raise field_error(("query", "cursor"), f"cursor {cursor!r} is not a job of yours")
        jobs = queries.list_jobs(
            session,
            tenant=tenant,
            state=status and status.value,
            kind=kind and kind.value,
            limit=limit + 1,
            before=cursor,
        )
        page = jobs[:limit]
        return {
            "jobs": [queries.job_summary(job) for job in page],
            "next_cursor": page[-1].id if len(jobs) > limit else None,
        }

    @app.get("/v1/jobs/{job_id}", response_model=schemas.JobOut, responses=JOB_ERRORS, tags=["jobs"])
    def show_job(job_id: str, tenant: str = Tenant, session: Session = DB):
        """State, counts, progress, timings and error of one job."""
        return queries.job_summary(require_job(session, job_id, tenant))

    @app.get(
        "/v1/jobs/{job_id}/results",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {NDJSON: {}}, "description": "one JSON line per input, in input order"},
            409: {"description": "a fit job, which has no results"},
            **JOB_ERRORS,
        },
    )
    def job_results(job_id: str, tenant: str = Tenant, session: Session = DB):
        """Results so far, streamed: an input not yet done has a null output and no error."""
        job = require_job(session, job_id, tenant)
        if job.kind != JobKind.generate.value:
            raise HTTPException(409, detail=f"job {job_id} is a {job.kind} job: only generate jobs have results")
        return StreamingResponse(result_lines(settings, job_id), media_type=NDJSON)

    @app.get("/v1/jobs/{job_id}/events", response_model=schemas.EventPage, responses=JOB_ERRORS, tags=["jobs"])
    def job_events(
        job_id: str,
        after: int = Query(0, ge=0, le=2**62, description="only events with a larger id"),
        tenant: str = Tenant,
        session: Session = DB,
    ):
        """State changes, model loads and, for fit jobs, every step's loss and tokens/s."""
        require_job(session, job_id, tenant)
        return {"events": [queries.event_line(event) for event in queries.job_events(session, job_id, after)]}

    @app.post("/v1/jobs/{job_id}/cancel", response_model=schemas.JobOut, responses=JOB_ERRORS, tags=["jobs"])
    def cancel_job(job_id: str, tenant: str = Tenant, session: Session = DB):
        """A queued job is cancelled at once; a running one stops at its next micro-batch or step."""
        require_job(session, job_id, tenant)
        return queries.job_summary(queries.request_cancel(session, job_id))

    # ------------------------------------------------------------ presets and architectures

    @app.get("/v1/presets", response_model=schemas.PresetList, responses=AUTH_ERRORS, tags=["presets"])
    def list_presets(tenant: str = Tenant, session: Session = DB):
        """Presets in the store: fine-tuning results and imports, usable by name."""
        return {"presets": [queries.preset_summary(preset) for preset in queries.list_presets(session)]}

    @app.get(
        "/v1/presets/{name}",
        response_model=schemas.PresetOut,
        responses={**AUTH_ERRORS, 404: {"description": "no such preset"}},
        tags=["presets"],
    )
    def show_preset(name: str, tenant: str = Tenant, session: Session = DB):
        """A preset in the store, or else a plugin's built-in preset of that name."""
        if is_preset_name(name) and (stored := queries.get_preset(session, name)) is not None:
            return queries.preset_summary(stored)
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
        raise HTTPException(404, detail=f"no preset {name!r}")

    @app.get("/v1/architectures", response_model=schemas.ArchitectureList, responses=AUTH_ERRORS, tags=["presets"])
    def list_architectures(tenant: str = Tenant):
        """Registered architectures and their built-in presets (from the plugins' records: no model is built)."""
        registry = get_registry()
        return {
            "architectures": [architecture_summary(a) for a in registry.architectures()],
            "load_errors": list(registry.load_errors.values()),
        }

    # ------------------------------------------------------------ health

    @app.get("/healthz", tags=["health"])
    def healthz():
        """The process answers."""
        return {"ok": True}

    @app.get("/readyz", response_model=schemas.Readiness, responses=NOT_READY, tags=["health"])
    def readyz(response: Response):
        """The database and the broker are reachable; 503 when either is not."""
        database = check_database(settings)
        broker_ok, broker_detail = dispatch.check()
        ready = database["ok"] and broker_ok
        response.status_code = 200 if ready else 503
        return {"ready": ready, "database": database, "broker": {"ok": broker_ok, "detail": broker_detail}}

    return app


# ---------------------------------------------------------------- helpers


def replayed(response: Response, job) -> dict:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return queries.job_summary(job)


def checked_preset(session: Session, settings: Settings, handle: str) -> str:
    """The preset a job records: the handle as given, but a local directory as its absolute path
    (workers do not share the API's working directory).

    A 4xx for a handle the workers could not load, or a path outside
    LMQ_PRESET_ROOTS: one message for every refusal, so that a client cannot
    learn which directories exist on the server.
    """
    try:
        location = store_resolver(session, local_roots=settings.preset_roots).locate(handle)
    except PresetNotFound:
        raise field_error(
            ("body", "preset"),
            f"preset {handle!r} is not in the preset store, not a built-in name, not an hf:// or "
            "kaggle:// handle, and not a directory under LMQ_PRESET_ROOTS",
        ) from None
    if location == handle or (is_preset_name(handle) and queries.get_preset(session, handle) is not None):
        return handle
    return location


def field_error(location: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": location, "msg": message, "type": "value_error"}])


def find_job(session: Session, job_id: str, tenant: str):
    """A malformed id is simply no job (and never reaches SQL)."""
    return queries.get_job(session, job_id, tenant) if JOB_ID.fullmatch(job_id) else None


def require_job(session: Session, job_id: str, tenant: str):
    """Another tenant's job is as absent as one that never existed: 404 either way."""
    job = find_job(session, job_id, tenant)
    if job is None:
        raise HTTPException(404, detail=f"no job {job_id!r}")
    return job


def result_lines(settings: Settings, job_id: str) -> Iterator[bytes]:
    """Streamed from a session of its own, which lives as long as the response."""
    with session_scope(sessions(settings)) as session:
        for line in queries.job_results(session, job_id):
            yield schemas.jsonl(line).encode()


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


def check_database(settings: Settings) -> dict:
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        return {"ok": False, "detail": f"database unreachable: {type(error).__name__}: {error}"}
    return {"ok": True, "detail": "database reachable"}


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        """422 naming each bad field; the offending input is not echoed back (it may be huge)."""
        problems = [
            {"loc": problem["loc"], "msg": problem["msg"], "type": problem["type"]}
            for problem in schemas.problems(error.errors())
        ]
        # "inputs[0].prompt: ..." for a body's field, "cursor: ..." for a query parameter.
        message = "; ".join(f"{schemas.field_name(p['loc'][1:]) or p['loc'][0]}: {p['msg']}" for p in problems[:10])
        return JSONResponse(status_code=422, content={"detail": problems, "message": message})

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, error: OperationalError):
        logger.warning("database unavailable: %s", error)
        return JSONResponse(status_code=503, content={"detail": "the database is unavailable; try again"})

    @app.exception_handler(SchemaOutOfDate)
    async def schema_out_of_date(request: Request, error: SchemaOutOfDate):
        return JSONResponse(status_code=503, content={"detail": str(error)})
