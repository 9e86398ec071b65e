"""The budget: exactly the plan's steps, never past the target epsilon (PRIVACY.md 1, 4, 13, 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from service.privacy import plan_privacy
from worker.engine import Hyperparameters, PrivacyArguments, StepReport, TrainingConfig, train
from worker.engine.run import build_trainer

pytestmark = pytest.mark.unit


def test_two_micro_batches_end_exactly_at_the_plan_and_below_the_target(tmp_path: Path, lm_records) -> None:
    """A public DP trainer ended at epsilon 8.65 for a target of 8 with 2 micro-batches."""
    plan = plan_privacy(num_units=64, batch_size=8, epochs=3, target_epsilon=8.0, target_delta=1e-3)
    spec = {
        "base_model": "dpft/tiny-gpt2",
        "task": "causal_lm",
        "hyperparameters": {"epochs": 3, "batch_size": 8, "micro_batch_size": 4, "max_seq_length": 24},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None},
        "privacy": {"target_epsilon": 8.0, "max_grad_norm": 1.0, "accountant": "prv", "unit": "record"},
    }
    config = TrainingConfig.from_job(spec, plan.to_dict())
    reports: list[StepReport] = []
    outcome = train(config, lm_records(64), tmp_path, on_step=reports.append)

    assert outcome.stop_reason == "completed"
    assert outcome.steps == plan.steps == len(reports)
    assert outcome.epsilon == pytest.approx(plan.epsilon, abs=1e-12)
    assert outcome.epsilon <= 8.0
    assert all(a.epsilon <= b.epsilon for a, b in zip(reports, reports[1:], strict=False))


def test_the_trainer_counts_one_noisy_step_per_logical_batch(tmp_path: Path, lm_records, record_batches) -> None:
    """Sampler batches, optimizer noise calls and Trainer steps are the same count."""
    config = TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.5, steps=7, delta=1e-3),
        hyperparameters=Hyperparameters(batch_size=16, micro_batch_size=3, max_seq_length=16),
    )
    trainer = build_trainer(config, lm_records(32), tmp_path, epsilon_fn=float)
    drawn = record_batches(trainer)
    trainer.train()
    assert trainer.noisy_steps == trainer.state.global_step == 7
    assert len(drawn) == 7  # batches of about 16 split into micro-batches of 3: still 7 steps
    assert max(len(batch) for batch in drawn) > 3


def test_pre_noise_gradient_norm_is_never_logged_and_loss_is_labelled(tmp_path: Path, lm_records) -> None:
    logged: list[dict[str, float]] = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003
            logged.append(dict(logs or {}))

    config = TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.25, steps=4, delta=1e-3),
        hyperparameters=Hyperparameters(batch_size=8, max_seq_length=16),
    )
    trainer = build_trainer(config, lm_records(32), tmp_path, epsilon_fn=float)
    trainer.args.logging_strategy = "steps"
    trainer.args.logging_steps = 1
    trainer.add_callback(Capture())
    trainer.train()
    assert len(logged) >= 4
    assert not any("grad_norm" in key for logs in logged for key in logs)
    assert all(key not in logs for logs in logged for key in ("loss", "train_loss"))
    assert any("loss_not_private" in logs for logs in logged)
    assert trainer.args.max_grad_norm == 0.0


def test_lora_weights_change_and_frozen_weights_do_not(tmp_path: Path, lm_records) -> None:
    config = TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(noise_multiplier=0.5, sampling_probability=0.25, steps=3, delta=1e-3),
        hyperparameters=Hyperparameters(batch_size=8, max_seq_length=16, learning_rate=1e-2),
    )
    trainer = build_trainer(config, lm_records(32), tmp_path, epsilon_fn=float)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"LoRA weight {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen weight {name} changed"


def test_explicit_max_steps_other_than_the_plan_is_refused(tmp_path: Path, lm_records) -> None:
    from worker.engine import EngineError
    from worker.engine.trainer import _make_args_private

    privacy = PrivacyArguments(noise_multiplier=1.0, sampling_probability=0.25, steps=4, delta=1e-3)
    with pytest.raises(EngineError, match="plan"):
        _make_args_private(TrainingArguments(output_dir=str(tmp_path), max_steps=5), privacy)
    with pytest.raises(EngineError, match="gradient_accumulation_steps"):
        _make_args_private(TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2), privacy)


@pytest.mark.parametrize(("accountant", "published"), [("rdp", 7.329), ("prv", 6.777)])
def test_the_engine_accountant_matches_published_values(accountant: str, published: float) -> None:
    """Opacus' accountant tests: noise 1.5, q 0.04, 2250 steps, delta 1e-5."""
    from worker.engine.accounting import epsilon_fn_for

    privacy = PrivacyArguments(
        noise_multiplier=1.5, sampling_probability=0.04, steps=2250, delta=1e-5, accountant=accountant
    )
    epsilon = epsilon_fn_for(privacy)(2250)
    assert epsilon == pytest.approx(published, abs=0.06 if accountant == "prv" else 0.005)
    assert epsilon >= published - 0.01  # an upper bound never reports less than the reference
