"""DP-SGD's mechanism checked against its definition (PRIVACY.md 3, 6, 7, 9, 10, 15).

Per-example gradients are recomputed here independently: one forward and backward pass per
example, on an unpadded copy of the model taken before any Opacus hook was attached, with the
loss written out from its definition. The trainer's noisy gradient must equal
``(sum_i min(1, C / |g_i|) g_i + N(0, (sigma C)^2)) / B_expected``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

from worker.engine import Hyperparameters, PrivacyArguments, TrainingConfig
from worker.engine.run import build_trainer

pytestmark = pytest.mark.unit

EXPECTED_BATCH = 8.0


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _trainer(
    tmp_path: Path,
    records,
    *,
    noise: float,
    clip: float,
    micro: int = 16,
    lora: bool = True,
    mode: str = "hooks",
    clipping: str = "flat",
):
    config = TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=noise,
            sampling_probability=0.25,
            steps=100,
            delta=1e-3,
            max_grad_norm=clip,
            expected_batch_size=EXPECTED_BATCH,
            grad_sample_mode=mode,
            clipping=clipping,
        ),
        hyperparameters=Hyperparameters(batch_size=8, micro_batch_size=micro, max_seq_length=24),
    )
    if not lora:
        config.lora = None
    trainer = build_trainer(config, records, tmp_path, epsilon_fn=lambda steps: float(steps))
    _no_dropout(trainer.model)
    reference = copy.deepcopy(trainer.model)  # before hooks exist
    trainer.create_optimizer()
    return trainer, reference


def _norm(gradient: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in gradient.values()))


def _noisy_gradient(trainer, indices: list[int]) -> dict[str, torch.Tensor]:
    """One training_step plus the optimizer's clip/noise/scale, as the Trainer's loop runs them."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    trainer.training_step(trainer.model, batch)
    optimizer = trainer.dp_optimizer
    assert optimizer.pre_step()
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    return {names[id(p)]: p.grad.detach().clone() for p in optimizer.params}


@pytest.fixture
def varied_records() -> list[dict[str, str]]:
    """Different lengths, so that batches are padded and per-example norms differ."""
    texts = [
        "hi",
        "the customer called on Monday about the invoice",
        "please reset your password using the link we sent to your email address today",
        "ok thanks",
        "the train was delayed by forty minutes",
        "a small dog was found near the park wearing a red collar and a bell",
    ]
    return [{"text": text} for text in texts]


def test_per_example_gradients_match_single_example_backward_passes(
    tmp_path, varied_records, independent_gradient
) -> None:
    trainer, reference = _trainer(tmp_path, varied_records, noise=0.0, clip=1e6)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    trainer.training_step(trainer.model, batch)
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    for i in range(6):
        expected = independent_gradient(reference, trainer.train_dataset[i])
        for p in trainer.dp_optimizer.params:
            torch.testing.assert_close(p.grad_sample[i], expected[names[id(p)]], rtol=1e-4, atol=1e-6)


def test_each_clipped_gradient_is_at_most_the_bound_and_unchanged_below_it(
    tmp_path, varied_records, independent_gradient
) -> None:
    trainer, reference = _trainer(tmp_path, varied_records, noise=0.0, clip=1.0)
    norms = [_norm(independent_gradient(reference, example)) for example in trainer.train_dataset]
    clip = sorted(norms)[len(norms) // 2]  # half the examples are clipped, half are not
    trainer.dp_optimizer.max_grad_norm = clip
    trainer.dp_optimizer.expected_batch_size = 1
    for i, unclipped in enumerate(norms):
        trainer.dp_optimizer.zero_grad(set_to_none=True)
        clipped = _norm(_noisy_gradient(trainer, [i]))
        assert clipped <= clip * (1 + 1e-5)
        assert clipped == pytest.approx(min(unclipped, clip), rel=1e-4)


@pytest.mark.parametrize(("mode", "micro"), [("hooks", 6), ("hooks", 2), ("hooks", 1), ("ghost", 6), ("ghost", 2)])
def test_noiseless_step_is_the_sum_of_clipped_gradients_over_the_expected_batch(
    tmp_path, varied_records, mode, micro, independent_gradient
) -> None:
    """Padding, micro-batching, the actual batch size and the clipping engine change nothing
    (PRIVACY.md 6, 7)."""
    trainer, reference = _trainer(tmp_path, varied_records, noise=0.0, clip=1.0, micro=micro, mode=mode)
    singles = [independent_gradient(reference, example) for example in trainer.train_dataset]
    clip = sorted(_norm(g) for g in singles)[3]
    trainer.dp_optimizer.max_grad_norm = clip
    if mode == "ghost":
        trainer.grad_sample_module.max_grad_norm = clip
    expected = {name: sum(min(1.0, clip / _norm(g)) * g[name] for g in singles) / EXPECTED_BATCH for name in singles[0]}
    actual = _noisy_gradient(trainer, list(range(6)))
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_is_gaussian_with_std_noise_multiplier_times_clip_on_the_sum(tmp_path, varied_records, mode) -> None:
    noise, clip = 2.0, 0.5
    trainer, _ = _trainer(tmp_path, varied_records, noise=0.0, clip=clip, mode=mode)
    deterministic = _noisy_gradient(trainer, [0, 1, 2])
    trainer.dp_optimizer.noise_multiplier = noise
    samples = []
    for _ in range(3):
        trainer.dp_optimizer.zero_grad(set_to_none=True)
        noisy = _noisy_gradient(trainer, [0, 1, 2])
        samples += [((noisy[name] - deterministic[name]) * EXPECTED_BATCH).flatten() for name in noisy]
    values = torch.cat(samples).double().numpy()
    assert values.size > 10_000
    # The std of n Gaussian samples has relative standard error 1 / sqrt(2 n) (< 0.7% here).
    assert values.std() == pytest.approx(noise * clip, rel=0.03)
    assert abs(values.mean()) < 5 * noise * clip / math.sqrt(values.size)
    assert stats.kstest(values, "norm", args=(0.0, noise * clip)).pvalue > 1e-4


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_batch_takes_a_noise_only_step_and_is_counted(tmp_path, varied_records, mode) -> None:
    trainer, _ = _trainer(tmp_path, varied_records, noise=1.0, clip=1.0, mode=mode)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    empty = trainer.data_collator([])
    assert empty["input_ids"].shape[0] == 0
    trainer.training_step(trainer.model, empty)
    trainer.optimizer.step()
    assert trainer.noisy_steps == 1
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all("lora_" in name for name in changed)


def test_production_noise_source_is_secure_by_default(tmp_path, varied_records) -> None:
    trainer, _ = _trainer(tmp_path, varied_records, noise=1.0, clip=1.0)
    assert trainer.privacy_args.secure_mode is True
    assert trainer.noise_random.is_secure and trainer.sampler_random.is_secure


def test_per_layer_clipping_bounds_each_tensor_by_clip_over_sqrt_k(tmp_path, varied_records, independent_gradient):
    trainer, reference = _trainer(tmp_path, varied_records, noise=0.0, clip=0.05, clipping="per_layer")
    singles = [independent_gradient(reference, example) for example in trainer.train_dataset]
    bound = 0.05 / math.sqrt(len(singles[0]))
    assert trainer.dp_optimizer.max_grad_norm == pytest.approx(0.05)  # the noise's sensitivity
    expected = {
        name: sum(min(1.0, bound / max(float(g[name].norm()), 1e-12)) * g[name] for g in singles) / EXPECTED_BATCH
        for name in singles[0]
    }
    clipped = sum(1 for g in singles for name in g if float(g[name].norm()) > bound)
    assert 0 < clipped < len(singles) * len(singles[0])  # some tensors clipped, some not
    actual = _noisy_gradient(trainer, list(range(6)))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-8)


def test_ghost_clipping_refuses_tied_parameters(tmp_path, varied_records) -> None:
    from worker.engine import EngineError

    with pytest.raises(EngineError, match="ghost"):
        _trainer(tmp_path, varied_records, noise=1.0, clip=1.0, mode="ghost", lora=False)
