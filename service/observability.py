"""Prometheus metrics for `GET /metrics`: request counts and latencies per route, jobs per status."""

from __future__ import annotations

import hmac
import os
import tempfile
import time
from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Credentials
from service.db import session_scope
from service.errors import Unauthorized
from service.models import Job, JobStatus
from service.settings import get_settings

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "dpft_http_requests_total", "HTTP requests answered.", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "dpft_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.0025, 0.005, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


class JobsCollector(Collector):
    """Jobs per status, counted in the database at scrape time (so every API replica agrees)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("dpft_jobs", "Jobs per status.", labels=["status"])
        counts = dict.fromkeys(JobStatus, 0)
        with session_scope() as session:
            for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                counts[JobStatus(status)] = count
        for status, count in counts.items():
            gauge.add_metric([status.value], count)
        yield gauge


JOBS = JobsCollector()
REGISTRY.register(JOBS)
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_env(workers: int) -> dict[str, str]:
    """Environment for an API of ``workers`` processes: with more than one, each process writes its
    counters under a shared directory (prometheus-client's multiprocess mode) so that a scrape,
    whichever process answers it, shows the sum over all of them."""
    if workers <= 1 or os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return {}
    return {MULTIPROCESS_DIR_VARIABLE: tempfile.mkdtemp(prefix="dpft-api-metrics-")}


def exposed_registry() -> CollectorRegistry:
    """What GET /metrics shows: this process's registry, or in multiprocess mode all processes'."""
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(JOBS)
    return registry


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)
            REQUESTS.labels(scope["method"], path, str(status)).inc()


def install_metrics(app: FastAPI) -> None:
    app.add_middleware(RequestMetrics)

    @app.get("/metrics", tags=["system"], summary="Prometheus metrics", include_in_schema=True)
    def metrics(credentials: Credentials) -> Response:
        """Request counts and latencies per route, and jobs per status over all tenants: for the
        operator, so with DPFT_METRICS_TOKEN set it needs that token rather than an API key."""
        token = get_settings().metrics_token
        if token and (credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode())):
            raise Unauthorized("GET /metrics needs `Authorization: Bearer <DPFT_METRICS_TOKEN>`.")
        return Response(generate_latest(exposed_registry()), media_type=CONTENT_TYPE_LATEST)
