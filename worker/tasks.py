"""The Celery task that runs one training job.

The database is the source of truth: the task claims the job with one conditional update (only a
queued job can be claimed, so a second delivery does nothing), trains, and ends it with another
conditional update. Celery only delivers the job id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update

from service.artifacts import get_artifact_store
from service.datasets import load_records
from service.db import session_scope
from service.jobs import add_event, settle_ledger
from service.models import Dataset, Job, JobStatus, utcnow
from service.queue import TRAIN_TASK, get_celery
from service.settings import get_settings
from worker.metrics import LeaseLost, MetricRow, MetricsWriter
from worker.sweeper import send

logger = logging.getLogger(__name__)
app = get_celery()

ACTIVE = (JobStatus.running, JobStatus.cancelling)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


#: Set in the pool child by SIGTERM (warm shutdown): checkpoint, hand the job back, return.
SHUTDOWN = threading.Event()
_sweeper: subprocess.Popen | None = None


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


def retrying(action: Callable[[], Any], what: str, deadline_s: float | None = None) -> Any:
    """Run a database action, retrying through a short outage (connection errors only)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    settings = get_settings()
    end = time.monotonic() + (deadline_s if deadline_s is not None else settings.heartbeat_lease_s)
    while True:
        try:
            return action()
        except DBAPIError as exc:
            if not (exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError))):
                raise
            if time.monotonic() >= end:
                raise
            logger.warning("%s: database unreachable, retrying: %s", what, exc)
            time.sleep(0.5)


def finish(*args: Any, **kwargs: Any) -> None:
    """`finish_once`, retried through a short database outage."""
    retrying(lambda: finish_once(*args, **kwargs), f"finishing job {args[0]}")


def finish_once(
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
        spent = settle_ledger(session, job_id)
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
    if job.task != "causal_lm":
        report["not_covered"].append(
            "the set of label values, read from the data to size the classification head (a label that only "
            "one unit has is visible in the model's config)"
        )
    (output_dir / "privacy_report.json").write_text(json.dumps(report, indent=2))


def engine_spec(job: Job, dataset: Dataset) -> dict[str, Any]:
    """The job's request as the engine reads it: unset hyperparameters left to the engine's defaults."""
    spec = dict(job.spec)
    spec["hyperparameters"] = {k: v for k, v in spec["hyperparameters"].items() if v is not None}
    spec["privacy"] = {k: v for k, v in spec["privacy"].items() if v is not None}
    spec.update(job_id=job.id, text_field=dataset.text_field, label_field=dataset.label_field)
    return spec


class Attempt:
    """One worker's attempt at one job: what it has reported so far, and why it should stop."""

    def __init__(self, job_id: str, name: str) -> None:
        settings = get_settings()
        self.job_id = job_id
        self.name = name
        self.step = 0
        self.epsilon = 0.0
        self.writer = MetricsWriter(
            job_id, settings.metrics_flush_s, worker=name, max_outage_s=settings.metrics_max_outage_s
        )

    def stop_reason(self) -> str | None:
        """Why training should stop before its next step (None: go on)."""
        if self.writer.lease_lost:
            return "lease_lost"
        if self.writer.cancel_requested:
            return "cancelled"
        if SHUTDOWN.is_set():
            return "shutdown"
        if self.writer.outage_exceeded:
            return "metrics_outage"
        return None


def durable_checkpoints(attempt: Attempt) -> Any:
    """A Trainer callback that makes every checkpoint follow its metrics into the database.

    A checkpoint is where the next attempt resumes, so every step up to it must already have its
    metrics row: rows are flushed (synchronously) before each save, and a save whose flush fails
    (the database is away) is skipped. With the engine's `checkpoint_on_stop`, a stop (shutdown,
    cancel) saves one at that step, so a hand-back loses no work.
    """
    from transformers import TrainerCallback

    writer = attempt.writer

    class DurableCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if control.should_save:
                try:
                    writer.flush()
                except Exception as exc:
                    control.should_save = False
                    logger.warning("job=%s: no checkpoint at step %d (%s)", attempt.job_id, state.global_step, exc)
            return control

    return DurableCheckpoints()


def hand_back(job_id: str, name: str, step: int, started_at_step: int) -> bool:
    """Put a job this worker holds back in the queue (warm shutdown) and send it again.

    A shutdown is not the job's failure: when this attempt got past ``started_at_step`` (its
    checkpoint at shutdown holds the progress) it does not count toward DPFT_MAX_ATTEMPTS, so rolling
    restarts cannot fail a healthy job. One that made no progress does count, so a job whose worker
    is always stopped before its first new checkpoint still ends."""
    done = retrying(lambda: _requeue(job_id, name, step, step > started_at_step), f"handing job {job_id} back")
    if done:
        send(job_id)
    return bool(done)


def _requeue(job_id: str, name: str, step: int, progressed: bool) -> int:
    with session_scope() as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == name, Job.status == JobStatus.running)
            .values(status=JobStatus.queued, worker=None, attempt=Job.attempt - 1 if progressed else Job.attempt)
        ).rowcount
        if done:
            add_event(
                session,
                job_id,
                "requeued",
                f"Worker {name} is shutting down: checkpoint at step {step}, job handed back to the queue"
                + (" (not counted as a failed attempt)." if progressed else " (no progress: counted as an attempt)."),
                reason="worker_shutdown",
                step=step,
                counted=not progressed,
            )
    return done


def run_job(attempt: Attempt, attempt_number: int) -> None:
    from worker.engine import TrainingConfig, train  # torch is imported only here, in the child
    from worker.engine.trainer import latest_checkpoint

    job_id, name, writer = attempt.job_id, attempt.name, attempt.writer
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
    checkpoint = latest_checkpoint(output_dir)
    from_step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint is not None else 0
    if attempt_number > 1 or checkpoint is not None:  # a hand-back after progress keeps its number
        with session_scope() as session:
            if checkpoint is not None:
                add_event(
                    session,
                    job_id,
                    "resumed",
                    f"Attempt {attempt_number} resumes from the checkpoint at step {from_step}; epsilon continues.",
                    from_step=from_step,
                    attempt=attempt_number,
                )
            else:
                add_event(
                    session,
                    job_id,
                    "restarted",
                    f"Attempt {attempt_number} found no checkpoint and starts from step 0.",
                    attempt=attempt_number,
                )

    with writer:

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
            attempt.step, attempt.epsilon = report.step, max(attempt.epsilon, report.epsilon)
            logger.info("job=%s step=%d/%d epsilon=%.4f", job_id, report.step, job.total_steps, report.epsilon)

        outcome = train(
            config,
            records,
            output_dir,
            on_step=on_step,
            should_stop=lambda: attempt.stop_reason() is not None,
            resume_from=output_dir if checkpoint is not None else None,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_on_stop=True,
            callbacks=[durable_checkpoints(attempt)],
        )
        attempt.step, attempt.epsilon = outcome.steps, max(attempt.epsilon, outcome.epsilon)
        reason = attempt.stop_reason() if outcome.stop_reason == "cancelled" else None
        if reason == "lease_lost":
            logger.warning("job=%s was taken from %s while it trained; leaving it to its new holder", job_id, name)
            return
        # Everything recorded must be in the database before the job can end (or be handed back).
        # Nobody takes the job from this worker within its lease, so wait at least that long.
        writer.flush_until(max(settings.metrics_max_outage_s, settings.heartbeat_lease_s))

    if reason == "shutdown":
        if hand_back(job_id, name, outcome.steps, started_at_step=from_step):
            logger.warning("job=%s handed back at step %d (worker shutdown)", job_id, outcome.steps)
            return
        reason = attempt.stop_reason() or "cancelled"  # not running any more: a cancel came in meanwhile
    write_privacy_report(job, output_dir, outcome.steps, outcome.epsilon)
    if reason == "metrics_outage":
        finish(
            job_id,
            name,
            JobStatus.failed,
            epsilon=outcome.epsilon,
            stop_reason="metrics_outage",
            error=f"metrics could not be written for over {settings.metrics_max_outage_s:g} s",
            message=f"Failed: the database was unreachable for over {settings.metrics_max_outage_s:g} s; "
            f"stopped after {outcome.steps} steps at epsilon {outcome.epsilon:.4f}.",
        )
    elif outcome.stop_reason == "cancelled":
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


def failure_reason(exc: BaseException) -> str | None:
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time_limit"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "out_of_memory"
    return None


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    # Celery's pool child exits at once on SIGTERM (billiard installs a handler that raises
    # SystemExit after Celery's initializer): catch it here instead, in the task, so that training
    # checkpoints and hands the job back (warm shutdown).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    name = worker_name()
    if not claim(job_id, name):
        logger.info("job %s is not queued (already claimed, finished or cancelled); nothing to do", job_id)
        return
    with session_scope() as session:
        attempt_number = session.scalar(select(Job.attempt).where(Job.id == job_id)) or 1
    logger.info("job=%s claimed by %s (attempt %d)", job_id, name, attempt_number)
    attempt = Attempt(job_id, name)
    attempt.writer.start()  # the heartbeat starts now, before torch is imported and the model loaded
    try:
        run_job(attempt, attempt_number)
    except LeaseLost:
        logger.warning("job=%s was taken from %s; leaving it to its new holder", job_id, name)
    except BaseException as exc:
        attempt.writer.__exit__(None, None, None)  # stop the heartbeat, write what is left
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logger.exception("job=%s failed", job_id)
        reason = failure_reason(exc)
        what = {"time_limit": "time limit reached", "out_of_memory": "out of memory"}.get(reason or "", "")
        error = f"{type(exc).__name__}: {exc}" if not what else f"{what} ({type(exc).__name__}: {exc})"
        finish(
            job_id,
            name,
            JobStatus.failed,
            epsilon=attempt.epsilon or None,
            stop_reason=reason,
            error=error,
            message=f"Failed after {attempt.step} steps at epsilon {attempt.epsilon:.4f}: {error}",
        )


# ---- worker process life cycle ----------------------------------------------------------


def check_gpu() -> str:
    """The CUDA device a worker would train on, asked of a fresh interpreter (so that CUDA is
    never initialised in the parent, which forks the pool children). Raises when there is none."""
    probe = (
        "import torch, sys\n"
        "if not torch.cuda.is_available(): sys.exit('torch sees no CUDA device (torch ' + torch.__version__ + ', "
        "built for CUDA ' + str(torch.version.cuda) + ')')\n"
        "print(torch.cuda.get_device_name(0))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(
            (result.stderr or result.stdout).strip().splitlines()[-1] if (result.stderr or result.stdout) else "no GPU"
        )
    return result.stdout.strip()


@signals.worker_init.connect
def _check_gpu_at_start(**_: Any) -> None:
    if not get_settings().require_gpu:
        return
    try:
        device = check_gpu()
    except Exception as exc:
        logger.critical("DPFT_REQUIRE_GPU is set but this worker has no usable GPU: %s", exc)
        raise SystemExit(f"dpft worker: DPFT_REQUIRE_GPU is set but no usable GPU: {exc}") from None
    logger.info("GPU check passed: %s", device)


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    """Each worker runs a sweeper beside it, as a child process of its own: a thread in this
    (forking) parent would hand its locks and database connections to every pool child forked
    while it runs, and a child could hang on a lock held at the fork."""
    global _sweeper
    if get_settings().sweep_interval_s <= 0 or _sweeper is not None:
        return
    from celery import platforms

    _sweeper = subprocess.Popen(
        [sys.executable, "-m", "worker.sweeper"],
        preexec_fn=lambda: platforms.set_pdeathsig("SIGKILL"),  # dies with this worker, even on SIGKILL
    )
    logger.info("sweeper started (pid %d)", _sweeper.pid)


@signals.worker_shutting_down.connect
def _forward_warm_shutdown(how: str = "", **_: Any) -> None:
    """A warm shutdown (SIGTERM to the main process) waits for the running task; tell the pool
    children, so that training checkpoints and hands its job back instead of running for hours."""
    if _sweeper is not None and _sweeper.poll() is None:
        with contextlib.suppress(OSError):
            _sweeper.terminate()
    if how != "Warm":
        return
    from billiard.process import active_children

    for child in active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, signal.SIGTERM)


def _on_sigterm(signum: int, frame: object) -> None:
    SHUTDOWN.set()


@signals.worker_process_init.connect
def _init_pool_child(**_: Any) -> None:
    # Connections the parent's sweeper opened must not be shared with a forked child.
    from service.db import get_engine

    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
