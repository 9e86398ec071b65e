"""Data-parallel DP-SGD with 2 processes on the CPU (torchrun, gloo).

Run as a script, this file is the worker that torchrun starts; as a test module it launches it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOISE, CLIP, EXPECTED_BATCH = 1.0, 0.5, 4.0


def _config(sampling_probability: float, steps: int):
    from worker.engine import Hyperparameters, PrivacyArguments, TrainingConfig

    return TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=NOISE,
            sampling_probability=sampling_probability,
            steps=steps,
            delta=1e-3,
            max_grad_norm=CLIP,
            expected_batch_size=EXPECTED_BATCH,
        ),
        hyperparameters=Hyperparameters(batch_size=4, max_seq_length=16),
    )


def _records() -> list[dict[str, str]]:
    return [{"text": f"record {i}: the customer called about invoice {i * 7}."} for i in range(40)]


def _worker(output: Path, case: str) -> None:
    """One torchrun process: train, and save what the test compares."""
    from transformers import TrainerCallback

    from worker.engine.run import build_trainer

    torch.set_num_threads(1)
    config = _config(1e-9, 2) if case == "noise" else _config(0.1, 4)
    trainer = build_trainer(config, _records(), output / "run")  # the service's accountant
    gradients: list[torch.Tensor] = []

    class Capture(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            gradients.append(torch.cat([p.grad.reshape(-1) for p in trainer.dp_optimizer.params]).clone())

    trainer.add_callback(Capture())
    trainer.train()
    weights = torch.cat([p.detach().reshape(-1) for p in trainer.dp_optimizer.params])
    torch.save(
        {
            "gradients": gradients,
            "weights": weights,
            "noisy_steps": trainer.noisy_steps,
            "epsilon": trainer.epsilon_after(trainer.noisy_steps),
            "world": trainer.world_size,
        },
        output / f"rank{trainer.rank}.pt",
    )
    # gloo's threads can abort the process during interpreter teardown ("terminate called without
    # an active exception", SIGABRT, about 1 run in 12 here even after destroy_process_group), and
    # torchrun then fails the run: end the process once everything is saved, without the teardown.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(tmp_path: Path, case: str) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        __file__, str(tmp_path), case,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]


def test_noise_is_added_once_per_logical_step_not_once_per_process(tmp_path: Path) -> None:
    ranks = _launch(tmp_path, "noise")
    assert all(rank["world"] == 2 and rank["noisy_steps"] == 2 for rank in ranks)
    for step in range(2):
        torch.testing.assert_close(ranks[0]["gradients"][step], ranks[1]["gradients"][step])
    # Empty batches everywhere: the all-reduced gradient is the noise alone, over the expected batch.
    noise = torch.cat(ranks[0]["gradients"]).double() * EXPECTED_BATCH
    assert noise.numel() > 5000
    # Once: std = sigma * C. Twice (one draw per process) would give sqrt(2) * sigma * C.
    assert float(noise.std()) == pytest.approx(NOISE * CLIP, rel=0.05)


def test_two_processes_train_one_model_with_the_single_process_epsilon(tmp_path: Path) -> None:
    ranks = _launch(tmp_path, "train")
    assert [rank["noisy_steps"] for rank in ranks] == [4, 4]
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"])
    from worker.engine.run import build_trainer

    single = build_trainer(_config(0.1, 4), _records(), tmp_path / "single")
    single.train()
    assert single.noisy_steps == 4
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] == single.epsilon_after(single.noisy_steps)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
