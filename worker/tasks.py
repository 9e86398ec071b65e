"""The Celery task that runs one training job.

The database is the source of truth: the task claims the job with one conditional update (only a
queued job can be claimed, so a second delivery does nothing), trains, and ends it with another
conditional update. Celery only delivers the job id.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from service.artifacts import get_artifact_store
from service.datasets import load_records
from service.db import session_scope
from service.jobs import add_event
from service.models import Dataset, Job, JobStatus, PrivacyLedgerEntry, utcnow
from service.queue import TRAIN_TASK, get_celery
from service.settings import get_settings
from worker.metrics import MetricRow, MetricsWriter

logger = logging.getLogger(__name__)
app = get_celery()

ACTIVE = (JobStatus.running, JobStatus.cancelling)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(job_id: str, name: str) -> bool:
    with session_scope() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(
                status=JobStatus.running,
                attempt=Job.attempt + 1,
                worker=name,
                heartbeat_at=utcnow(),
                started_at=utcnow(),
            )
        ).rowcount
        if claimed:
            add_event(session, job_id, "started", f"Started on worker {name}.")
        return bool(claimed)


def finish(
    job_id: str,
    name: str,
    status: JobStatus,
    *,
    epsilon: float | None = None,
    stop_reason: str | None = None,
    error: str | None = None,
    message: str,
) -> None:
    """Move a job this worker holds to a terminal state and settle its ledger entry."""
    with session_scope() as session:
        values: dict[str, Any] = {
            "status": status,
            "finished_at": utcnow(),
            "error": error,
            "stop_reason": stop_reason,
        }
        if epsilon is not None:
            values["epsilon"] = epsilon
        done = session.execute(
            update(Job).where(Job.id == job_id, Job.worker == name, Job.status.in_(ACTIVE)).values(**values)
        ).rowcount
        if not done:
            logger.warning("job %s was no longer held by %s; not marking it %s", job_id, name, status)
            return
        spent = session.scalar(select(Job.epsilon).where(Job.id == job_id))
        session.execute(
            update(PrivacyLedgerEntry)
            .where(PrivacyLedgerEntry.job_id == job_id)
            .values(epsilon=spent, state="spent")
        )
        add_event(session, job_id, status.value, message, epsilon=spent, stop_reason=stop_reason)


def write_privacy_report(job: Job, output_dir: Path, steps: int, epsilon: float) -> None:
    plan, privacy = job.plan, job.spec["privacy"]
    report = {
        "job_id": job.id,
        "unit": privacy["unit"],
        "entity_column": privacy.get("entity_column"),
        "accountant": plan["accountant"],
        "accountant_fell_back": plan.get("fell_back", False),
        "noise_multiplier": plan["noise_multiplier"],
        "sampling_probability": plan["sampling_probability"],
        "max_grad_norm": privacy["max_grad_norm"],
        "steps_planned": plan["steps"],
        "steps_taken": steps,
        "epsilon": epsilon,
        "delta": plan["delta"],
        "covered": "The trained weights (the adapter, or the full model) are (epsilon, delta)-DP with respect "
        f"to adding or removing one {privacy['unit']} of the dataset.",
        "not_covered": [
            "training loss and learning-rate curves (computed on private batches outside DP-SGD)",
            "the exact dataset size and the dataset's metadata (columns, counts, content hash)",
            "anything computed from the data outside DP-SGD, including other jobs on the same dataset "
            "(their epsilons add up: see the dataset's privacy ledger)",
        ],
    }
    (output_dir / "privacy_report.json").write_text(json.dumps(report, indent=2))


def engine_spec(job: Job, dataset: Dataset) -> dict[str, Any]:
    """The job's request as the engine reads it: unset hyperparameters left to the engine's defaults."""
    spec = dict(job.spec)
    spec["hyperparameters"] = {k: v for k, v in spec["hyperparameters"].items() if v is not None}
    spec["privacy"] = {k: v for k, v in spec["privacy"].items() if v is not None}
    spec.update(job_id=job.id, text_field=dataset.text_field, label_field=dataset.label_field)
    return spec


def run_job(job_id: str, name: str) -> None:
    from worker.engine import TrainingConfig, train  # torch is imported only here, in the child

    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        dataset = session.scalar(select(Dataset).where(Dataset.id == job.dataset_id))
        session.expunge_all()
    store = get_artifact_store()
    records = load_records(store.path(dataset.storage_key), dataset.format)
    config = TrainingConfig.from_job(engine_spec(job, dataset), job.plan)
    output_dir = store.path(f"jobs/{job_id}")
    output_dir.mkdir(parents=True, exist_ok=True)

    with MetricsWriter(job_id, settings.metrics_flush_s) as writer:

        def on_step(report: Any) -> None:
            writer.record(
                MetricRow(
                    step=report.step,
                    epsilon=report.epsilon,
                    loss=None if math.isnan(report.loss) else report.loss,  # NaN: an empty Poisson batch
                    learning_rate=report.learning_rate,
                    timestamp=datetime.fromtimestamp(report.timestamp, UTC),
                )
            )
            logger.info(
                "job=%s step=%d/%d epsilon=%.4f", job_id, report.step, job.total_steps, report.epsilon
            )

        outcome = train(
            config, records, output_dir, on_step=on_step, should_stop=lambda: writer.cancel_requested
        )
        writer.flush()  # everything recorded must be in the database before the job can succeed

    write_privacy_report(job, output_dir, outcome.steps, outcome.epsilon)
    if outcome.stop_reason == "cancelled":
        finish(
            job_id,
            name,
            JobStatus.cancelled,
            epsilon=outcome.epsilon,
            stop_reason="cancelled",
            message=f"Cancelled after {outcome.steps} steps at epsilon {outcome.epsilon:.4f}.",
        )
    else:
        finish(
            job_id,
            name,
            JobStatus.succeeded,
            epsilon=outcome.epsilon,
            stop_reason=outcome.stop_reason,
            message=f"Succeeded: {outcome.steps} steps, epsilon {outcome.epsilon:.4f} ({outcome.stop_reason}).",
        )


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    name = worker_name()
    if not claim(job_id, name):
        logger.info("job %s is not queued (already claimed, finished or cancelled); nothing to do", job_id)
        return
    logger.info("job=%s claimed by %s", job_id, name)
    try:
        run_job(job_id, name)
    except Exception as exc:
        logger.exception("job=%s failed", job_id)
        finish(
            job_id,
            name,
            JobStatus.failed,
            error=f"{type(exc).__name__}: {exc}",
            message=f"Failed: {type(exc).__name__}: {exc}",
        )
