"""Health, readiness and the catalogue of base models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from service import presets
from service.auth import CurrentTenant
from service.db import get_engine
from service.errors import ServiceUnavailable
from service.jobs import allowed_models
from service.queue import get_celery
from service.schemas import ListResponse, ModelOut

router = APIRouter()


@router.get("/healthz", tags=["system"], summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["system"], summary="Readiness: the database and the broker are reachable")
def readyz() -> dict[str, str]:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"Database unreachable: {type(exc).__name__}.") from None
    try:
        with get_celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        raise ServiceUnavailable(f"Broker unreachable: {type(exc).__name__}.") from None
    return {"status": "ready"}


@router.get(
    "/v1/models", tags=["models"], response_model=ListResponse[ModelOut], summary="Allowed base models"
)
def list_models(_tenant: CurrentTenant) -> ListResponse[ModelOut]:
    data = []
    for model_id in sorted(allowed_models()):
        preset = presets.PRESETS.get(model_id)
        if preset is not None:
            data.append(
                ModelOut(
                    id=model_id,
                    family=preset.family,
                    tasks=list(preset.tasks),
                    builtin=True,
                    description=preset.description,
                )
            )
        else:
            data.append(
                ModelOut(
                    id=model_id,
                    family=None,
                    tasks=[],
                    builtin=False,
                    description="Configured by the operator (DPFT_ALLOWED_MODELS).",
                )
            )
    return ListResponse[ModelOut](data=data, has_more=False)
