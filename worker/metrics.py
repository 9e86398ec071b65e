"""The metrics sink: per-step epsilon, loss and learning rate, written in batches.

Training calls `record()` after each noisy step; a background thread writes what has gathered
every `flush_interval` seconds in one transaction that also moves the job's progress and
heartbeat, and reads back whether a cancel was requested. Rows are keyed by (job, step) and
inserted with "on conflict do nothing", so a replay after a resume never writes a step twice.

With `worker` given, every write is fenced: it happens only while the job is still held by that
worker (running or cancelling). A job taken away (the sweeper put it back after a lost
heartbeat) sets `lease_lost` and writes nothing more, so two attempts never interleave.

While the database is unreachable rows stay buffered and are written once it is back; training
goes on. `outage_exceeded` says when that has lasted longer than `max_outage_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db import session_scope
from service.models import Job, JobMetric, JobStatus, utcnow

logger = logging.getLogger(__name__)

HELD = (JobStatus.running, JobStatus.cancelling)


@dataclass(frozen=True)
class MetricRow:
    step: int
    epsilon: float
    loss: float | None
    learning_rate: float | None
    timestamp: datetime


def insert_ignoring_duplicates(session: Session, table: Table, rows: list[dict]) -> None:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(table).on_conflict_do_nothing(), rows)


class LeaseLost(RuntimeError):
    """The job is no longer held by this worker: another attempt owns it now."""


class MetricsWriter:
    def __init__(
        self,
        job_id: str,
        flush_interval: float = 1.0,
        *,
        worker: str | None = None,
        max_outage_s: float | None = None,
    ) -> None:
        self.job_id = job_id
        self.flush_interval = flush_interval
        self.worker = worker
        self.max_outage_s = max_outage_s
        self._pending: list[MetricRow] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._cancel_requested = threading.Event()
        self._lease_lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metrics-{job_id}", daemon=True)
        self.last_error: Exception | None = None
        self.failing_since: float | None = None  # monotonic time of the first failed write of an outage
        self.written_step = 0  # highest step known to be in the database

    def start(self) -> None:
        """Start the background writer (and so the heartbeat); idempotent."""
        if self._thread.ident is None and not self._stop.is_set():
            self._thread.start()

    def __enter__(self) -> MetricsWriter:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:  # best effort on the way out, so a failed job still records the epsilon it spent
            self.flush()
        except Exception as exc:
            logger.error("job %s: could not write its last metrics: %s", self.job_id, exc)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def lease_lost(self) -> bool:
        return self._lease_lost.is_set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def outage_s(self) -> float:
        """Seconds since the first failed write of the current outage (0 when writes succeed)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    @property
    def outage_exceeded(self) -> bool:
        return self.max_outage_s is not None and self.outage_s > self.max_outage_s

    def record(self, row: MetricRow) -> None:
        with self._lock:
            self._pending.append(row)

    def flush(self) -> None:
        """Write everything pending (raises if the database refuses; the rows stay pending).

        Raises `LeaseLost` (and drops the buffer) when the job is no longer held by `worker`.
        """
        if self._lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        with self._flush_lock:
            with self._lock:
                batch = list(self._pending)
            try:
                self._write(batch)
            except LeaseLost:
                self._lease_lost.set()
                with self._lock:
                    self._pending.clear()
                raise
            except Exception as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.last_error = exc
                raise
            self.failing_since = None
            self.last_error = None
            with self._lock:
                del self._pending[: len(batch)]
            if batch:
                self.written_step = max(self.written_step, max(row.step for row in batch))

    def _write(self, batch: list[MetricRow]) -> None:
        with session_scope() as session:
            held = update(Job).where(Job.id == self.job_id)
            if self.worker is not None:
                held = held.where(Job.worker == self.worker, Job.status.in_(HELD))
            if batch:
                last = max(batch, key=lambda row: row.step)
                values = {"step": last.step, "epsilon": last.epsilon, "heartbeat_at": utcnow()}
            else:
                values = {"heartbeat_at": utcnow()}
            # The fence first: the row lock it takes also orders this write after a sweeper's.
            if session.execute(held.values(**values)).rowcount == 0 and self.worker is not None:
                session.rollback()
                raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
            if batch:
                insert_ignoring_duplicates(
                    session,
                    JobMetric.__table__,
                    [{"job_id": self.job_id, **row.__dict__} for row in batch],
                )
            if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self._cancel_requested.set()

    def flush_until(self, deadline_s: float, interval: float = 0.5) -> None:
        """Flush, retrying through a database outage for up to `deadline_s` seconds (then raise)."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.flush()
                return
            except LeaseLost:
                raise
            except Exception:
                if time.monotonic() >= end:
                    raise
                time.sleep(interval)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except LeaseLost:
                logger.warning("job %s was taken from %s (lease lost); stopping its metrics", self.job_id, self.worker)
                return
            except Exception as exc:  # the database is away: keep buffering, try again next round
                logger.warning(
                    "metrics flush failed for job %s (will retry; %d rows buffered, %.0f s): %s",
                    self.job_id,
                    self.pending,
                    self.outage_s,
                    exc,
                )
