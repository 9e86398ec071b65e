"""The FastAPI application (the API part never imports torch)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import dashboard
from service.auth import ensure_configured_keys
from service.db import session_scope
from service.errors import BodyLimit, install_error_handlers
from service.observability import install_metrics
from service.routes import datasets, jobs, privacy, system
from service.settings import get_settings
from service.webhooks import deliver_due

WEBHOOK_POLL_S = 1.0
MULTIPART_OVERHEAD_BYTES = 1 << 20
logger = logging.getLogger(__name__)


async def deliver_webhooks_forever() -> None:
    """The webhook outbox, drained in the background of every API process."""
    with httpx.Client(timeout=5.0, follow_redirects=False) as client:
        while True:
            try:
                await run_in_threadpool(deliver_due, client)
            except Exception:
                logger.exception("webhook delivery round failed; retrying")
            await asyncio.sleep(WEBHOOK_POLL_S)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    settings.ensure_dirs()
    if settings.api_keys:
        with session_scope() as session:
            ensure_configured_keys(session, settings.api_keys)
    deliveries = asyncio.create_task(deliver_webhooks_forever()) if settings.webhook_secret else None
    yield
    if deliveries is not None:
        deliveries.cancel()


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = FastAPI(
        title="dpft",
        version="1",
        summary="Differentially private fine-tuning jobs for language models.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=get_settings().max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    install_metrics(app)
    app.include_router(system.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(privacy.router)
    app.include_router(dashboard.router)
    return app


app = create_app()
