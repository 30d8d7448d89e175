"""GET /metrics: the API's Prometheus metrics.

Jobs by kind and state, and the jobs waiting on each queue, are counted in SQL
at scrape time (lmq's truth is SQL, so every API replica reports the same
numbers); requests are counted and timed by route template and status as they
are answered. Each app has a registry of its own. Like /healthz the endpoint
takes no token: it shows counts, never a tenant's jobs or names. A worker's
metrics (tokens, model pool, leases) are served by the worker itself
(workers/metrics.py); without a broker the server runs its jobs itself, and
its /metrics has them too.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from lmq.core.config import Settings
from lmq.core.names import JobKind, JobState
from lmq.core.store import session_scope, sessions
from lmq.core.store.models import Job

router = APIRouter(tags=["health"])


class JobsCollector:
    """`lmq_jobs{kind,state}` and `lmq_queue_depth{queue}`, read from SQL at each scrape."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self):
        from lmq.workers.celery_app import queue_for  # Celery is imported at the first scrape, not at start

        with session_scope(sessions(self.settings)) as session:
            by_state = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            queued = session.execute(
                select(Job.kind, Job.preset, func.count())
                .where(Job.state == JobState.queued.value)
                .group_by(Job.kind, Job.preset)
            ).all()
        jobs = GaugeMetricFamily("lmq_jobs", "Jobs in the store, by kind and state", labels=["kind", "state"])
        counts = {(kind, state): count for kind, state, count in by_state}
        for kind in JobKind:
            for state in JobState:
                jobs.add_metric([kind.value, state.value], counts.get((kind.value, state.value), 0))
        yield jobs
        depth = GaugeMetricFamily("lmq_queue_depth", "Queued jobs waiting for a worker, by queue", labels=["queue"])
        per_queue = {queue_for(kind.value, "", self.settings): 0 for kind in JobKind}
        for kind, preset, count in queued:
            queue = queue_for(kind, preset, self.settings)
            per_queue[queue] = per_queue.get(queue, 0) + count
        for queue, count in sorted(per_queue.items()):
            depth.add_metric([queue], count)
        yield depth


def add_metrics(app: FastAPI, settings: Settings) -> None:
    """The registry, the request-counting middleware and the /metrics route."""
    registry = CollectorRegistry()
    registry.register(JobsCollector(settings))
    requests = Counter(
        "lmq_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "lmq_http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"], registry=registry
    )
    app.state.metrics_registry = registry

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # The matched route's template (/v1/jobs/{job_id}), so each job id is not a label of its own.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    app.include_router(router)


@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus's text format."""
    text = generate_latest(request.app.state.metrics_registry)
    if request.app.state.settings.embedded:
        text += generate_latest(REGISTRY)  # the in-process runner's: workers/metrics.py
    return Response(text, media_type=CONTENT_TYPE_LATEST)
