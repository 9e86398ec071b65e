"""Poisson sampling of records and entities (PRIVACY.md 1, 2, 3, 5)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from worker.engine.randomness import SecureRandom, SeededRandom
from worker.engine.sampling import PoissonBatchSampler, group_records_by_entity

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("random", [SeededRandom(7), SecureRandom()], ids=["seeded", "secure"])
def test_each_record_is_included_independently_with_probability_q(random) -> None:
    units, q, draws = 200, 0.05, 4000
    sampler = PoissonBatchSampler([[i] for i in range(units)], q, random)
    counts = np.zeros(units)
    sizes = []
    for _ in range(draws):
        batch = sampler.sample()
        assert len(batch) == len(set(batch))
        counts[batch] += 1
        sizes.append(len(batch))
    # Per-record frequency: Binomial(draws, q); 5 standard deviations (200 records).
    std = math.sqrt(draws * q * (1 - q))
    assert np.all(np.abs(counts - draws * q) < 5 * std)
    # Batch sizes are Binomial(units, q): variable, sometimes empty at small q * units.
    sizes = np.array(sizes)
    assert sizes.mean() == pytest.approx(units * q, rel=0.03)
    assert sizes.var() == pytest.approx(units * q * (1 - q), rel=0.1)


def test_empty_batches_are_yielded_not_skipped() -> None:
    sampler = PoissonBatchSampler([[i] for i in range(10)], 0.02, SeededRandom(0), steps_per_epoch=500)
    batches = list(sampler)
    assert len(batches) == 500
    empty = sum(1 for batch in batches if not batch)
    assert empty == pytest.approx(500 * 0.98**10, rel=0.15)


def test_entities_are_sampled_with_probability_q_and_give_one_record_per_step() -> None:
    entity_of_record = [f"user{i % 40}" for i in range(400)]  # 40 entities of 10 records
    units = group_records_by_entity(entity_of_record)
    assert len(units) == 40
    q, draws = 0.1, 4000
    sampler = PoissonBatchSampler(units, q, SeededRandom(3))
    entity_counts: Counter[str] = Counter()
    record_counts: Counter[int] = Counter()
    for _ in range(draws):
        batch = sampler.sample()
        entities = [entity_of_record[i] for i in batch]
        assert len(entities) == len(set(entities)), "an entity contributed two records to one step"
        entity_counts.update(entities)
        record_counts.update(batch)
    std = math.sqrt(draws * q * (1 - q))
    assert all(abs(entity_counts[f"user{e}"] - draws * q) < 5 * std for e in range(40))
    # Within an entity the record is uniform: each record about draws * q / 10 times.
    per_record = np.array([record_counts[i] for i in range(400)])
    assert per_record.mean() == pytest.approx(draws * q / 10, rel=0.05)
    assert per_record.min() > 0


def test_seeded_sampler_state_round_trips() -> None:
    sampler = PoissonBatchSampler([[i] for i in range(50)], 0.2, SeededRandom(11))
    sampler.sample()
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(5)]
    other = PoissonBatchSampler([[i] for i in range(50)], 0.2, SeededRandom(999))
    other.load_state_dict(state)
    assert [other.sample() for _ in range(5)] == expected


def test_secure_uniforms_and_normals_have_the_right_distribution() -> None:
    from scipy import stats

    random = SecureRandom()
    uniforms = random.uniform(20000).numpy()
    assert uniforms.min() >= 0.0 and uniforms.max() < 1.0
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-4
    normals = random.normal(torch.Size([20000]), 3.0, torch.float64, torch.device("cpu")).numpy()
    assert stats.kstest(normals, "norm", args=(0.0, 3.0)).pvalue > 1e-4


def test_entity_level_training_samples_entities_not_records(tmp_path, record_batches) -> None:
    from worker.engine import Hyperparameters, PrivacyArguments, TrainingConfig
    from worker.engine.run import build_trainer

    records = [{"text": f"message {i} from user {i % 5}", "user": f"u{i % 5}"} for i in range(40)]
    config = TrainingConfig(
        base_model="dpft/tiny-gpt2",
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=1.0,
            sampling_probability=0.6,
            steps=6,
            delta=1e-3,
            unit="entity",
            entity_column="user",
        ),
        hyperparameters=Hyperparameters(batch_size=3, max_seq_length=16),
    )
    trainer = build_trainer(config, records, tmp_path, epsilon_fn=float)
    assert len(trainer.units) == 5  # q and the expected batch are counted in entities
    assert trainer.expected_batch_size == 3
    batches = record_batches(trainer)
    trainer.train()
    assert trainer.noisy_steps == 6 and len(batches) == 6
    for batch in batches:
        users = [records[i]["user"] for i in batch]
        assert len(users) == len(set(users))
