"""The metrics sink: per-step epsilon, loss and learning rate, written in batches.

Training calls `record()` after each noisy step; a background thread writes what has gathered
every `flush_interval` seconds in one transaction that also moves the job's progress and
heartbeat, and reads back whether a cancel was requested. Rows are keyed by (job, step) and
inserted with "on conflict do nothing", so a replay after a resume never writes a step twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db import session_scope
from service.models import Job, JobMetric, utcnow

logger = logging.getLogger(__name__)


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


class MetricsWriter:
    def __init__(self, job_id: str, flush_interval: float = 1.0) -> None:
        self.job_id = job_id
        self.flush_interval = flush_interval
        self._pending: list[MetricRow] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._cancel_requested = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metrics-{job_id}", daemon=True)
        self.last_error: Exception | None = None

    def __enter__(self) -> MetricsWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        try:  # best effort on the way out, so a failed job still records the epsilon it spent
            self.flush()
        except Exception as exc:
            logger.error("job %s: could not write its last metrics: %s", self.job_id, exc)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def record(self, row: MetricRow) -> None:
        with self._lock:
            self._pending.append(row)

    def flush(self) -> None:
        """Write everything pending (raises if the database refuses; the rows stay pending)."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._pending)
            with session_scope() as session:
                if batch:
                    insert_ignoring_duplicates(
                        session,
                        JobMetric.__table__,
                        [{"job_id": self.job_id, **row.__dict__} for row in batch],
                    )
                    last = batch[-1]
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id)
                        .values(step=last.step, epsilon=last.epsilon, heartbeat_at=utcnow())
                    )
                else:
                    session.execute(update(Job).where(Job.id == self.job_id).values(heartbeat_at=utcnow()))
                if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                    self._cancel_requested.set()
            with self._lock:
                del self._pending[: len(batch)]

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
                self.last_error = None
            except Exception as exc:  # the database is away: keep buffering, try again next round
                self.last_error = exc
                logger.warning("metrics flush failed for job %s (will retry): %s", self.job_id, exc)
