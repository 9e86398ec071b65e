"""Request and response shapes of the public API (v1). Every field is described: the OpenAPI
document and the CLI help are generated from these descriptions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

Task = Literal["causal_lm", "sequence_classification", "token_classification"]
AccountantChoice = Literal["prv", "rdp"]
PrivacyUnit = Literal["record", "entity"]

T = TypeVar("T")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T] = Field(description="The page of objects.")
    has_more: bool = Field(description="Whether another page follows; pass the last id as `after` to get it.")


class Hyperparameters(StrictModel):
    epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Passes over the data in expectation (Poisson sampling). Give this or max_steps.",
    )
    max_steps: int | None = Field(
        None, gt=0, le=10_000_000, description="Number of noisy optimizer steps. Give this or epochs."
    )
    batch_size: int = Field(
        16,
        gt=0,
        le=1_000_000,
        description="Logical batch: the expected number of privacy units per noisy step.",
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        le=100_000,
        description="Physical batch for memory only; does not change the privacy analysis.",
    )
    learning_rate: float = Field(5e-4, gt=0, le=10, description="Peak learning rate.")
    max_seq_length: int = Field(128, gt=0, le=32_768, description="Longer records are truncated to this many tokens.")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Seed for data order and initialisation (not for the DP noise, which is secure).",
    )

    @model_validator(mode="after")
    def _one_length(self) -> Hyperparameters:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give either epochs or max_steps, not both")
        return self


class LoraSpec(StrictModel):
    r: int = Field(8, gt=0, le=1024, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the attention projections of the model family."
    )


class PrivacySpec(StrictModel):
    target_epsilon: float | None = Field(
        None, gt=0, le=1000, description="Epsilon the whole job may spend; the noise is solved from it."
    )
    noise_multiplier: float | None = Field(
        None, gt=0, le=1000, description="Fixed noise multiplier instead of a target epsilon."
    )
    target_delta: float | None = Field(
        None, gt=0, lt=1, description="Delta; default derived from the number of privacy units, below 1/N."
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Per-unit gradient clipping norm.")
    accountant: AccountantChoice = Field("prv", description="Privacy accountant: `prv` (tight) or `rdp`.")
    unit: PrivacyUnit = Field("record", description="Privacy unit: one record, or one entity (all its records).")
    entity_column: str | None = Field(None, description="Column naming the entity, for unit=entity.")
    grad_sample_mode: Literal["hooks", "ghost"] | None = Field(
        None,
        description="How per-sample gradients are computed; default: the fastest correct one for the model.",
    )
    clipping: Literal["flat", "per_layer"] = Field("flat", description="Clip the whole gradient, or each layer.")

    @model_validator(mode="after")
    def _one_target(self) -> PrivacySpec:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        if self.unit == "entity" and not self.entity_column:
            raise ValueError("unit=entity needs entity_column")
        return self


class JobCreate(StrictModel):
    dataset_id: str = Field(description="The dataset to train on (`ds_...`).")
    base_model: str = Field(description="A built-in preset, a local path or a hub id allowed by this deployment.")
    task: Task = Field("causal_lm", description="What the model learns.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings.")
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="LoRA adapter settings, or null for full fine-tuning."
    )
    privacy: PrivacySpec = Field(description="The privacy spec; solved before the job is stored.")
    metadata: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string pairs, stored and filterable."
    )
    webhook_url: HttpUrl | None = Field(
        None, description="POSTed the job (signed, see X-Dpft-Signature) when it succeeds, fails or is cancelled."
    )


class PlanOut(BaseModel):
    noise_multiplier: float = Field(description="Gaussian noise std divided by the clipping norm.")
    sampling_probability: float = Field(description="Probability that a unit is in a noisy step's batch.")
    steps: int = Field(description="Number of noisy optimizer steps.")
    epsilon: float = Field(description="Accountant's upper bound on epsilon after all steps.")
    delta: float = Field(description="Delta of the guarantee.")
    accountant: str = Field(description="The accountant actually used.")
    requested_accountant: str | None = Field(None, description="The accountant the request asked for.")
    fell_back: bool = Field(False, description="True when PRV could not be computed and RDP was used instead.")
    fallback_reason: str | None = Field(None, description="Why PRV could not be computed, when it fell back.")
    target_epsilon: float | None = Field(None, description="The target the noise was solved for, if any.")
    num_units: int | None = Field(
        None, description="Number of privacy units the plan counts (exact: not covered by DP)."
    )
    batch_size: int | None = Field(None, description="Expected logical batch, in privacy units.")
    curve: list[tuple[int, float]] | None = Field(None, description="Planned (step, epsilon) points, at most ~200.")


class PlanRequest(StrictModel):
    num_records: int | None = Field(None, gt=0, description="Number of privacy units. Give this or dataset_id.")
    dataset_id: str | None = Field(None, description="Count the units of this dataset instead of num_records.")
    entity_column: str | None = Field(
        None, description="With dataset_id: plan entity-level DP, counting the dataset's entities."
    )
    batch_size: int = Field(gt=0, description="Expected logical batch (privacy units per noisy step).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data in expectation. Or max_steps.")
    max_steps: int | None = Field(None, gt=0, description="Number of noisy steps. Or epochs.")
    target_epsilon: float | None = Field(None, gt=0, description="Solve the noise for this epsilon.")
    noise_multiplier: float | None = Field(None, gt=0, description="Or report the epsilon of this noise.")
    target_delta: float | None = Field(None, gt=0, lt=1, description="Default: derived from the unit count.")
    accountant: AccountantChoice = Field("prv", description="`prv` (tight, default) or `rdp`.")

    @model_validator(mode="after")
    def _exactly_one_each(self) -> PlanRequest:
        if (self.num_records is None) == (self.dataset_id is None):
            raise ValueError("give exactly one of num_records and dataset_id")
        if self.entity_column and self.dataset_id is None:
            raise ValueError("entity_column needs dataset_id")
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of epochs and max_steps")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        return self


class JobOut(BaseModel):
    id: str = Field(description="Job id (`job_...`).")
    object: Literal["job"] = "job"
    status: str = Field(description="queued, running, cancelling, succeeded, failed or cancelled.")
    dataset_id: str = Field(description="The dataset the job trains on.")
    base_model: str = Field(description="The model that was fine-tuned.")
    task: str = Field(description="causal_lm, sequence_classification or token_classification.")
    step: int = Field(description="Noisy optimizer steps done.")
    total_steps: int = Field(description="Noisy optimizer steps planned.")
    epsilon: float = Field(description="Epsilon spent so far (accountant upper bound).")
    target_epsilon: float | None = Field(description="The job's epsilon limit, if it was given one.")
    plan: PlanOut = Field(description="The noise solver's plan that the job trains.")
    hyperparameters: dict[str, Any] = Field(description="The training settings of the request.")
    lora: dict[str, Any] | None = Field(description="The LoRA settings, or null for full fine-tuning.")
    privacy: dict[str, Any] = Field(description="The privacy spec of the request.")
    stop_reason: str | None = Field(description="Why training ended: completed, epsilon_budget or cancelled.")
    attempt: int = Field(description="How many times a worker has started this job.")
    error: str | None = Field(description="What went wrong, for a failed job.")
    metadata: dict[str, str] = Field(description="The string pairs given at creation.")
    webhook_url: str | None = Field(None, description="Where the terminal state is POSTed.")
    created_at: datetime = Field(description="When it was created (UTC).")
    started_at: datetime | None = Field(description="When a worker first started it (UTC).")
    finished_at: datetime | None = Field(description="When it ended (UTC).")
    estimated_finish_at: datetime | None = Field(
        None, description="For a running job: when it should end at its pace so far (UTC)."
    )


class MetricPoint(BaseModel):
    step: int = Field(description="Noisy optimizer step (1-based).")
    epsilon: float = Field(description="Epsilon spent after this step (accountant upper bound).")
    loss: float | None = Field(description="Training loss on the private batch: NOT covered by the DP guarantee.")
    learning_rate: float | None = Field(description="Learning rate used at this step.")
    timestamp: datetime = Field(description="When the step ended (UTC).")


class MetricsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPoint] = Field(description="Points in increasing step order.")
    has_more: bool = Field(description="Whether more points follow; poll again with next_since_step.")
    next_since_step: int = Field(description="Pass as since_step to get the points after this page.")
    note: str = Field(
        "loss is computed on private training batches outside DP-SGD and is not covered by the guarantee",
        description="What the DP guarantee does not cover in these numbers.",
    )


class DatasetOut(BaseModel):
    id: str = Field(description="Dataset id (`ds_...`).")
    object: Literal["dataset"] = "dataset"
    name: str = Field(description="Display name.")
    format: str = Field(description="jsonl, csv or parquet.")
    size_bytes: int = Field(description="Size of the stored file in bytes.")
    content_hash: str = Field(description="SHA-256 of the stored file.")
    num_records: int = Field(description="Number of records (exact: not covered by DP, visible to the tenant only).")
    num_entities: int | None = Field(description="Number of distinct entities in entity_column, when named.")
    columns: list[str] = Field(description="Fields seen in the records, in first-seen order.")
    text_field: str = Field(description="Field holding the text.")
    label_field: str | None = Field(description="Field holding the label, if any.")
    entity_column: str | None = Field(description="Field naming each record's entity, if any.")
    epsilon_budget: float | None = Field(description="Total epsilon all jobs on this dataset may spend.")
    delta_budget: float | None = Field(description="Total delta all jobs on this dataset may spend.")
    epsilon_spent: float = Field(description="Epsilon spent or reserved by jobs on this dataset (basic composition).")
    created_at: datetime = Field(description="When it was uploaded (UTC).")


class ModelOut(BaseModel):
    id: str = Field(description="The value to pass as base_model.")
    object: Literal["model"] = "model"
    family: str | None = Field(description="Architecture family.")
    tasks: list[str] = Field(description="Tasks this model can be fine-tuned for.")
    builtin: bool = Field(description="True for the tiny presets that ship with dpft (random weights).")
    description: str = Field(description="What the model is.")


class EventOut(BaseModel):
    id: int = Field(description="Increasing event id; pass as `after` to get later events.")
    object: Literal["event"] = "event"
    type: str = Field(description="created, queued, started, cancel_requested, cancelled, succeeded, failed, ...")
    message: str = Field(description="What happened, for a person.")
    data: dict[str, Any] = Field(description="Details for programs (for example the epsilon spent).")
    created_at: datetime = Field(description="When it happened (UTC).")


class DatasetUpdate(StrictModel):
    name: str | None = Field(None, min_length=1, max_length=300, description="New display name.")
    epsilon_budget: float | None = Field(None, gt=0, description="New total epsilon budget (not below what is spent).")
    delta_budget: float | None = Field(None, gt=0, lt=1, description="New total delta budget.")


class LedgerEntryOut(BaseModel):
    object: Literal["ledger_entry"] = "ledger_entry"
    job_id: str = Field(description="The job that spent it.")
    epsilon: float = Field(description="Epsilon this job spent (state spent) or holds in reserve (state reserved).")
    delta: float = Field(description="Delta spent or reserved.")
    state: Literal["reserved", "spent"] = Field(
        description="reserved: the job may still spend up to its planned epsilon; spent: final."
    )
    created_at: datetime = Field(description="When the reservation was made (UTC).")
    updated_at: datetime = Field(description="When it last changed (UTC).")


class ArtifactOut(BaseModel):
    object: Literal["artifact"] = "artifact"
    name: str = Field(description="Path of the file within the job's results, e.g. adapter/adapter_config.json.")
    size_bytes: int = Field(description="Size of the file in bytes.")
