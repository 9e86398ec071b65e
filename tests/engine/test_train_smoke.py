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
        hyperparameters=Hyperparameters(
            batch_size=8, micro_batch_size=4, max_seq_length=24, learning_rate=1e-2
        ),
    )


def test_lora_causal_lm_trains_the_plan_and_saves_the_adapter_alone(
    tmp_path: Path, lm_records, rdp_epsilon_fn
) -> None:
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


def test_stops_before_the_step_that_would_exceed_the_target_epsilon(
    tmp_path: Path, lm_records, rdp_epsilon_fn
) -> None:
    epsilon_fn = rdp_epsilon_fn(1.0, 8 / 64, 1e-3)
    target = (epsilon_fn(5) + epsilon_fn(6)) / 2  # step 6 would exceed it
    config = _config(steps=12, target_epsilon=target)
    outcome = train(config, lm_records(64), tmp_path, epsilon_fn=epsilon_fn)
    assert outcome.stop_reason == "epsilon_budget"
    assert outcome.steps == 5 and outcome.epsilon <= target
