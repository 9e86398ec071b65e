"""Jobs: create (solved against the noise solver first), read, and per-step metrics."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select

from service.auth import CurrentTenant, DbSession
from service.jobs import create_job, get_job, job_out
from service.models import JobMetric
from service.queue import enqueue_training
from service.schemas import JobCreate, JobOut, MetricPoint, MetricsPage

logger = logging.getLogger(__name__)
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
    job, created = create_job(session, tenant, request, idempotency_key)
    if not created:
        response.status_code = 200
        return job_out(job)
    session.commit()  # the job must be in the database before a worker can be told about it
    try:
        enqueue_training(job.id)
    except Exception:  # the broker is down: the job stays queued and the sweeper re-sends it
        logger.exception("could not enqueue job %s; it stays queued", job.id)
    return job_out(job)


@router.get("/{job_id}", response_model=JobOut, summary="Read a job")
def read(job_id: str, session: DbSession, tenant: CurrentTenant) -> JobOut:
    return job_out(get_job(session, tenant, job_id))


@router.get(
    "/{job_id}/metrics", response_model=MetricsPage, summary="Per-step epsilon, loss and learning rate"
)
def metrics(
    job_id: str,
    session: DbSession,
    tenant: CurrentTenant,
    since_step: Annotated[int, Query(ge=0, description="Return points with step greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most points to return.")] = 1000,
) -> MetricsPage:
    get_job(session, tenant, job_id)
    rows = session.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.step > since_step)
        .order_by(JobMetric.step)
        .limit(limit + 1)
    ).all()
    page = rows[:limit]
    return MetricsPage(
        data=[
            MetricPoint(
                step=m.step,
                epsilon=m.epsilon,
                loss=m.loss,
                learning_rate=m.learning_rate,
                timestamp=m.timestamp,
            )
            for m in page
        ],
        has_more=len(rows) > limit,
        next_since_step=page[-1].step if page else since_step,
    )
