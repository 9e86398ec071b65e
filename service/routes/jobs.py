"""Jobs: create (solved against the noise solver first), read, and per-step metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.artifacts import get_artifact_store
from service.auth import Credentials, CurrentTenant, DbSession, current_tenant
from service.db import session_scope
from service.errors import NotFound
from service.jobs import (
    budget_transaction,
    cancel_job,
    create_job,
    get_job,
    job_out,
    list_jobs,
    poll_metrics,
    require_job,
)
from service.models import Job, JobEvent, JobMetric, JobStatus
from service.queue import enqueue_training
from service.schemas import ArtifactOut, EventOut, JobCreate, JobOut, ListResponse, MetricPoint, MetricsPage

logger = logging.getLogger(__name__)
MAX_INT32 = 2**31 - 1  # steps and event ids are 32-bit integer columns
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut, summary="Create a DP fine-tuning job")
def create(
    request: JobCreate,
    session: DbSession,
    tenant: CurrentTenant,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Repeat a request safely: the same key returns the same job."),
    ] = None,
) -> JobOut:
    with budget_transaction(session):
        job, created = create_job(session, tenant, request, idempotency_key)
        session.commit()  # the job must be in the database before a worker can be told about it
    if not created:
        response.status_code = 200
        return job_out(job)
    try:
        enqueue_training(job.id)
    except Exception:  # the broker is down: the job stays queued and the sweeper re-sends it
        logger.exception("could not enqueue job %s; it stays queued", job.id)
    return job_out(job)


@router.get("", response_model=ListResponse[JobOut], summary="List jobs, newest first")
def list_(
    request: Request,
    session: DbSession,
    tenant: CurrentTenant,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    dataset_id: Annotated[str | None, Query(description="Only jobs on this dataset.")] = None,
    after: Annotated[str | None, Query(description="Cursor: the last job id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
) -> ListResponse[JobOut]:
    """Filter on metadata with `metadata[key]=value` query parameters (all must match)."""
    metadata = {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    jobs, has_more = list_jobs(
        session, tenant, status=status, dataset_id=dataset_id, metadata=metadata, after=after, limit=limit
    )
    return ListResponse[JobOut](data=[job_out(job) for job in jobs], has_more=has_more)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a job (cooperative)")
def cancel(job_id: str, session: DbSession, tenant: CurrentTenant) -> JobOut:
    job = cancel_job(session, get_job(session, tenant, job_id))
    session.commit()
    return job_out(job)


def event_out(event: JobEvent) -> EventOut:
    return EventOut(
        id=event.id, type=event.type, message=event.message, data=event.data or {}, created_at=event.created_at
    )


@router.get("/{job_id}/events", response_model=ListResponse[EventOut], summary="The job's event log")
def events(
    job_id: str,
    session: DbSession,
    tenant: CurrentTenant,
    after: Annotated[int, Query(ge=0, le=MAX_INT32, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
) -> ListResponse[EventOut]:
    require_job(session, tenant, job_id)
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit + 1)
    ).all()
    data = [event_out(e) for e in rows[:limit]]
    return ListResponse[EventOut](data=data, has_more=len(rows) > limit)


def job_results(job_id: str) -> list[tuple[str, int]]:
    """The files a user may download: the adapter (or model) and the privacy report, not checkpoints."""
    store = get_artifact_store()
    prefix = f"jobs/{job_id}/"
    results = []
    for key in store.list(prefix):
        name = key.removeprefix(prefix)
        if not name.startswith("checkpoints/"):
            results.append((name, store.path(key).stat().st_size))
    return results


@router.get("/{job_id}/artifacts", response_model=ListResponse[ArtifactOut], summary="The job's results")
def artifacts(job_id: str, session: DbSession, tenant: CurrentTenant) -> ListResponse[ArtifactOut]:
    get_job(session, tenant, job_id)
    data = [ArtifactOut(name=name, size_bytes=size) for name, size in job_results(job_id)]
    return ListResponse[ArtifactOut](data=data, has_more=False)


@router.get("/{job_id}/artifacts/{name:path}", summary="Download one result file", response_class=FileResponse)
def artifact(job_id: str, name: str, session: DbSession, tenant: CurrentTenant) -> FileResponse:
    get_job(session, tenant, job_id)
    if name not in dict(job_results(job_id)):
        raise NotFound(f"Job {job_id} has no artifact {name!r}; GET its /artifacts for the list.", param="name")
    path = get_artifact_store().path(f"jobs/{job_id}/{name}")
    return FileResponse(path, filename=path.name)


@router.get("/{job_id}", response_model=JobOut, summary="Read a job")
def read(job_id: str, session: DbSession, tenant: CurrentTenant) -> JobOut:
    return job_out(get_job(session, tenant, job_id))


@router.get("/{job_id}/metrics", response_model=MetricsPage, summary="Per-step epsilon, loss and learning rate")
def metrics(
    job_id: str,
    credentials: Credentials,
    since_step: Annotated[int, Query(ge=0, le=MAX_INT32, description="Return points with step greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most points to return.")] = 1000,
    if_none_match: Annotated[
        str | None, Header(description="The ETag of the last answer: 304 Not Modified when nothing is new.")
    ] = None,
) -> MetricsPage | Response:
    """Keyset-paged: poll with `since_step` = the last `next_since_step` to get only new points.
    Send `If-None-Match` with the previous ETag to get an empty 304 when nothing is new."""
    # Dashboards poll this every second: one database round trip answers it (see poll_metrics),
    # and the JSON is written once rather than validated again against the response model.
    rows, owned = poll_metrics(job_id, credentials, since_step, limit)
    if not owned:
        with session_scope() as session:  # a bad key is 401; another tenant's job, or none, 404
            require_job(session, current_tenant(session, credentials), job_id)
    page = rows[:limit]
    last_step = page[-1].step if page else since_step
    etag = f'W/"{job_id}:{since_step}:{limit}:{last_step}:{len(rows)}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    body = MetricsPage(
        data=[MetricPoint.model_validate(row, from_attributes=True) for row in page],
        has_more=len(rows) > limit,
        next_since_step=last_step,
    )
    return Response(body.model_dump_json(), media_type="application/json", headers={"ETag": etag})


STREAM_POLL_S = 1.0
STREAM_KEEPALIVE_S = 15.0


def parse_last_event_id(value: str | None) -> tuple[int, int]:
    """Stream cursors are `<last metric step>-<last event id>`; anything else starts from the beginning."""
    try:
        step, event = (value or "").split("-")
        return min(max(int(step), 0), MAX_INT32), min(max(int(event), 0), MAX_INT32)
    except ValueError:
        return 0, 0


def stream_batch(job_id: str, since_step: int, after_event: int) -> tuple[list[str], int, int, bool]:
    """New metrics and events as SSE messages, the advanced cursors, and whether the job has ended."""
    messages = []
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_event).order_by(JobEvent.id)
        ).all()
        points = session.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job_id, JobMetric.step > since_step)
            .order_by(JobMetric.step)
            .limit(5000)
        ).all()
    for point in points:
        since_step = point.step
        data = MetricPoint.model_validate(point, from_attributes=True).model_dump_json()
        messages.append(f"id: {since_step}-{after_event}\nevent: metric\ndata: {data}\n\n")
    for event in events:
        after_event = event.id
        data = event_out(event).model_dump_json()
        messages.append(f"id: {since_step}-{after_event}\nevent: job_event\ndata: {data}\n\n")
    ended = JobStatus(status).is_terminal and len(points) < 5000
    return messages, since_step, after_event, ended


@router.get(
    "/{job_id}/stream",
    summary="Server-sent events: new metrics and events as they happen",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def stream(
    job_id: str,
    session: DbSession,
    tenant: CurrentTenant,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (sent by EventSource on reconnect).")
    ] = None,
) -> StreamingResponse:
    """`event: metric` carries a metrics point, `event: job_event` an event-log entry, and `event: end`
    closes the stream once the job has ended and everything was sent. Message ids resume the stream."""
    require_job(session, tenant, job_id)
    session.close()  # the stream polls with short sessions of its own; hold no connection meanwhile

    async def messages() -> AsyncIterator[str]:
        since_step, after_event = parse_last_event_id(last_event_id)
        idle = 0.0
        while True:
            batch, since_step, after_event, ended = await run_in_threadpool(
                stream_batch, job_id, since_step, after_event
            )
            for message in batch:
                yield message
            if ended:
                yield f"id: {since_step}-{after_event}\nevent: end\ndata: {{}}\n\n"
                return
            idle = 0.0 if batch else idle + STREAM_POLL_S
            if idle >= STREAM_KEEPALIVE_S:
                idle = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(messages(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
