"""Epsilon of DP-SGD by the PRV or RDP accountant, and the per-step tracker the trainer uses.

Both accountants return an UPPER bound on epsilon for the Poisson-subsampled Gaussian mechanism
composed ``steps`` times at the given ``delta``.

The PRV accountant's accuracy parameters are a deterministic function of
(noise_multiplier, sampling_probability, max_steps, delta) -- see :func:`prv_errors` -- so that the
service (which plans) and the worker (which tracks) compute bit-identical numbers from the plan's
fields alone.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np

from . import prv as _prv
from .rdp import EXTENDED_ORDERS, compute_rdp, eps_from_rdp, rdp_epsilon

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")

# eps_error of the PRV accountant relative to a reference epsilon (the RDP epsilon, which is
# 5-30% above the tight one). The PRV upper bound is estimate + eps_error, so this is the price in
# epsilon (and at most about the same fraction in noise) paid for a rigorous bound.
PRV_RELATIVE_EPS_ERROR = 0.004
PRV_MIN_EPS_ERROR = 1e-4
# delta_error as a fraction of delta (prv-accountant's find_noise_multiplier and Opacus use 1/1000).
PRV_RELATIVE_DELTA_ERROR = 1e-3

_INT_ORDERS = EXTENDED_ORDERS[np.equal(np.mod(EXTENDED_ORDERS, 1), 0)]


def reference_epsilon(noise_multiplier: float, sampling_probability: float, steps: int, delta: float) -> float:
    """RDP epsilon over the integer orders only (cheap, deterministic, an upper bound)."""
    rdp = compute_rdp(q=sampling_probability, noise_multiplier=noise_multiplier, steps=steps, orders=_INT_ORDERS)
    eps = eps_from_rdp(rdp, delta, _INT_ORDERS)
    eps = eps[np.isfinite(eps)]
    return float(eps.min()) if eps.size else math.inf


def prv_errors(noise_multiplier: float, sampling_probability: float, max_steps: int, delta: float,
               ) -> tuple[float, float]:
    """(eps_error, delta_error) the PRV accountant uses for these parameters."""
    ref = reference_epsilon(noise_multiplier, sampling_probability, max_steps, delta)
    if not math.isfinite(ref):
        raise _prv.PRVUnavailable("no finite reference epsilon")
    eps_error = max(PRV_RELATIVE_EPS_ERROR * ref, PRV_MIN_EPS_ERROR)
    return eps_error, PRV_RELATIVE_DELTA_ERROR * delta


@lru_cache(maxsize=2)
def prv_composer(noise_multiplier: float, sampling_probability: float, max_steps: int,
                 delta: float) -> _prv.PRVComposer:
    eps_error, delta_error = prv_errors(noise_multiplier, sampling_probability, max_steps, delta)
    return _prv.PRVComposer(noise_multiplier=noise_multiplier, sampling_probability=sampling_probability,
                            max_steps=max_steps, eps_error=eps_error, delta_error=delta_error)


def _prv_upper(composer: _prv.PRVComposer, steps: int, delta: float) -> float:
    _, _, upper = composer.epsilon_bounds(delta, steps)
    if not math.isfinite(upper):
        raise _prv.PRVUnavailable("the PRV accountant's epsilon overflowed (noise far too small)")
    return max(upper, 0.0)


def compute_epsilon(*, noise_multiplier: float, sampling_probability: float, steps: int, delta: float,
                    accountant: str = "prv", max_steps: int | None = None) -> float:
    """Upper bound on epsilon after ``steps`` noisy steps.

    ``max_steps`` (default ``steps``) is the horizon the PRV grid is built for; the value at
    ``steps`` equals ``EpsilonTracker(..., max_steps=max_steps).epsilon(steps)``. Raises
    :class:`service.privacy.prv.PRVUnavailable` when the PRV accountant cannot compute a bound
    (callers that want the RDP fallback use :func:`service.privacy.plan_privacy`).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use 'prv' or 'rdp'")
    steps = int(steps)
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if steps == 0 or sampling_probability == 0:
        return 0.0
    if accountant == "rdp":
        return rdp_epsilon(noise_multiplier=noise_multiplier, sampling_probability=sampling_probability,
                           steps=steps, delta=delta)
    horizon = steps if max_steps is None else int(max_steps)
    comp = prv_composer(float(noise_multiplier), float(sampling_probability), horizon, float(delta))
    return _prv_upper(comp, steps, float(delta))


class EpsilonTracker:
    """Epsilon (accountant upper bound) after each noisy step of a planned run.

    ``EpsilonTracker.for_plan(plan).epsilon(plan.steps) == plan.epsilon`` exactly: both come
    from the same deterministic computation.

    * PRV: one discretised PRV for the horizon ``max_steps``; the composed PMF at each step comes
      from one inverse FFT of the cached spectrum. Values are computed in vectorised chunks of
      steps and cached. Chunks end at ``max_steps``, ``max_steps - C``, ``max_steps - 2C``, ...;
      within a chunk the tracker reports ``min(U(s) for t <= s <= chunk end)``, which is still an
      upper bound (the true epsilon is non-decreasing in the number of steps) and non-decreasing
      within the chunk even if floating-point noise made ``U`` wobble.
    * RDP: closed form per order, vectorised.

    ``epsilon(t)`` raises ``ValueError`` for ``t > max_steps``: the trainer never goes beyond the
    plan (it stops before the step that would exceed the plan's epsilon). ``epsilon(0) == 0``.
    """

    CHUNK = 32

    def __init__(self, noise_multiplier: float, sampling_probability: float, delta: float,
                 accountant: str, max_steps: int) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; use 'prv' or 'rdp'")
        if int(max_steps) < 1:
            raise ValueError("max_steps must be >= 1")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_probability = float(sampling_probability)
        self.delta = float(delta)
        self.accountant = accountant
        self.max_steps = int(max_steps)
        self._cache = np.full(self.max_steps + 1, np.nan)
        self._cache[0] = 0.0
        self._composer: _prv.PRVComposer | None = None
        self._rdp_per_step: np.ndarray | None = None
        if accountant == "prv":
            self._composer = prv_composer(self.noise_multiplier, self.sampling_probability, self.max_steps,
                                          self.delta)
        else:
            self._rdp_per_step = compute_rdp(q=self.sampling_probability, noise_multiplier=self.noise_multiplier,
                                             steps=1, orders=EXTENDED_ORDERS)

    @classmethod
    def for_plan(cls, plan) -> EpsilonTracker:
        return cls(plan.noise_multiplier, plan.sampling_probability, plan.delta, plan.accountant, plan.steps)

    def _chunk_bounds(self, t: int) -> tuple[int, int]:
        c = self.CHUNK
        k = (self.max_steps - t) // c
        end = self.max_steps - k * c
        start = max(1, end - c + 1)
        return start, end

    def _fill(self, start: int, end: int) -> None:
        steps = np.arange(start, end + 1)
        if self.accountant == "rdp":
            eps = eps_from_rdp(steps[:, None] * self._rdp_per_step[None, :], self.delta, EXTENDED_ORDERS)
            eps = np.where(np.isnan(eps), np.inf, eps).min(axis=1)
            vals = np.maximum(eps, 0.0)
        else:
            vals = np.maximum(np.array(self._composer.upper_many(self.delta, steps)), 0.0)
            vals = np.minimum.accumulate(vals[::-1])[::-1]
        self._cache[start:end + 1] = vals

    def epsilon(self, steps: int) -> float:
        t = int(steps)
        if t < 0:
            raise ValueError("steps must be >= 0")
        if t > self.max_steps:
            raise ValueError(f"step {t} is beyond the planned {self.max_steps} steps")
        v = self._cache[t]
        if np.isnan(v) and t == self.max_steps:
            # the last step ends its own chunk: its value is the bound itself
            self._fill(t, t)
            v = self._cache[t]
        elif np.isnan(v):
            self._fill(*self._chunk_bounds(t))
            v = self._cache[t]
        return float(v)

    def bounds_at(self, steps) -> list[float]:
        """The accountant's upper bound at each of ``steps`` computed directly (no chunk minimum).

        Equal to :meth:`epsilon` at ``max_steps``; elsewhere at least :meth:`epsilon` (equal unless
        floating-point noise made the bound wobble). Used for the planned curve.
        """
        steps = [int(s) for s in steps]
        if any(s < 0 or s > self.max_steps for s in steps):
            raise ValueError(f"steps outside [0, {self.max_steps}]")
        if self.accountant == "rdp":
            return [self.epsilon(s) for s in steps]
        todo = sorted({s for s in steps if s > 0 and np.isnan(self._cache[s]) and s != self.max_steps})
        known = dict(zip(todo, (max(v, 0.0) for v in self._composer.upper_many(self.delta, todo)), strict=True))
        out = []
        for s in steps:
            if s == 0:
                out.append(0.0)
            elif s in known:
                out.append(known[s])
            elif s == self.max_steps:
                out.append(self.epsilon(s))
            else:  # cached chunk value: the chunk minimum, <= the bound; recompute the bound itself
                out.append(max(self._composer.upper_many(self.delta, [s])[0], 0.0))
        return out

    def epsilons(self, steps) -> list[float]:
        return [self.epsilon(int(s)) for s in steps]
