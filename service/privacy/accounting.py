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

    ``EpsilonTracker.for_plan(plan).epsilon(plan.steps) == plan.epsilon`` exactly: both are the
    accountant's bound U(T) from the same deterministic computation.

    * RDP: closed form per order (a minimum of increasing lines), vectorised per chunk.
    * PRV: U(t) is the PRV upper bound after t steps on the plan's grid (horizon ``max_steps``),
      computed in chunks of consecutive steps (about a millisecond each, see ``PRVComposer``). The
      discretised accountant wobbles slightly from step to step (about 1e-6 relative on 10^5-step
      runs, far below its eps_error), so for t < T the tracker reports
      ``R(t) = max(E(t), nextafter(R(t-1)))`` with ``E(t) = min(U(s), t <= s <= min(t+W, T))``:
      E(t) is an upper bound because the true epsilon is non-decreasing in t, so R(t) >= E(t) is one
      too, and R is strictly increasing. R is computed forward from step 1 and cached (a resumed run
      pays for the steps before its checkpoint once). At t = T the value is U(T) itself.

    ``epsilon(t)`` raises ``ValueError`` for ``t > max_steps``: the trainer never goes beyond the
    plan (it stops before the step that would exceed the plan's epsilon). ``epsilon(0) == 0``.
    """

    CHUNK = 64
    WINDOW = 64

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
        self._u = np.full(self.max_steps + 1, np.nan)  # the accountant's bound U(t)
        self._u[0] = 0.0
        self._r = np.full(self.max_steps + 1, np.nan)  # reported values (PRV)
        self._r[0] = 0.0
        self._r_upto = 0
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

    def _fill_u(self, start: int, end: int) -> None:
        """Compute U on [start, end] (only where unknown)."""
        end = min(end, self.max_steps)
        todo = [s for s in range(start, end + 1) if np.isnan(self._u[s])]
        if not todo:
            return
        steps = np.asarray(todo)
        if self.accountant == "rdp":
            eps = eps_from_rdp(steps[:, None] * self._rdp_per_step[None, :], self.delta, EXTENDED_ORDERS)
            vals = np.maximum(np.where(np.isnan(eps), np.inf, eps).min(axis=1), 0.0)
        else:
            vals = np.maximum(np.array(self._composer.upper_many(self.delta, todo)), 0.0)
        self._u[steps] = vals

    def _bound(self, t: int) -> float:
        if np.isnan(self._u[t]):
            if t == self.max_steps:
                self._fill_u(t, t)
            else:
                self._fill_u(t, t + self.CHUNK - 1)
        return float(self._u[t])

    def epsilon(self, steps: int) -> float:
        t = int(steps)
        if t < 0:
            raise ValueError("steps must be >= 0")
        if t > self.max_steps:
            raise ValueError(f"step {t} is beyond the planned {self.max_steps} steps")
        if t == 0:
            return 0.0
        if self.accountant == "rdp" or t == self.max_steps:
            return self._bound(t)
        while self._r_upto < t:
            s = self._r_upto + 1
            hi = min(s + self.WINDOW, self.max_steps)
            if np.isnan(self._u[hi]) or np.isnan(self._u[s]):
                self._fill_u(s, s + max(self.CHUNK, self.WINDOW) + self.WINDOW)
                if np.isnan(self._u[hi]):
                    self._bound(hi)
            e = float(np.min(self._u[s:hi + 1]))
            self._r[s] = max(e, float(np.nextafter(self._r[s - 1], np.inf)))
            self._r_upto = s
        return float(self._r[t])

    def bounds_at(self, steps) -> list[float]:
        """The accountant's bound U(s) at each of ``steps`` (used for the planned curve).

        Equal to :meth:`epsilon` at ``max_steps``; elsewhere :meth:`epsilon` reports the
        monotone R(s), which differs from U(s) only by the accountant's step-to-step wobble.
        """
        steps = [int(s) for s in steps]
        if any(s < 0 or s > self.max_steps for s in steps):
            raise ValueError(f"steps outside [0, {self.max_steps}]")
        if self.accountant == "rdp":
            return [self.epsilon(s) for s in steps]
        todo = sorted({s for s in steps if 0 < s < self.max_steps and np.isnan(self._u[s])})
        if todo:
            self._u[np.asarray(todo)] = np.maximum(np.array(self._composer.upper_many(self.delta, todo)), 0.0)
        return [0.0 if s == 0 else self._bound(s) for s in steps]

    def epsilons(self, steps) -> list[float]:
        return [self.epsilon(int(s)) for s in steps]
