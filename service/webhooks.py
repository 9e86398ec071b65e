"""Webhooks: a job's terminal state POSTed to the URL it named, signed, retried with backoff.

The database is the outbox: a job that ended with a `webhook_url` and no `webhook_delivered` or
`webhook_failed` event is due. The API process delivers due webhooks in the background; attempts
are recorded as events, so every replica sees the same state, and on PostgreSQL a row lock with
SKIP LOCKED keeps two replicas from delivering the same one at once.

Receivers verify `X-Dpft-Signature: t=<unix time>,v1=<hex>` where the hex is
HMAC-SHA256(DPFT_WEBHOOK_SECRET, "<t>.<raw body>"), and should reject old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta

import httpx
from sqlalchemy import and_, exists, func, select

from service.db import session_scope
from service.jobs import add_event, job_out
from service.models import Job, JobEvent, JobStatus, utcnow
from service.settings import get_settings

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dpft-Signature"
DONE_EVENTS = ("webhook_delivered", "webhook_failed")
TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """What a receiver does (and the tests use): check the signature and that it is recent."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, header) and abs(time.time() - timestamp) <= tolerance_s


def backoff_s(failed_attempts: int) -> float:
    return min(get_settings().webhook_backoff_s * 2 ** (failed_attempts - 1), 3600.0)


def deliver_due(client: httpx.Client, limit: int = 20) -> int:
    """Attempt every due delivery once; returns how many were attempted."""
    settings = get_settings()
    attempted = 0
    with session_scope() as session:
        done = exists().where(and_(JobEvent.job_id == Job.id, JobEvent.type.in_(DONE_EVENTS)))
        query = (
            select(Job)
            .where(Job.webhook_url.is_not(None), Job.status.in_(TERMINAL), ~done)
            .order_by(Job.finished_at)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=Job)
        for job in session.scalars(query).all():
            failures, last_failure = session.execute(
                select(func.count(JobEvent.id), func.max(JobEvent.created_at)).where(
                    JobEvent.job_id == job.id, JobEvent.type == "webhook_attempt_failed"
                )
            ).one()
            if failures and utcnow() < last_failure + timedelta(seconds=backoff_s(failures)):
                continue
            attempted += 1
            body = json.dumps(
                {
                    "id": f"evt_{job.id}_{job.status}",
                    "type": f"job.{job.status}",
                    "created_at": utcnow().isoformat(),
                    "data": job_out(job).model_dump(mode="json"),
                }
            ).encode()
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(settings.webhook_secret or "", int(time.time()), body),
            }
            try:
                response = client.post(job.webhook_url, content=body, headers=headers)
                error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                add_event(session, job.id, "webhook_delivered", f"Webhook delivered to {job.webhook_url}.")
            elif failures + 1 >= settings.webhook_max_attempts:
                add_event(session, job.id, "webhook_failed", f"Webhook gave up after {failures + 1} attempts: {error}.")
            else:
                add_event(
                    session,
                    job.id,
                    "webhook_attempt_failed",
                    f"Webhook attempt {failures + 1} failed ({error}); retrying in {backoff_s(failures + 1):.0f} s.",
                )
            session.flush()
    return attempted
