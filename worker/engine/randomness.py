"""Where DP-SGD's randomness comes from: Poisson sampling and Gaussian noise (PRIVACY.md 10).

Two sources, one interface:

* ``SecureRandom`` (production): every random bit comes from ``os.urandom``, the operating
  system's cryptographically secure generator. Sampler uniforms are built from 53 random bits,
  noise normals by the Box-Muller transform on 24-bit float32 uniforms, and each noise value
  is the sum of four normals halved (the same
  defence as Opacus' ``secure_mode`` against floating-point attacks on Gaussian samplers,
  arXiv:2107.10138 section 5.1). Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no
  build for current torch; reseeding a ``torch.Generator`` from ``secrets`` each step would not
  do either, since Mersenne Twister's state follows from 624 consecutive 32-bit outputs.
  Cost measured on the 2-core CI machine: 130 k noise values (a full fine-tuning step of a
  tiny preset) in about 12 ms; for large models on a GPU this source would dominate the step.
  Its state cannot be saved, which is the point: a resumed run draws fresh randomness, which the
  analysis allows (each step's randomness is independent).
* ``SeededRandom`` (tests only): a seeded ``torch.Generator``, reproducible and checkpointable.
  Training with it is not private; a run must ask for it explicitly (``secure_mode=False``) and
  the outcome records it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np
import torch


class RandomSource(Protocol):
    """Uniforms for the sampler and Gaussian noise for the optimizer."""

    #: Human-readable name recorded in the outcome and the privacy report.
    description: str
    #: True only for a cryptographically secure source.
    is_secure: bool

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` independent uniforms in [0, 1) as float64."""

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of independent N(0, std^2) values."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must save to continue the same stream (empty when it cannot)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict``."""


class SecureRandom:
    """Cryptographically secure randomness from ``os.urandom``."""

    description = "os.urandom (cryptographically secure)"
    is_secure = True

    def uniform(self, count: int) -> torch.Tensor:
        raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        # The top 53 bits make every double in {k / 2^53} equally likely.
        return torch.from_numpy((raw >> np.uint64(11)).astype(np.float64) * (2.0**-53))

    def _uniform24(self, count: int) -> torch.Tensor:
        """``count`` float32 uniforms in [0, 1) from 24 random bits each (float32's precision)."""
        raw = np.frombuffer(os.urandom(4 * count), dtype=np.uint32)
        return torch.from_numpy((raw >> np.uint32(8)).astype(np.float32)) * (2.0**-24)

    def _standard_normal(self, count: int) -> torch.Tensor:
        """``count`` N(0, 1) float32 values by Box-Muller, from one ``os.urandom`` call.

        float32 like the gradients they are added to (and like Opacus' secure mode); float64
        math tripled the cost of a full fine-tuning step on the presets for no gain.
        """
        pairs = (count + 1) // 2
        uniforms = self._uniform24(2 * pairs)
        u1 = 1.0 - uniforms[:pairs]  # in (0, 1]: the logarithm is finite
        angle = (2.0 * math.pi) * uniforms[pairs:]
        radius = torch.sqrt(-2.0 * torch.log(u1))
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        # The sum of four N(0, 1) halved is N(0, 1) and defeats the floating-point attack.
        total = self._standard_normal(4 * count).view(4, count).sum(dim=0) / 2.0
        return (total * std).reshape(shape).to(device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class SeededRandom:
    """Reproducible randomness from a seeded ``torch.Generator``: NOT private, tests only."""

    description = "seeded torch.Generator (non-private test mode)"
    is_secure = False

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self.generator, dtype=torch.float64)

    def normal(self, shape: torch.Size, std: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        noise = torch.normal(0.0, std, size=tuple(shape), generator=self.generator, dtype=torch.float32)
        return noise.to(device=device, dtype=dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def make_random_source(*, secure_mode: bool, seed: int) -> RandomSource:
    """The production source unless the run is explicitly marked as a non-private test."""
    return SecureRandom() if secure_mode else SeededRandom(seed)
