"""The sweeper: jobs whose worker died go back to the queue, and lost messages are sent again.

The database is the source of truth; Celery only delivers. Two things can go wrong with delivery:

* the worker holding a job dies (SIGKILL, OOM killer, lost node): its heartbeat stops. A running
  job whose heartbeat is older than `DPFT_HEARTBEAT_LEASE_S` goes back to `queued` (the next
  claim counts attempt + 1, the task resumes from the last checkpoint) and is sent again. After
  `DPFT_MAX_ATTEMPTS` claims it fails with the reason instead; a job that was being cancelled is
  recorded as cancelled. Either way its ledger entry is charged with the epsilon it spent.
* the broker loses a message (Redis restarted without persistence): a queued job that the broker
  no longer holds (checked on Redis; the SQLite broker keeps its messages) is sent again.

Every change is one conditional update on the job's old state, so several sweepers (one per
worker process, plus `python -m worker.sweeper`) can run at once: only one of them wins, and a
message sent twice is harmless (a second delivery finds the job claimed and does nothing).
This module never imports torch.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update

from service.db import session_scope
from service.jobs import add_event, settle_ledger
from service.models import Job, JobStatus, utcnow
from service.queue import QUEUE, enqueue_training
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

HELD = (JobStatus.running, JobStatus.cancelling)
JOB_ID = re.compile(r"job_[0-9a-f]{24}")  # service.models.new_id("job")
#: Redis keys kombu uses for one queue's priority levels (priority 0 is the bare name).
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


@dataclass
class SweepResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)


def requeue_stale(settings: Settings, result: SweepResult) -> None:
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_lease_s)
    with session_scope() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.worker, Job.attempt, Job.heartbeat_at, Job.step, Job.epsilon).where(
                Job.status.in_(HELD), Job.heartbeat_at < cutoff
            )
        ).all()
    for job_id, status, worker, attempt, heartbeat_at, step, epsilon in stale:
        age = (now - heartbeat_at).total_seconds()
        why = f"worker {worker} stopped sending heartbeats ({age:.0f} s since the last, lease {settings.heartbeat_lease_s:g} s)"
        with session_scope() as session:
            held_by_it = update(Job).where(
                Job.id == job_id, Job.status == status, Job.worker == worker, Job.heartbeat_at < cutoff
            )
            if status == JobStatus.cancelling:
                if session.execute(
                    held_by_it.values(status=JobStatus.cancelled, stop_reason="cancelled", finished_at=utcnow())
                ).rowcount:
                    spent = settle_ledger(session, job_id)
                    add_event(
                        session,
                        job_id,
                        "cancelled",
                        f"Cancelled: {why} while it was stopping; {step} steps, epsilon {spent:.4f} spent.",
                        epsilon=spent,
                        stop_reason="cancelled",
                    )
                    result.cancelled.append(job_id)
            elif attempt >= settings.max_attempts:
                error = f"gave up after {attempt} attempts: {why}"
                if session.execute(
                    held_by_it.values(
                        status=JobStatus.failed, stop_reason="worker_lost", error=error, finished_at=utcnow()
                    )
                ).rowcount:
                    spent = settle_ledger(session, job_id)
                    add_event(
                        session,
                        job_id,
                        "failed",
                        f"Failed: {error}; {step} steps, epsilon {spent:.4f} spent.",
                        epsilon=spent,
                        stop_reason="worker_lost",
                    )
                    result.failed.append(job_id)
            elif session.execute(held_by_it.values(status=JobStatus.queued, worker=None)).rowcount:
                add_event(
                    session,
                    job_id,
                    "requeued",
                    f"Back to the queue: {why}. It resumes from its last checkpoint "
                    f"(attempt {attempt + 1} of {settings.max_attempts}).",
                    reason="heartbeat_lost",
                    worker=worker,
                    step=step,
                    epsilon=epsilon,
                )
                result.requeued.append(job_id)
                logger.warning("job=%s requeued: %s", job_id, why)
    for job_id in result.requeued:
        send(job_id)


def send(job_id: str) -> bool:
    try:
        enqueue_training(job_id)
        return True
    except Exception as exc:  # the broker is away: the lost-message check sends it later
        logger.warning("could not send job %s (will retry on a later sweep): %s", job_id, exc)
        return False


def jobs_in_redis(settings: Settings) -> set[str] | None:
    """Job ids the Redis broker holds (waiting or delivered-unacked); None when that cannot be told."""
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    prefix = settings.broker_key_prefix
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        raw: list[bytes] = []
        for suffix in PRIORITY_SUFFIXES:
            raw.extend(client.lrange(f"{prefix}{QUEUE}{suffix}", 0, -1))
        raw.extend(client.hvals(f"{prefix}unacked"))
    finally:
        client.close()
    found: set[str] = set()
    for message in raw:  # the task's argsrepr header names the job id in plain text
        found.update(JOB_ID.findall(message.decode(errors="replace")))
    return found


def resend_lost(settings: Settings, result: SweepResult) -> None:
    try:
        held = jobs_in_redis(settings)
    except Exception as exc:
        logger.warning("could not read the broker's queue: %s", exc)
        return
    if held is None:
        return
    cutoff = utcnow() - timedelta(seconds=settings.resend_after_s)
    with session_scope() as session:
        queued = session.scalars(select(Job.id).where(Job.status == JobStatus.queued, Job.created_at < cutoff)).all()
    for job_id in queued:
        if job_id in held:
            continue
        # Look again after reading the broker: the job may have been claimed meanwhile.
        with session_scope() as session:
            if session.scalar(select(Job.status).where(Job.id == job_id)) != JobStatus.queued:
                continue
        if send(job_id):
            with session_scope() as session:
                add_event(session, job_id, "resent", "The broker had lost this job's message; sent it again.")
            result.resent.append(job_id)
            logger.warning("job=%s resent: the broker held no message for it", job_id)


def sweep(settings: Settings | None = None) -> SweepResult:
    settings = settings or get_settings()
    result = SweepResult()
    requeue_stale(settings, result)
    resend_lost(settings, result)
    return result


class SweeperThread(threading.Thread):
    """Sweeps every `interval` seconds until stopped; errors (database away) are logged and retried."""

    def __init__(self, interval: float | None = None) -> None:
        super().__init__(name="dpft-sweeper", daemon=True)
        self.interval = interval if interval is not None else get_settings().sweep_interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        logger.info("sweeper running every %.1f s", self.interval)
        while not self.stopped.wait(self.interval):
            try:
                sweep()
            except Exception as exc:
                logger.warning("sweep failed (will retry): %s", exc)

    def stop(self) -> None:
        self.stopped.set()


def main() -> None:
    """`python -m worker.sweeper`: what each worker starts beside it; also runs on its own."""
    import signal

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/sweeper] %(message)s")
    thread = SweeperThread()
    signal.signal(signal.SIGTERM, lambda *_: thread.stop())
    thread.start()
    try:
        while thread.is_alive():
            thread.join(1)
    except KeyboardInterrupt:
        thread.stop()


if __name__ == "__main__":
    main()
