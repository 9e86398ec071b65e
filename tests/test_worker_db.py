"""The worker's database side on the real PostgreSQL: claiming a job and the metrics sink."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Job, JobEvent, JobMetric, PrivacyLedgerEntry
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


# ---- heartbeat lease, sweeper and fencing -------------------------------------------------


def lease_settings(**overrides: object):  # type: ignore[no-untyped-def]
    from service.settings import get_settings

    return get_settings().model_copy(update={"heartbeat_lease_s": 5.0, "max_attempts": 3, **overrides})


def make_stale(job_id: str, *, epsilon: float = 0.0, step: int = 0, **values: object) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=60), epsilon=epsilon, step=step, **values)
        )


def events_of(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        session.expunge_all()
        return list(rows)


def ledger_of(job_id: str) -> PrivacyLedgerEntry:
    with session_scope() as session:
        entry = session.scalar(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.job_id == job_id))
        session.expunge_all()
        return entry


def test_a_job_with_a_stale_heartbeat_goes_back_to_the_queue_and_its_old_writer_is_fenced(queued_job: str) -> None:
    from worker.metrics import LeaseLost
    from worker.sweeper import SweepResult, requeue_stale

    assert claim(queued_job, "worker-a")
    writer = MetricsWriter(queued_job, flush_interval=3600, worker="worker-a")
    writer.record(row(1))
    writer.flush()
    result = SweepResult()
    requeue_stale(lease_settings(), result)
    assert queued_job not in result.requeued, "a fresh heartbeat keeps the job"

    make_stale(queued_job, epsilon=0.1, step=1)
    result = SweepResult()
    requeue_stale(lease_settings(), result)
    assert result.requeued == [queued_job]
    with session_scope() as session:
        job = session.get(Job, queued_job)
        assert (job.status, job.worker, job.attempt) == ("queued", None, 1)
    requeued = events_of(queued_job)[-1]
    assert requeued.type == "requeued" and requeued.data["reason"] == "heartbeat_lost"
    assert "worker-a" in requeued.message and ledger_of(queued_job).state == "reserved"

    # The old worker comes back to life: it may not write, and it learns that it lost the job.
    writer.record(row(2))
    with pytest.raises(LeaseLost):
        writer.flush()
    assert writer.lease_lost
    with session_scope() as session:
        assert session.scalars(select(JobMetric.step).where(JobMetric.job_id == queued_job)).all() == [1]
    assert claim(queued_job, "worker-b")
    with session_scope() as session:
        assert session.get(Job, queued_job).attempt == 2


def test_after_max_attempts_a_lost_job_fails_and_is_charged_what_it_spent(queued_job: str) -> None:
    from worker.sweeper import SweepResult, requeue_stale

    assert claim(queued_job, "worker-a")
    make_stale(queued_job, epsilon=0.7, step=12, attempt=3)
    result = SweepResult()
    requeue_stale(lease_settings(max_attempts=3), result)
    assert result.failed == [queued_job]
    with session_scope() as session:
        job = session.get(Job, queued_job)
        assert (job.status, job.stop_reason) == ("failed", "worker_lost")
        assert "3 attempts" in job.error and "heartbeats" in job.error
    entry = ledger_of(queued_job)
    assert entry.state == "spent" and entry.epsilon == pytest.approx(0.7)
    assert events_of(queued_job)[-1].type == "failed"


def test_a_lost_job_that_was_being_cancelled_ends_cancelled_and_charged(api, tenant_key: str, queued_job: str) -> None:  # type: ignore[no-untyped-def]
    from worker.sweeper import SweepResult, requeue_stale

    assert claim(queued_job, "worker-a")
    api.post(f"/v1/jobs/{queued_job}/cancel", headers={"Authorization": f"Bearer {tenant_key}"})
    make_stale(queued_job, epsilon=0.4, step=5)
    result = SweepResult()
    requeue_stale(lease_settings(), result)
    assert result.cancelled == [queued_job]
    entry = ledger_of(queued_job)
    assert entry.state == "spent" and entry.epsilon == pytest.approx(0.4)


def test_two_sweepers_at_once_requeue_a_job_once(queued_job: str) -> None:
    import threading

    from worker.sweeper import SweepResult, requeue_stale

    assert claim(queued_job, "worker-a")
    make_stale(queued_job)
    results = [SweepResult() for _ in range(4)]
    barrier = threading.Barrier(len(results))

    def sweep(result: SweepResult) -> None:
        barrier.wait()
        requeue_stale(lease_settings(), result)

    threads = [threading.Thread(target=sweep, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r.requeued) for r in results) == 1
    assert [e.type for e in events_of(queued_job)].count("requeued") == 1


def test_the_writer_buffers_through_a_database_outage_and_reports_its_length(
    queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from sqlalchemy.exc import OperationalError

    import worker.metrics as metrics

    assert claim(queued_job, "worker-a")
    writer = MetricsWriter(queued_job, flush_interval=3600, worker="worker-a", max_outage_s=0.2)
    real_scope = metrics.session_scope

    def unreachable():  # type: ignore[no-untyped-def]
        raise OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(metrics, "session_scope", unreachable)
    for step in (1, 2, 3):
        writer.record(row(step))
        with pytest.raises(OperationalError):
            writer.flush()
    assert writer.pending == 3 and not writer.outage_exceeded
    time.sleep(0.3)
    assert writer.outage_exceeded, "past the limit the task stops training"
    with pytest.raises(OperationalError):
        writer.flush_until(0.2, interval=0.05)
    monkeypatch.setattr(metrics, "session_scope", real_scope)
    writer.flush_until(5)
    assert writer.pending == 0 and writer.outage_s == 0 and not writer.outage_exceeded
    with session_scope() as session:
        assert session.scalars(select(JobMetric.step).where(JobMetric.job_id == queued_job)).all() == [1, 2, 3]


def test_a_running_job_stops_for_the_first_reason_that_applies(queued_job: str) -> None:
    from worker import tasks

    attempt = tasks.Attempt(queued_job, "worker-a")
    assert attempt.stop_reason() is None
    tasks.SHUTDOWN.set()
    try:
        assert attempt.stop_reason() == "shutdown"
        attempt.writer._cancel_requested.set()
        assert attempt.stop_reason() == "cancelled", "a cancel wins over a hand-back"
        attempt.writer._lease_lost.set()
        assert attempt.stop_reason() == "lease_lost"
    finally:
        tasks.SHUTDOWN.clear()


def test_a_shutdown_hand_back_uses_up_an_attempt_only_without_progress(queued_job: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from worker import tasks

    monkeypatch.setattr(tasks, "send", lambda job_id: None)  # the broker's part is the fault tests'

    def attempt_after_hand_back(name: str, step: int, started_at_step: int) -> int:
        assert claim(queued_job, name)
        assert tasks.hand_back(queued_job, name, step, started_at_step=started_at_step)
        with session_scope() as session:
            job = session.get(Job, queued_job)
            assert (job.status, job.worker) == ("queued", None)
            return job.attempt

    assert attempt_after_hand_back("worker-a", 20, started_at_step=0) == 0, "progress: not a failed attempt"
    assert attempt_after_hand_back("worker-b", 20, started_at_step=20) == 1, "no progress: counted"
    assert attempt_after_hand_back("worker-c", 20, started_at_step=20) == 2
    counted = [e.data["counted"] for e in events_of(queued_job) if e.type == "requeued"]
    assert counted == [False, True, True]


def test_failure_reasons_for_time_limits_and_out_of_memory() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.tasks import failure_reason

    class OutOfMemoryError(RuntimeError):  # what torch.cuda raises, by name
        pass

    assert failure_reason(SoftTimeLimitExceeded()) == "time_limit"
    assert failure_reason(OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert failure_reason(MemoryError()) == "out_of_memory"
    assert failure_reason(ValueError("x")) is None
