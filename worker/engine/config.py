"""What a training run is told: the privacy plan, the hyperparameters, LoRA, the model and task.

``PrivacyArguments`` is also the notebook-facing argument class of ``DPTrainer`` (it works with
``transformers.HfArgumentParser``). ``TrainingConfig.from_job(spec, plan)`` builds a run from a
stored job: ``spec`` is the job request (``base_model``, ``task``, ``hyperparameters``, ``lora``,
``privacy``, ...) and ``plan`` the solved privacy plan the user saw (a dict or a ``PrivacyPlan``),
whose ``noise_multiplier``, ``sampling_probability`` and ``steps`` are trained exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import EngineError

Task = Literal["causal_lm", "sequence_classification", "token_classification"]


@dataclass
class PrivacyArguments:
    """The DP-SGD mechanism to run: a solved privacy plan plus clipping and noise settings."""

    noise_multiplier: float = field(metadata={"help": "Noise std divided by max_grad_norm (from the plan)."})
    sampling_probability: float = field(
        metadata={"help": "Poisson inclusion probability of each unit per logical step (from the plan)."}
    )
    steps: int = field(metadata={"help": "Number of logical (noisy) steps planned; never exceeded."})
    delta: float = field(metadata={"help": "Target delta of the guarantee (from the plan)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-unit gradient clipping bound C."})
    target_epsilon: float | None = field(
        default=None, metadata={"help": "Training stops before a step whose epsilon would exceed this."}
    )
    accountant: str = field(default="prv", metadata={"help": "Accountant of the plan: 'prv' or 'rdp'."})
    unit: str = field(default="record", metadata={"help": "Privacy unit: 'record' or 'entity'."})
    entity_column: str | None = field(
        default=None, metadata={"help": "Record field holding the entity id (unit='entity')."}
    )
    grad_sample_mode: str = field(
        default="hooks",
        metadata={
            "help": "'hooks': Opacus per-sample gradients (fastest on small models); 'ghost': ghost "
            "clipping, per-sample norms without per-sample gradients (less memory)."
        },
    )
    clipping: str = field(
        default="flat",
        metadata={
            "help": "'flat': one bound C on each unit's whole gradient; 'per_layer': each parameter "
            "tensor clipped to C / sqrt(K) (K tensors), the same total bound C."
        },
    )
    secure_mode: bool = field(
        default=True,
        metadata={"help": "Draw sampling and noise from os.urandom. False = seeded, NOT private: tests only."},
    )
    expected_batch_size: float | None = field(
        default=None,
        metadata={
            "help": "Public constant the noisy gradient sum is divided by; default: the job's batch_size "
            "(= sampling_probability * units)."
        },
    )

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise EngineError("noise_multiplier must be >= 0")
        if not 0.0 < self.sampling_probability <= 1.0:
            raise EngineError("sampling_probability must be in (0, 1]")
        if self.steps < 1:
            raise EngineError("steps must be >= 1")
        if self.max_grad_norm <= 0:
            raise EngineError("max_grad_norm must be > 0")
        if self.unit not in ("record", "entity"):
            raise EngineError(f"unit must be 'record' or 'entity', got {self.unit!r}")
        if self.unit == "entity" and not self.entity_column:
            raise EngineError("unit='entity' needs entity_column")
        if self.grad_sample_mode not in ("hooks", "ghost"):
            raise EngineError(f"grad_sample_mode must be 'hooks' or 'ghost', got {self.grad_sample_mode!r}")
        if self.clipping not in ("flat", "per_layer"):
            raise EngineError(f"clipping must be 'flat' or 'per_layer', got {self.clipping!r}")
        if self.clipping == "per_layer" and self.grad_sample_mode == "ghost":
            raise EngineError("per-layer clipping needs grad_sample_mode='hooks'")

    @classmethod
    def from_plan(cls, plan: Any, **overrides: Any) -> PrivacyArguments:
        """Arguments that train ``plan`` (a ``PrivacyPlan`` or its dict) exactly."""
        values = _as_dict(plan)
        kwargs = {
            "noise_multiplier": float(values["noise_multiplier"]),
            "sampling_probability": float(values["sampling_probability"]),
            "steps": int(values["steps"]),
            "delta": float(values["delta"]),
            "accountant": str(values.get("accountant", "prv")),
        }
        kwargs.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**kwargs)


@dataclass
class Hyperparameters:
    """Optimisation settings; ``batch_size`` is the expected logical (Poisson) batch."""

    batch_size: int = 16
    micro_batch_size: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float = 1e-3
    max_seq_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EngineError("batch_size must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise EngineError("micro_batch_size must be >= 1")
        if self.max_seq_length < 2:
            raise EngineError("max_seq_length must be >= 2")


@dataclass
class LoraSpec:
    """PEFT LoRA settings; ``target_modules=None`` takes the preset's or PEFT's default."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class TrainingConfig:
    """One training run of the engine (see module docstring for ``from_job``)."""

    base_model: str
    task: Task
    privacy: PrivacyArguments
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    text_field: str = "text"
    label_field: str | None = None
    job_id: str | None = None

    def __post_init__(self) -> None:
        if self.task not in ("causal_lm", "sequence_classification", "token_classification"):
            raise EngineError(f"unknown task {self.task!r}")
        if self.task != "causal_lm" and not self.label_field:
            raise EngineError(f"task {self.task!r} needs label_field")

    @classmethod
    def from_job(cls, spec: Mapping[str, Any], plan: Any) -> TrainingConfig:
        """Build the run for a stored job ``spec`` and its solved ``plan``.

        ``spec["privacy"]`` supplies ``max_grad_norm``, ``target_epsilon``, ``unit``,
        ``entity_column``, ``grad_sample_mode``, ``clipping`` and ``secure_mode`` (default True);
        the plan supplies the mechanism (noise, q, steps, delta, accountant).
        """
        privacy_spec = dict(spec.get("privacy") or {})
        hyper = dict(spec.get("hyperparameters") or {})
        known_privacy = {f.name for f in fields(PrivacyArguments)}
        overrides = {
            key: privacy_spec[key]
            for key in (
                "max_grad_norm",
                "target_epsilon",
                "unit",
                "entity_column",
                "grad_sample_mode",
                "clipping",
                "secure_mode",
            )
            if key in privacy_spec and key in known_privacy
        }
        overrides.setdefault("expected_batch_size", hyper.get("batch_size"))
        privacy = PrivacyArguments.from_plan(plan, **overrides)
        known_hyper = {f.name for f in fields(Hyperparameters)}
        unknown = set(hyper) - known_hyper
        if unknown:
            raise EngineError(f"unknown hyperparameters: {sorted(unknown)}")
        lora_spec = spec.get("lora", {})
        lora = None if lora_spec is None else LoraSpec(**lora_spec)
        return cls(
            base_model=str(spec["base_model"]),
            task=spec.get("task", "causal_lm"),
            privacy=privacy,
            hyperparameters=Hyperparameters(**hyper),
            lora=lora,
            text_field=spec.get("text_field") or "text",
            label_field=spec.get("label_field"),
            job_id=spec.get("id") or spec.get("job_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_dict(plan: Any) -> dict[str, Any]:
    if isinstance(plan, Mapping):
        return dict(plan)
    if hasattr(plan, "model_dump"):
        return plan.model_dump()
    if hasattr(plan, "__dataclass_fields__"):
        return asdict(plan)
    return dict(vars(plan))
