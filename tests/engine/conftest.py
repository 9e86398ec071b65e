"""Shared fixtures of the engine tests: an isolated preset cache and a reference accountant."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from opacus.accountants import RDPAccountant


@pytest.fixture(autouse=True, scope="session")
def _preset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Presets are materialised into a per-session directory, never into the user's cache."""
    import os

    os.environ["DPFT_MODEL_CACHE"] = str(tmp_path_factory.mktemp("presets"))
    # Tiny models: one thread is faster, and much faster when another process holds a core.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _rdp_epsilon_fn(noise_multiplier: float, sampling_probability: float, delta: float) -> Callable[[int], float]:
    """Opacus' RDP accountant as an independent reference (not the code under test)."""

    def epsilon(steps: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(noise_multiplier, sampling_probability, steps)]
        return accountant.get_epsilon(delta)

    return epsilon


def _lm_records(count: int) -> list[dict[str, str]]:
    return [{"text": f"record {i}: the customer called about invoice {i * 7}."} for i in range(count)]


@pytest.fixture
def rdp_epsilon_fn() -> Callable[..., Callable[[int], float]]:
    """``rdp_epsilon_fn(noise, q, delta)(steps)``: Opacus' RDP epsilon, a reference accountant."""
    return _rdp_epsilon_fn


@pytest.fixture
def lm_records() -> Callable[[int], list[dict[str, str]]]:
    """``lm_records(n)``: n short distinct text records."""
    return _lm_records


def _independent_gradient(model, example, task: str = "causal_lm") -> dict:
    """Gradient of ONE example's loss, computed alone and unpadded, from the loss's definition.

    causal_lm: mean next-token cross-entropy; sequence_classification: cross-entropy of the
    example's label; token_classification: mean cross-entropy over tokens whose label is not -100.
    """
    import torch
    from torch import nn

    model.zero_grad(set_to_none=True)
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits
    if task == "causal_lm":
        loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    elif task == "sequence_classification":
        loss = nn.functional.cross_entropy(logits[0:1], torch.tensor([example.labels]))
    else:
        labels = torch.tensor(example.labels)
        keep = labels != -100
        loss = nn.functional.cross_entropy(logits[0][keep], labels[keep])
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def independent_gradient() -> Callable[..., dict]:
    """``independent_gradient(model, example, task)``: one example's gradient, by definition."""
    return _independent_gradient


def _record_batches(trainer) -> list[list[int]]:
    """Patch ``trainer`` so that every Poisson batch its sampler draws is appended to the result."""
    batches: list[list[int]] = []
    make_loader = trainer.get_train_dataloader

    def recording_loader():  # noqa: ANN202
        loader = make_loader()
        sampler = loader.batch_sampler
        original = sampler.sample

        def sample() -> list[int]:
            batches.append(original())
            return batches[-1]

        sampler.sample = sample
        return loader

    trainer.get_train_dataloader = recording_loader
    return batches


@pytest.fixture
def record_batches() -> Callable[..., list[list[int]]]:
    """``record_batches(trainer)``: the list the trainer's drawn Poisson batches will fill."""
    return _record_batches
