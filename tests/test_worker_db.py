"""The worker's database side on the real PostgreSQL: claiming a job and the metrics sink."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Job, JobMetric
from worker.metrics import MetricRow, MetricsWriter
from worker.tasks import claim

pytestmark = pytest.mark.integration

SAMPLE = (resources.files("service.data") / "sample.jsonl").read_bytes()


@pytest.fixture
def queued_job(api, tenant_key: str) -> str:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {tenant_key}"}
    ds = api.post("/v1/datasets", headers=headers, files={"file": ("d.jsonl", SAMPLE)}).json()
    body = {"dataset_id": ds["id"], "base_model": "dpft/tiny-gpt2", "privacy": {"target_epsilon": 8}}
    return api.post("/v1/jobs", headers=headers, json=body).json()["id"]


def test_only_one_of_two_deliveries_claims_the_job(queued_job: str) -> None:
    assert claim(queued_job, "worker-a") is True
    assert claim(queued_job, "worker-b") is False
    with session_scope() as session:
        job = session.get(Job, queued_job)
        assert (job.status, job.worker, job.attempt) == ("running", "worker-a", 1)


def row(step: int) -> MetricRow:
    return MetricRow(step=step, epsilon=0.1 * step, loss=1.0, learning_rate=1e-3, timestamp=datetime.now(UTC))


def test_metrics_are_written_in_batches_and_a_replay_writes_nothing_twice(queued_job: str) -> None:
    writer = MetricsWriter(queued_job, flush_interval=3600)
    for step in (1, 2, 3):
        writer.record(row(step))
    writer.flush()
    for step in (2, 3, 4):  # a resumed run replays steps it had already reported
        writer.record(row(step))
    writer.flush()
    with session_scope() as session:
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == queued_job)).all()
        job = session.get(Job, queued_job)
    assert sorted(steps) == [1, 2, 3, 4]
    assert job.step == 4 and job.epsilon == pytest.approx(0.4)
    assert job.heartbeat_at is not None


def test_the_sink_reports_a_cancel_request(api, tenant_key: str, queued_job: str) -> None:  # type: ignore[no-untyped-def]
    assert claim(queued_job, "worker-a")
    writer = MetricsWriter(queued_job, flush_interval=3600)
    writer.flush()
    assert not writer.cancel_requested
    api.post(f"/v1/jobs/{queued_job}/cancel", headers={"Authorization": f"Bearer {tenant_key}"})
    writer.flush()
    assert writer.cancel_requested
