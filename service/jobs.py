"""Job creation and the job's record: the spec is solved before anything is stored, the privacy
budget is reserved in the same transaction, and every state change leaves an event."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import Row, and_, exists, func, literal, null, select, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import presets
from service.auth import tenant_of_key
from service.db import autocommit_connection
from service.errors import APIError, Conflict, InvalidRequest, NotFound
from service.models import Dataset, Job, JobEvent, JobMetric, JobStatus, PrivacyLedgerEntry, Tenant, utcnow
from service.privacy import InfeasiblePrivacySpec, PrivacyPlan, plan_privacy
from service.schemas import JobCreate, JobOut, PlanOut
from service.settings import get_settings

logger = logging.getLogger(__name__)


class InfeasibleSpec(APIError):
    status_code = 422
    code = "infeasible_privacy_spec"


class BudgetExceeded(APIError):
    status_code = 409
    code = "privacy_budget_exceeded"


def allowed_models() -> set[str]:
    configured = {m.strip() for m in get_settings().allowed_models.split(",") if m.strip()}
    return set(presets.PRESETS) | configured


def get_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    """The tenant's dataset (not deleted), or 404."""
    dataset = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant.id, Dataset.deleted_at.is_(None))
    )
    if dataset is None:
        raise NotFound(f"No dataset {dataset_id!r}.", param="dataset_id")
    return dataset


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id))
    if job is None:
        raise NotFound(f"No job {job_id!r}.", param="job_id")
    return job


def require_job(session: Session, tenant: Tenant, job_id: str) -> None:
    """404 unless the tenant has this job; cheaper than get_job for endpoints polled every second."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant.id)) is None:
        raise NotFound(f"No job {job_id!r}.", param="job_id")


def poll_metrics(
    job_id: str, credentials: HTTPAuthorizationCredentials | None, since_step: int, limit: int
) -> tuple[list[Row], bool]:
    """Up to ``limit + 1`` metrics points after ``since_step`` in step order, and whether the job
    is the key's tenant's (no points then): dashboards poll this every second, so the key check,
    ownership and page are one statement on a connection without a transaction. A caller that gets
    False has a bad key or no such job, and asks `current_tenant` and `require_job` which."""
    tenant_id = tenant_of_key(credentials)
    owned = and_(Job.id == job_id, Job.tenant_id == tenant_id)
    page = (
        select(JobMetric.step, JobMetric.epsilon, JobMetric.loss, JobMetric.learning_rate, JobMetric.timestamp)
        .join(Job, Job.id == JobMetric.job_id)
        .where(owned, JobMetric.step > since_step)
        .order_by(JobMetric.step)
        .limit(limit + 1)
        .subquery()
    )
    # One row with step 0 when the job is the caller's: points have step > since_step >= 0.
    ownership = select(literal(0), literal(0.0), null(), null(), null()).where(exists().where(owned))
    with autocommit_connection() as connection:
        rows = connection.execute(union_all(select(page), ownership)).all()
    points = sorted((row for row in rows if row.step > 0), key=lambda row: row.step)
    return points, len(points) < len(rows)


def add_event(session: Session, job_id: str, type_: str, message: str, **data: Any) -> None:
    session.add(JobEvent(job_id=job_id, type=type_, message=message, data=data))


def count_units(dataset: Dataset, entity_column: str | None, *, param: str) -> int:
    """The dataset's privacy units: records, or the entities of `entity_column` (counted at upload)."""
    if entity_column is None:
        return dataset.num_records
    if entity_column != dataset.entity_column or dataset.num_entities is None:
        raise InvalidRequest(
            f"Entity-level DP needs the entity column counted at upload: dataset {dataset.id} was uploaded "
            f"with entity_column={dataset.entity_column!r}; upload it again with entity_column={entity_column!r}.",
            param=param,
        )
    return dataset.num_entities


# Where each solver input sits in a job request, so a refusal names the field to change.
JOB_REQUEST_FIELDS = {
    "num_units": "dataset_id",
    "batch_size": "hyperparameters.batch_size",
    "epochs": "hyperparameters.epochs",
    "max_steps": "hyperparameters.max_steps",
    "target_epsilon": "privacy.target_epsilon",
    "noise_multiplier": "privacy.noise_multiplier",
    "target_delta": "privacy.target_delta",
    "accountant": "privacy.accountant",
}


def solve(*, request_fields: dict[str, str], **spec: Any) -> PrivacyPlan:
    """The noise solver, its refusals turned into 422 `infeasible_privacy_spec` errors whose
    `param` is the request field to change (`request_fields` maps solver inputs to those)."""
    try:
        return plan_privacy(**spec)
    except InfeasiblePrivacySpec as exc:
        param = request_fields.get(exc.param, exc.param) if exc.param else None
        raise InfeasibleSpec(exc.message, param=param) from None


def solve_plan(request: JobCreate, num_units: int) -> PrivacyPlan:
    hp, privacy = request.hyperparameters, request.privacy
    return solve(
        num_units=num_units,
        batch_size=hp.batch_size,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        target_epsilon=privacy.target_epsilon,
        noise_multiplier=privacy.noise_multiplier,
        target_delta=privacy.target_delta,
        accountant=privacy.accountant,
        request_fields=JOB_REQUEST_FIELDS,
    )


def epsilon_reserved(session: Session, dataset_id: str) -> tuple[float, float]:
    eps, delta = session.execute(
        select(
            func.coalesce(func.sum(PrivacyLedgerEntry.epsilon), 0.0),
            func.coalesce(func.sum(PrivacyLedgerEntry.delta), 0.0),
        ).where(PrivacyLedgerEntry.dataset_id == dataset_id)
    ).one()
    return float(eps), float(delta)


def request_hash(request: JobCreate) -> str:
    return hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


_SQLITE_BUDGET_LOCK = threading.Lock()


@contextmanager
def budget_transaction(session: Session) -> Iterator[None]:
    """Hold what makes a budget check and its reservation atomic until the caller commits.

    PostgreSQL: the dataset row lock taken in `create_job`. SQLite (the embedded default, one API
    process) ignores row locks, so job creations there are serialised in the process instead."""
    if session.get_bind().dialect.name == "sqlite":
        with _SQLITE_BUDGET_LOCK:
            yield
    else:
        yield


IN_FLIGHT = "A request with this Idempotency-Key is already being processed; retry shortly."


def hold_idempotency_key(session: Session, tenant: Tenant, key: str) -> None:
    """409 when another request with this key is being processed right now (before either solves).

    PostgreSQL: a transaction-scoped advisory lock on (tenant, key), held until this request commits
    or rolls back, so a later request with the key either finds it held (409) or finds the job it
    created. SQLite, the one-process embedded default, serialises job creations instead
    (`budget_transaction`): a second request waits for the first and then gets its job. The unique
    (tenant, key) index stays the backstop in both."""
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.sha256(f"{tenant.id}\0{key}".encode()).digest()
    if not session.scalar(select(func.pg_try_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True)))):
        raise Conflict(IN_FLIGHT, param="Idempotency-Key")


def create_job(session: Session, tenant: Tenant, request: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    """Validate, solve, reserve the budget and store a queued job. Returns (job, created)."""
    body_hash = request_hash(request)
    if idempotency_key:
        hold_idempotency_key(session, tenant, idempotency_key)
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_hash != body_hash:
                raise InvalidRequest(
                    "This Idempotency-Key was used with a different request body; use a new key.",
                    param="Idempotency-Key",
                )
            return existing, False

    if request.base_model not in allowed_models():
        raise InvalidRequest(
            f"Base model {request.base_model!r} is not allowed here; GET /v1/models lists the ones that are "
            "(an operator can add more with DPFT_ALLOWED_MODELS).",
            param="base_model",
        )
    if request.webhook_url is not None and not get_settings().webhook_secret:
        raise InvalidRequest(
            "This deployment cannot sign webhooks: its operator must set DPFT_WEBHOOK_SECRET.", param="webhook_url"
        )
    dataset = get_dataset(session, tenant, request.dataset_id)
    if request.task != "causal_lm" and not dataset.label_field:
        raise InvalidRequest(f"Task {request.task} needs labels: upload the dataset with `label_field`.", param="task")
    entity_column = request.privacy.entity_column if request.privacy.unit == "entity" else None
    plan = solve_plan(request, count_units(dataset, entity_column, param="privacy.entity_column"))

    # Lock the dataset row (after the slow solve) so that concurrent job creations on it cannot
    # together overspend its budget: the second waits here and then sees the first's reservation.
    session.refresh(dataset, with_for_update=True)
    if dataset.epsilon_budget is not None or dataset.delta_budget is not None:
        spent_eps, spent_delta = epsilon_reserved(session, dataset.id)
        if dataset.epsilon_budget is not None and spent_eps + plan.epsilon > dataset.epsilon_budget + 1e-12:
            raise BudgetExceeded(
                f"This job would spend epsilon {plan.epsilon:.4g} but dataset {dataset.id} has "
                f"{max(dataset.epsilon_budget - spent_eps, 0):.4g} left of its budget {dataset.epsilon_budget:.4g}. "
                "Lower target_epsilon, or raise the dataset's epsilon_budget.",
                param="privacy.target_epsilon",
            )
        if dataset.delta_budget is not None and spent_delta + plan.delta > dataset.delta_budget:
            raise BudgetExceeded(
                f"This job's delta {plan.delta:.3g} exceeds what is left of dataset {dataset.id}'s delta budget "
                f"({max(dataset.delta_budget - spent_delta, 0):.3g}).",
                param="privacy.target_delta",
            )

    job = Job(
        tenant_id=tenant.id,
        dataset_id=dataset.id,
        base_model=request.base_model,
        task=request.task,
        spec=request.model_dump(mode="json"),
        plan=plan.to_dict(),
        status=JobStatus.queued,
        total_steps=plan.steps,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        job_metadata=request.metadata,
        webhook_url=str(request.webhook_url) if request.webhook_url else None,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(IN_FLIGHT, param="Idempotency-Key") from None
    session.add(
        PrivacyLedgerEntry(
            dataset_id=dataset.id, job_id=job.id, epsilon=plan.epsilon, delta=plan.delta, state="reserved"
        )
    )
    add_event(session, job.id, "created", "Job created.")
    add_event(
        session,
        job.id,
        "queued",
        f"Queued: {plan.steps} noisy steps, noise multiplier {plan.noise_multiplier:.4g}, "
        f"planned epsilon {plan.epsilon:.4g} ({plan.accountant}).",
    )
    return job, True


def job_out(job: Job) -> JobOut:
    spec = job.spec
    plan = PlanOut.model_validate(job.plan)
    return JobOut(
        id=job.id,
        status=job.status,
        dataset_id=job.dataset_id,
        base_model=job.base_model,
        task=job.task,
        step=job.step,
        total_steps=job.total_steps,
        epsilon=job.epsilon,
        target_epsilon=spec["privacy"].get("target_epsilon"),
        plan=plan,
        hyperparameters=spec["hyperparameters"],
        lora=spec.get("lora"),
        privacy=spec["privacy"],
        stop_reason=job.stop_reason,
        attempt=job.attempt,
        error=job.error,
        metadata=job.job_metadata or {},
        webhook_url=job.webhook_url,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        estimated_finish_at=estimated_finish(job),
    )


def estimated_finish(job: Job) -> datetime | None:
    if job.status != JobStatus.running or not job.step or job.started_at is None:
        return None
    elapsed = utcnow() - job.started_at
    return job.started_at + elapsed * (job.total_steps / job.step)


def settle_ledger(session: Session, job_id: str) -> float:
    """Turn the job's reservation into what it spent: its recorded epsilon, and its delta if it took any
    step (none if it took none). Returns the epsilon spent."""
    spent = float(session.scalar(select(Job.epsilon).where(Job.id == job_id)) or 0.0)
    delta = PrivacyLedgerEntry.delta if spent > 0 else 0.0
    session.execute(
        update(PrivacyLedgerEntry)
        .where(PrivacyLedgerEntry.job_id == job_id)
        .values(epsilon=spent, delta=delta, state="spent")
    )
    return spent


def cancel_job(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (the trainer checks)."""
    if JobStatus(job.status).is_terminal:
        raise Conflict(f"Job {job.id} is already {job.status}; there is nothing to cancel.")
    cancelled_now = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, stop_reason="cancelled", finished_at=utcnow(), cancel_requested=True)
    ).rowcount
    if cancelled_now:
        spent = settle_ledger(session, job.id)  # a job back in the queue after a lost worker has spent some
        if spent:
            add_event(session, job.id, "cancelled", f"Cancelled while queued to resume; epsilon {spent:.4f} spent.")
        else:
            add_event(session, job.id, "cancelled", "Cancelled before it started; nothing was spent.")
    else:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.running)
            .values(status=JobStatus.cancelling, cancel_requested=True)
        )
        add_event(session, job.id, "cancel_requested", "Cancel requested; training stops within a few steps.")
    session.flush()
    session.refresh(job)
    return job


def list_jobs(
    session: Session,
    tenant: Tenant,
    *,
    status: str | None,
    dataset_id: str | None,
    metadata: dict[str, str],
    after: str | None,
    limit: int,
) -> tuple[list[Job], bool]:
    """Newest first, keyset-paged on (created_at, id)."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status)
    if dataset_id:
        query = query.where(Job.dataset_id == dataset_id)
    for key, value in metadata.items():
        query = query.where(Job.job_metadata[key].as_string() == value)
    if after:
        cursor = get_job(session, tenant, after)
        query = query.where(
            (Job.created_at < cursor.created_at) | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
        )
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return list(rows[:limit]), len(rows) > limit
