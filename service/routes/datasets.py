"""Datasets: upload (streamed, validated, stored only when valid), read, list, delete."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy import select

from service.artifacts import get_artifact_store
from service.auth import CurrentTenant, DbSession
from service.datasets import check_uri, copy_limited, guess_format, open_uri, validate_records
from service.errors import Conflict, InvalidRequest
from service.jobs import epsilon_reserved, get_dataset
from service.models import Dataset, Job, JobStatus, PrivacyLedgerEntry, new_id, utcnow
from service.schemas import DatasetOut, DatasetUpdate, LedgerEntryOut, ListResponse
from service.settings import get_settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def dataset_out(session: DbSession, dataset: Dataset) -> DatasetOut:
    spent, _ = epsilon_reserved(session, dataset.id)
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        format=dataset.format,
        size_bytes=dataset.size_bytes,
        content_hash=dataset.content_hash,
        num_records=dataset.num_records,
        num_entities=dataset.num_entities,
        columns=dataset.columns,
        text_field=dataset.text_field,
        label_field=dataset.label_field,
        entity_column=dataset.entity_column,
        epsilon_budget=dataset.epsilon_budget,
        delta_budget=dataset.delta_budget,
        epsilon_spent=spent,
        created_at=dataset.created_at,
    )


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload or register a dataset")
def upload_dataset(
    session: DbSession,
    tenant: CurrentTenant,
    file: Annotated[
        UploadFile | None, File(description="The data: JSONL (one JSON object per line), CSV or Parquet.")
    ] = None,
    uri: Annotated[
        str | None,
        Form(description="Instead of a file: file:// inside the configured root, or s3://bucket/key. Copied in."),
    ] = None,
    name: Annotated[str | None, Form(max_length=300, description="Display name; default: the file name.")] = None,
    format: Annotated[
        str | None, Form(description="jsonl, csv or parquet; guessed from the file name when absent.")
    ] = None,
    text_field: Annotated[str, Form(min_length=1, description="Field holding the text.")] = "text",
    label_field: Annotated[str | None, Form(description="Field holding the label, for classification.")] = None,
    entity_column: Annotated[
        str | None, Form(description="Field naming the entity (user) of each record, for entity-level DP.")
    ] = None,
    epsilon_budget: Annotated[
        float | None,
        Form(gt=0, allow_inf_nan=False, description="Total epsilon all jobs on this dataset may spend."),
    ] = None,
    delta_budget: Annotated[
        float | None, Form(gt=0, lt=1, allow_inf_nan=False, description="Total delta all jobs may spend.")
    ] = None,
) -> DatasetOut:
    """The data is streamed to the artifact store and validated record by record; a dataset that fails
    validation (the error names the line or row) is stored nowhere."""
    settings = get_settings()
    if (file is None) == (uri is None):
        raise InvalidRequest("Send exactly one of `file` (an upload) and `uri`.", param="file")
    if uri is not None:
        check_uri(uri, file_root=settings.dataset_file_root)
    source_name = file.filename if file is not None else urlsplit(uri or "").path.rsplit("/", 1)[-1]
    fmt = guess_format(source_name, format)
    store = get_artifact_store()
    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}/data.{fmt}"
    try:
        with store.writer(key) as handle:
            if file is not None:
                size, content_hash = copy_limited(file.file, handle, settings.max_upload_bytes)
            else:
                with open_uri(
                    uri or "", file_root=settings.dataset_file_root, s3_endpoint_url=settings.s3_endpoint_url
                ) as source:
                    size, content_hash = copy_limited(source, handle, settings.max_upload_bytes)
        summary = validate_records(
            store.path(key),
            fmt,
            text_field=text_field,
            label_field=label_field or None,
            entity_column=entity_column or None,
            max_record_chars=settings.max_record_chars,
        )
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant.id,
            name=name or source_name or dataset_id,
            format=fmt,
            storage_key=key,
            size_bytes=size,
            content_hash=content_hash,
            num_records=summary.num_records,
            num_entities=summary.num_entities if entity_column else None,
            columns=summary.columns,
            text_field=text_field,
            label_field=label_field or None,
            entity_column=entity_column or None,
            epsilon_budget=epsilon_budget,
            delta_budget=delta_budget,
        )
        session.add(dataset)
        session.commit()
    except BaseException:
        store.delete(f"datasets/{dataset_id}")
        raise
    return dataset_out(session, dataset)


@router.get("", response_model=ListResponse[DatasetOut], summary="List datasets")
def list_datasets(session: DbSession, tenant: CurrentTenant) -> ListResponse[DatasetOut]:
    rows = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id, Dataset.deleted_at.is_(None))
        .order_by(Dataset.created_at.desc())
    ).all()
    return ListResponse[DatasetOut](data=[dataset_out(session, d) for d in rows], has_more=False)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Read a dataset")
def read_dataset(dataset_id: str, session: DbSession, tenant: CurrentTenant) -> DatasetOut:
    return dataset_out(session, get_dataset(session, tenant, dataset_id))


@router.patch("/{dataset_id}", response_model=DatasetOut, summary="Rename a dataset or change its privacy budget")
def update_dataset(dataset_id: str, update: DatasetUpdate, session: DbSession, tenant: CurrentTenant) -> DatasetOut:
    dataset = get_dataset(session, tenant, dataset_id)
    session.refresh(dataset, with_for_update=True)
    spent_eps, spent_delta = epsilon_reserved(session, dataset.id)
    if update.epsilon_budget is not None and update.epsilon_budget < spent_eps:
        raise Conflict(
            f"Jobs on this dataset have already spent or reserved epsilon {spent_eps:.4g}; "
            "the budget cannot go below that.",
            param="epsilon_budget",
        )
    if update.delta_budget is not None and update.delta_budget < spent_delta:
        raise Conflict(
            f"Jobs on this dataset have already spent or reserved delta {spent_delta:.3g}.",
            param="delta_budget",
        )
    for field in update.model_fields_set:
        setattr(dataset, field, getattr(update, field))
    session.commit()
    return dataset_out(session, dataset)


@router.delete("/{dataset_id}", response_model=DatasetOut, summary="Delete a dataset's data")
def delete_dataset(dataset_id: str, session: DbSession, tenant: CurrentTenant) -> DatasetOut:
    """Deletes the stored file. The dataset's record stays (hidden) so that its jobs and privacy ledger
    keep their history; a dataset with a job still queued or running cannot be deleted."""
    dataset = get_dataset(session, tenant, dataset_id)
    active = session.scalar(
        select(Job.id).where(
            Job.dataset_id == dataset.id,
            Job.status.in_([JobStatus.queued, JobStatus.running, JobStatus.cancelling]),
        )
    )
    if active is not None:
        raise Conflict(f"Job {active} is still using this dataset; cancel it or wait for it to finish.")
    dataset.deleted_at = utcnow()
    session.commit()
    get_artifact_store().delete(f"datasets/{dataset.id}")
    return dataset_out(session, dataset)


@router.get("/{dataset_id}/ledger", response_model=ListResponse[LedgerEntryOut], summary="What each job spent")
def ledger(dataset_id: str, session: DbSession, tenant: CurrentTenant) -> ListResponse[LedgerEntryOut]:
    """The privacy ledger: per job, the epsilon and delta spent (or reserved while it runs). Under basic
    composition they add up to the dataset's `epsilon_spent`."""
    get_dataset(session, tenant, dataset_id)
    rows = session.scalars(
        select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.dataset_id == dataset_id).order_by(PrivacyLedgerEntry.id)
    ).all()
    data = [LedgerEntryOut.model_validate(entry, from_attributes=True) for entry in rows]
    return ListResponse[LedgerEntryOut](data=data, has_more=False)
