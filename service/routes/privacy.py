"""The noise solver over HTTP: plan a DP-SGD run before creating a job."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import CurrentTenant, DbSession
from service.jobs import count_units, get_dataset, solve
from service.schemas import PlanOut, PlanRequest

router = APIRouter(prefix="/v1/privacy", tags=["privacy"])


@router.post("/plan", response_model=PlanOut, summary="Solve a privacy spec (the noise solver)")
def plan(request: PlanRequest, session: DbSession, tenant: CurrentTenant) -> PlanOut:
    """Find the smallest noise multiplier whose accountant upper bound on epsilon meets the target
    (or report the epsilon of a given noise), with the planned epsilon curve; 422
    `infeasible_privacy_spec` with what to change when no run can meet the spec."""
    num_units = request.num_records
    if request.dataset_id is not None:
        dataset = get_dataset(session, tenant, request.dataset_id)
        num_units = count_units(dataset, request.entity_column, param="entity_column")
    assert num_units is not None
    result = solve(
        num_units=num_units,
        batch_size=request.batch_size,
        epochs=request.epochs,
        max_steps=request.max_steps,
        target_epsilon=request.target_epsilon,
        noise_multiplier=request.noise_multiplier,
        target_delta=request.target_delta,
        accountant=request.accountant,
        request_fields={"num_units": "dataset_id" if request.dataset_id else "num_records"},
    )
    return PlanOut.model_validate(result.to_dict())
