"""Milestone 1: ``train()`` runs the plan it is given, end to end, on the tiny GPT-2 preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from worker.engine import Hyperparameters, PrivacyArguments, StepReport, TrainingConfig, train

pytestmark = pytest.mark.unit


def _config(steps: int = 12, **privacy: object) -> TrainingConfig:
    q = 8 / 64
    return TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=1.0,
            sampling_probability=q,
            steps=steps,
            delta=1e-3,
            **privacy,  # type: ignore[arg-type]
        ),
        hyperparameters=Hyperparameters(batch_size=8, micro_batch_size=4, max_seq_length=24, learning_rate=1e-2),
    )


def test_lora_causal_lm_trains_the_plan_and_saves_the_adapter_alone(tmp_path: Path, lm_records, rdp_epsilon_fn) -> None:
    config = _config(steps=12)
    epsilon_fn = rdp_epsilon_fn(1.0, config.privacy.sampling_probability, 1e-3)
    reports: list[StepReport] = []
    outcome = train(config, lm_records(64), tmp_path, on_step=reports.append, epsilon_fn=epsilon_fn)

    assert outcome.steps == 12 and outcome.stop_reason == "completed"
    assert [report.step for report in reports] == list(range(1, 13))
    assert [report.epsilon for report in reports] == pytest.approx([epsilon_fn(k) for k in range(1, 13)])
    assert outcome.epsilon == pytest.approx(epsilon_fn(12))
    assert all(math.isfinite(report.learning_rate) for report in reports)
    assert not any(hasattr(report, "grad_norm") or hasattr(report, "batch_size") for report in reports)
    assert outcome.noise_source.startswith("os.urandom")

    files = sorted(path.name for path in outcome.adapter_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    weights = load_file(outcome.adapter_dir / "adapter_model.safetensors")
    assert weights and all("lora_" in key and "_module." not in key for key in weights)
    assert json.loads((outcome.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_cancel_stops_after_the_current_step(tmp_path: Path, lm_records, rdp_epsilon_fn) -> None:
    config = _config(steps=12)
    reports: list[StepReport] = []
    outcome = train(
        config,
        lm_records(64),
        tmp_path,
        on_step=reports.append,
        should_stop=lambda: len(reports) >= 3,
        epsilon_fn=rdp_epsilon_fn(1.0, config.privacy.sampling_probability, 1e-3),
    )
    assert outcome.stop_reason == "cancelled" and outcome.steps == 3 and len(reports) == 3


def test_stops_before_the_step_that_would_exceed_the_target_epsilon(tmp_path: Path, lm_records, rdp_epsilon_fn) -> None:
    epsilon_fn = rdp_epsilon_fn(1.0, 8 / 64, 1e-3)
    target = (epsilon_fn(5) + epsilon_fn(6)) / 2  # step 6 would exceed it
    config = _config(steps=12, target_epsilon=target)
    outcome = train(config, lm_records(64), tmp_path, epsilon_fn=epsilon_fn)
    assert outcome.stop_reason == "epsilon_budget"
    assert outcome.steps == 5 and outcome.epsilon <= target


@pytest.mark.parametrize(
    ("base_model", "task", "lora"),
    [
        ("dpft/tiny-llama", "causal_lm", True),
        ("dpft/tiny-gpt2", "causal_lm", False),
        ("dpft/tiny-bert", "sequence_classification", True),
        ("dpft/tiny-bert", "token_classification", False),
    ],
)
def test_every_task_trains_end_to_end(tmp_path: Path, rdp_epsilon_fn, base_model: str, task: str, lora: bool) -> None:
    if task == "causal_lm":
        records = [{"text": f"note {i}: the order shipped on day {i}"} for i in range(24)]
        fields = {}
    elif task == "sequence_classification":
        records = [{"text": f"{'great' if i % 2 else 'awful'} service {i}", "label": i % 2} for i in range(24)]
        fields = {"label_field": "label"}
    else:
        records = [{"text": ["call", "Ann", "at", str(i)], "tags": ["O", "PER", "O", "NUM"]} for i in range(24)]
        fields = {"label_field": "tags"}
    config = TrainingConfig(
        base_model=base_model,
        task=task,  # type: ignore[arg-type]
        privacy=PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.25, steps=3, delta=1e-3),
        hyperparameters=Hyperparameters(batch_size=6, micro_batch_size=4, max_seq_length=16),
        lora=None if not lora else _config().lora,
        **fields,
    )
    outcome = train(config, records, tmp_path, epsilon_fn=rdp_epsilon_fn(1.0, 0.25, 1e-3))
    assert outcome.steps == 3 and outcome.stop_reason == "completed" and math.isfinite(outcome.final_loss)
    expected = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (outcome.adapter_dir / expected).is_file()


def test_from_job_takes_the_mechanism_from_the_plan_and_the_rest_from_the_spec() -> None:
    spec = {
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "hyperparameters": {"epochs": 2, "batch_size": 10, "micro_batch_size": 5, "learning_rate": 1e-3},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["c_attn"]},
        "privacy": {"target_epsilon": 3.0, "max_grad_norm": 0.5, "unit": "entity", "entity_column": "user"},
        "text_field": "body",
    }
    plan = {
        "noise_multiplier": 1.3,
        "sampling_probability": 0.1,
        "steps": 20,
        "delta": 1e-5,
        "accountant": "rdp",
    }
    config = TrainingConfig.from_job(spec, plan)
    privacy = config.privacy
    assert (privacy.noise_multiplier, privacy.sampling_probability, privacy.steps) == (1.3, 0.1, 20)
    assert (privacy.delta, privacy.accountant, privacy.target_epsilon) == (1e-5, "rdp", 3.0)
    assert (privacy.unit, privacy.entity_column, privacy.max_grad_norm) == ("entity", "user", 0.5)
    assert privacy.secure_mode is True and privacy.expected_batch_size == 10
    assert config.hyperparameters.micro_batch_size == 5 and config.text_field == "body"
    assert config.lora is not None and config.lora.target_modules == ["c_attn"]
    assert TrainingConfig.from_job({**spec, "lora": None}, plan).lora is None
