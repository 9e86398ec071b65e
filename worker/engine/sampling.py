"""Poisson sampling of privacy units (PRIVACY.md 1, 2, 3, 5).

Every logical (noisy) step includes each unit independently with probability ``q``, the
probability the accountant was told, so batch sizes vary and may be zero. A unit is a record
(record-level DP) or an entity (entity-level DP). For entities, a sampled entity contributes
exactly one of its records, chosen uniformly at random, so one entity changes at most one
clipped per-sample gradient in any step: the sensitivity the accountant assumes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from .errors import EngineError
from .randomness import RandomSource


def group_records_by_entity(entity_ids: Sequence[Hashable]) -> list[list[int]]:
    """Record indices of each entity, entities in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for index, entity in enumerate(entity_ids):
        if entity is None:
            raise EngineError(f"record {index} has no entity id; entity-level DP needs one on every record")
        groups.setdefault(entity, []).append(index)
    return list(groups.values())


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields one logical batch (a list of record indices) per noisy step.

    ``units`` lists, for each privacy unit, the record indices it owns (one index per unit for
    record-level DP). ``steps_per_epoch`` only sets ``len()``, which the Trainer uses to count
    epochs; each yielded batch is an independent Poisson sample, whatever the epoch.
    """

    def __init__(
        self,
        units: Sequence[Sequence[int]],
        sampling_probability: float,
        random: RandomSource,
        steps_per_epoch: int | None = None,
    ) -> None:
        if not 0.0 < sampling_probability <= 1.0:
            raise EngineError(f"sampling probability must be in (0, 1], got {sampling_probability}")
        if not units or any(len(records) == 0 for records in units):
            raise EngineError("every privacy unit needs at least one record")
        self.units = [list(records) for records in units]
        self.sampling_probability = sampling_probability
        self.random = random
        self.steps_per_epoch = steps_per_epoch or max(1, round(1.0 / sampling_probability))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def sample(self) -> list[int]:
        """One Poisson sample: each unit independently with probability q, one record per unit."""
        included = torch.nonzero(self.random.uniform(len(self.units)) < self.sampling_probability).flatten()
        batch: list[int] = []
        for unit in included.tolist():
            records = self.units[unit]
            if len(records) == 1:
                batch.append(records[0])
            else:
                pick = min(int(self.random.uniform(1).item() * len(records)), len(records) - 1)
                batch.append(records[pick])
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.random.load_state_dict(state.get("random", {}))
