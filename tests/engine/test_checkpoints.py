"""Checkpoints and resume (PRIVACY.md 4, 14): a killed run resumes and ends like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worker.engine import EngineError, Hyperparameters, PrivacyArguments, StepReport, TrainingConfig, train
from worker.engine.trainer import DP_STATE_FILE, latest_checkpoint

pytestmark = pytest.mark.unit


class Killed(Exception):
    """Stands for the worker process dying in the middle of training."""


def _config() -> TrainingConfig:
    # secure_mode=False: seeded sampling and noise, so two runs can be compared exactly.
    return TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=1.0, sampling_probability=0.25, steps=10, delta=1e-3, secure_mode=False
        ),
        hyperparameters=Hyperparameters(
            batch_size=8,
            micro_batch_size=4,
            max_seq_length=16,
            learning_rate=1e-2,
            lr_scheduler_type="linear",
        ),
    )


def test_kill_between_checkpoints_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, lm_records, rdp_epsilon_fn
) -> None:
    records = lm_records(32)
    epsilon_fn = rdp_epsilon_fn(1.0, 0.25, 1e-3)

    straight: list[StepReport] = []
    reference = train(
        _config(),
        records,
        tmp_path / "straight",
        on_step=straight.append,
        epsilon_fn=epsilon_fn,
        checkpoint_every=4,
    )

    def die_at_step_6(report: StepReport) -> None:
        if report.step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(
            _config(),
            records,
            tmp_path / "run",
            on_step=die_at_step_6,
            epsilon_fn=epsilon_fn,
            checkpoint_every=4,
        )
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "checkpoint-4"

    resumed: list[StepReport] = []
    outcome = train(
        _config(),
        records,
        tmp_path / "run",
        on_step=resumed.append,
        epsilon_fn=epsilon_fn,
        checkpoint_every=4,
        resume_from=tmp_path / "run",
    )

    # The epsilon curve continues where the checkpoint left it: steps 5..10, not 1..6.
    assert [r.step for r in resumed] == list(range(5, 11))
    assert [r.epsilon for r in resumed] == [r.epsilon for r in straight[4:]]
    assert (outcome.steps, outcome.epsilon, outcome.stop_reason) == (
        reference.steps,
        reference.epsilon,
        "completed",
    )
    # Same sampler and noise stream, optimizer and scheduler: the same weights.
    assert [r.loss for r in resumed] == pytest.approx([r.loss for r in straight[4:]], rel=1e-5, nan_ok=True)
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")
    actual = load_file(outcome.adapter_dir / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_carry_the_step_count_and_refuse_another_mechanism(
    tmp_path: Path, lm_records, rdp_epsilon_fn
) -> None:
    train(_config(), lm_records(32), tmp_path, epsilon_fn=rdp_epsilon_fn(1.0, 0.25, 1e-3), checkpoint_every=4)
    final = latest_checkpoint(tmp_path)
    assert final is not None and final.name == "checkpoint-10"
    assert torch.load(final / DP_STATE_FILE, weights_only=True)["noisy_steps"] == 10

    other = _config()
    other.privacy.noise_multiplier = 0.5
    with pytest.raises(EngineError, match="different privacy mechanism"):
        train(other, lm_records(32), tmp_path / "again", epsilon_fn=float, resume_from=final)


def test_a_stop_can_checkpoint_where_it_stopped_and_resume_from_there(tmp_path: Path, lm_records) -> None:
    reports: list[StepReport] = []
    stopped = train(
        _config(),
        lm_records(32),
        tmp_path,
        on_step=reports.append,
        should_stop=lambda: len(reports) >= 3,
        epsilon_fn=float,
        checkpoint_every=50,
        checkpoint_on_stop=True,
    )
    assert (stopped.steps, stopped.stop_reason) == (3, "cancelled")
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    resumed: list[StepReport] = []
    outcome = train(_config(), lm_records(32), tmp_path, on_step=resumed.append, epsilon_fn=float, resume_from=tmp_path)
    assert [r.step for r in resumed] == list(range(4, 11)) and outcome.steps == 10


def test_resuming_a_finished_run_takes_no_step_and_keeps_its_weights(tmp_path: Path, lm_records) -> None:
    first = train(_config(), lm_records(32), tmp_path, epsilon_fn=float, checkpoint_every=4)
    expected = load_file(first.adapter_dir / "adapter_model.safetensors")
    reports: list[StepReport] = []
    again = train(_config(), lm_records(32), tmp_path, on_step=reports.append, epsilon_fn=float, resume_from=tmp_path)
    assert (again.steps, again.stop_reason, reports) == (10, "completed", [])
    actual = load_file(again.adapter_dir / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_a_target_below_the_first_step_trains_nothing(tmp_path: Path, lm_records) -> None:
    config = _config()
    config.privacy.target_epsilon = 0.5
    outcome = train(config, lm_records(32), tmp_path, epsilon_fn=lambda steps: float(steps))
    assert (outcome.steps, outcome.epsilon, outcome.stop_reason) == (0, 0.0, "epsilon_budget")
