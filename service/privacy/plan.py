"""The noise solver: validate a DP-SGD privacy spec and plan it.

``plan_privacy`` is what ``POST /v1/privacy/plan`` and ``POST /v1/jobs`` call (in the API process,
without torch) and what the worker calls to plan the run it trains, so that both see the same
numbers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np

from . import prv as _prv
from .accounting import ACCOUNTANTS, EpsilonTracker, compute_epsilon, prv_composer
from .solver import SIGMA_MAX, SIGMA_MIN, solve_prv, solve_rdp

# Largest number of noisy steps a plan may have.
MAX_STEPS = 10_000_000
# Largest sampling probability batch_size / num_units a plan accepts: above it Poisson subsampling
# hardly amplifies privacy and the PRV/RDP computations become ill-conditioned.
MAX_SAMPLING_PROBABILITY = 0.5
# Number of points of the planned epsilon curve (at most; fewer for short runs).
CURVE_POINTS = 20


class InfeasiblePrivacySpec(ValueError):
    """A privacy spec that cannot be planned. ``message`` says what to change, ``param`` which field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"InfeasiblePrivacySpec({self.message!r}, param={self.param!r})"


def default_delta(num_units: int) -> float:
    """Default target delta for a dataset of ``num_units`` privacy units.

    ``min(1e-5, 1 / (N * ln N))`` (for N >= 3; 1e-5 below that). Why: delta is roughly the
    probability that the guarantee fails outright, and a mechanism that publishes one random unit
    in the clear is (0, 1/N)-DP, so delta must be well below 1/N. With 1/(N ln N) the expected
    number of units whose privacy fails, N * delta = 1/ln N, goes to zero as the dataset grows,
    while the 1e-5 cap keeps the conventional value for small and medium datasets (it is below
    1/(N ln N) up to about N = 10^4 and far below 1/N for any N < 10^5).
    """
    n = int(num_units)
    if n < 1:
        raise InfeasiblePrivacySpec("num_units must be a positive integer", "num_units")
    if n < 3:
        return 1e-5
    return min(1e-5, 1.0 / (n * math.log(n)))


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sampling_probability: float
    steps: int
    epsilon: float  # accountant upper bound after ``steps`` steps
    delta: float
    accountant: str  # the accountant actually used
    requested_accountant: str
    fell_back: bool
    target_epsilon: float | None
    num_units: int
    batch_size: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    fallback_reason: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curve"] = [[int(s), float(e)] for s, e in self.curve]
        return d

    def tracker(self) -> EpsilonTracker:
        return EpsilonTracker.for_plan(self)


# --- validation ----------------------------------------------------------------------------------

def _require_int(value, name: str, minimum: int = 1) -> int:
    if value is None:
        raise InfeasiblePrivacySpec(f"{name} is required", name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InfeasiblePrivacySpec(f"{name} must be an integer, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InfeasiblePrivacySpec(f"{name} must be a finite number, got {value!r}", name)
    if int(value) != value:
        raise InfeasiblePrivacySpec(f"{name} must be a whole number, got {value!r}", name)
    value = int(value)
    if value < minimum:
        raise InfeasiblePrivacySpec(f"{name} must be at least {minimum}, got {value}", name)
    return value


def _require_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InfeasiblePrivacySpec(f"{name} must be a number, got {value!r}", name)
    value = float(value)
    if not math.isfinite(value):
        raise InfeasiblePrivacySpec(f"{name} must be a finite number, got {value!r}", name)
    if value <= 0:
        raise InfeasiblePrivacySpec(f"{name} must be positive, got {value!r}", name)
    return value


def _steps_for_epochs(epochs: float, num_units: int, batch_size: int) -> int:
    # ceil(epochs / q) in exact arithmetic: epochs as written in decimal, q = batch/num_units
    frac = Fraction(repr(float(epochs))) * num_units / batch_size
    return math.ceil(frac)


def _curve_steps(steps: int, points: int = CURVE_POINTS) -> list[int]:
    if points <= 1:
        return [steps]
    if steps <= points:
        return list(range(1, steps + 1))
    xs = np.unique(np.round(np.linspace(steps / points, steps, points)).astype(int))
    xs = [int(x) for x in xs if 1 <= x <= steps]
    if xs[-1] != steps:
        xs.append(steps)
    return xs


def plan_privacy(*, num_units: int, batch_size: int, epochs: float | None = None, max_steps: int | None = None,
                 target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 target_delta: float | None = None, accountant: str = "prv",
                 curve_points: int = CURVE_POINTS) -> PrivacyPlan:
    """Validate a DP-SGD privacy spec and solve it.

    * ``sampling_probability = batch_size / num_units`` (``batch_size`` is the expected Poisson
      batch, counted in privacy units);
    * ``steps = max_steps`` or ``ceil(epochs / sampling_probability)``;
    * with ``target_epsilon``: the smallest noise multiplier (to 0.1%) whose accountant upper bound
      after ``steps`` is at most the target -- never above it; noise multipliers below
      ``SIGMA_MIN`` are not planned (if even ``SIGMA_MIN`` meets the target it is returned, with
      its epsilon below the target); a target that needs more than ``SIGMA_MAX`` is refused;
    * with ``noise_multiplier``: the epsilon it gives;
    * ``curve`` holds the planned epsilon at up to ``curve_points`` step counts (evenly spaced,
      ending at ``steps``); each costs one accountant evaluation, so callers that only need the
      noise multiplier may pass a small number (the last point is always there).

    PRV is the default accountant; when PRV cannot be computed for the spec (grid too large,
    floating point precision exhausted at tiny delta, ...) the plan falls back to RDP -- looser,
    still a valid upper bound -- and says so (``fell_back=True``, ``fallback_reason``).
    Raises :class:`InfeasiblePrivacySpec` for bad or infeasible specs.
    """
    # -- fields
    if accountant not in ACCOUNTANTS:
        raise InfeasiblePrivacySpec(f"accountant must be 'prv' or 'rdp', got {accountant!r}", "accountant")
    num_units = _require_int(num_units, "num_units")
    batch_size = _require_int(batch_size, "batch_size")
    if batch_size > num_units:
        raise InfeasiblePrivacySpec(
            f"batch_size {batch_size} is larger than the dataset ({num_units} units); use a batch of at most "
            f"{num_units} (and at most half of it for subsampling to help privacy)", "batch_size")
    q = batch_size / num_units
    if q > MAX_SAMPLING_PROBABILITY:
        raise InfeasiblePrivacySpec(
            f"too few units for the batch: batch_size {batch_size} of {num_units} units samples each unit with "
            f"probability {q:.3g}, above the limit {MAX_SAMPLING_PROBABILITY}; use at most "
            f"{int(num_units * MAX_SAMPLING_PROBABILITY)} per batch or at least {2 * batch_size} units", "batch_size")

    if epochs is not None and max_steps is not None:
        raise InfeasiblePrivacySpec("give either epochs or max_steps, not both", "max_steps")
    if epochs is None and max_steps is None:
        raise InfeasiblePrivacySpec("the training length is missing: give epochs or max_steps", "epochs")
    if max_steps is not None:
        steps = _require_int(max_steps, "max_steps", minimum=0)
        if steps == 0:
            raise InfeasiblePrivacySpec("max_steps is zero: the plan must take at least one step", "max_steps")
        length_param = "max_steps"
    else:
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not math.isfinite(float(epochs)):
            raise InfeasiblePrivacySpec(f"epochs must be a finite number, got {epochs!r}", "epochs")
        if float(epochs) < 0:
            raise InfeasiblePrivacySpec(f"epochs must be positive, got {epochs!r}", "epochs")
        if float(epochs) == 0:
            raise InfeasiblePrivacySpec("epochs is zero: the plan must take at least one step", "epochs")
        steps = _steps_for_epochs(float(epochs), num_units, batch_size)
        length_param = "epochs"
    if steps > MAX_STEPS:
        raise InfeasiblePrivacySpec(
            f"{steps} steps is more than the limit of {MAX_STEPS}; train fewer epochs/steps or use a larger batch",
            length_param)

    if target_delta is None:
        delta = default_delta(num_units)
    else:
        delta = _require_positive(target_delta, "target_delta")
        if not delta < 1.0 / num_units:
            raise InfeasiblePrivacySpec(
                f"target_delta {delta:g} is not below 1/num_units = {1.0 / num_units:.3g}; use a delta well below "
                f"1/N, e.g. the default {default_delta(num_units):.3g}", "target_delta")

    if (target_epsilon is None) == (noise_multiplier is None):
        if target_epsilon is None:
            raise InfeasiblePrivacySpec("give target_epsilon (or a fixed noise_multiplier)", "target_epsilon")
        raise InfeasiblePrivacySpec("give either target_epsilon or noise_multiplier, not both", "noise_multiplier")

    if noise_multiplier is not None:
        sigma = _require_positive(noise_multiplier, "noise_multiplier")
        if sigma > SIGMA_MAX:
            raise InfeasiblePrivacySpec(
                f"noise_multiplier {sigma:g} exceeds the solver's limit of {SIGMA_MAX:g}; use at most {SIGMA_MAX:g}",
                "noise_multiplier")
        return _plan_for_sigma(sigma, q, steps, delta, accountant, None, num_units, batch_size,
                               curve_points=curve_points)

    target = _require_positive(target_epsilon, "target_epsilon")
    used, fell_back, reason = accountant, False, None
    sigma = None
    if accountant == "prv":
        try:
            sigma = solve_prv(target, q, steps, delta)
        except _prv.PRVUnavailable as exc:
            used, fell_back, reason = "rdp", True, f"PRV accountant unavailable for this spec: {exc}"
    if sigma is None:
        sigma = solve_rdp(target, q, steps, delta)
    if sigma is None or sigma > SIGMA_MAX:
        eps_at_max = compute_epsilon(noise_multiplier=SIGMA_MAX, sampling_probability=q, steps=steps, delta=delta,
                                     accountant="rdp")
        raise InfeasiblePrivacySpec(
            f"target_epsilon {target:g} is too small for {steps} steps at sampling probability {q:.3g}: the noise "
            f"multiplier would have to exceed the solver's limit of {SIGMA_MAX:g} (which gives epsilon about "
            f"{eps_at_max:.3g}); raise target_epsilon, train fewer steps, or use a smaller batch or more units",
            "target_epsilon")
    return _plan_for_sigma(sigma, q, steps, delta, used, target, num_units, batch_size, requested=accountant,
                           fell_back=fell_back, reason=reason, curve_points=curve_points)


def _plan_for_sigma(sigma: float, q: float, steps: int, delta: float, accountant: str, target: float | None,
                    num_units: int, batch_size: int, requested: str | None = None, fell_back: bool = False,
                    reason: str | None = None, curve_points: int = CURVE_POINTS) -> PrivacyPlan:
    requested = requested or accountant
    used = accountant
    curve_steps = _curve_steps(steps, max(int(curve_points), 1))
    result = None
    if used == "prv":
        try:
            tracker = EpsilonTracker(sigma, q, delta, "prv", steps)
            eps = tracker.epsilon(steps)
            # the curve's points are steps the tracker will also evaluate: if PRV cannot do them,
            # the run could not be tracked with PRV either
            result = eps, tracker.bounds_at(curve_steps)
        except _prv.PRVUnavailable as exc:
            used, fell_back, reason = "rdp", True, f"PRV accountant unavailable for this spec: {exc}"
    if result is None:
        tracker = EpsilonTracker(sigma, q, delta, "rdp", steps)
        eps = tracker.epsilon(steps)
        result = eps, tracker.bounds_at(curve_steps)
    eps, values = result
    if target is not None and eps > target:
        if used != accountant:  # fell back after solving with PRV: re-solve with RDP
            from .solver import solve_rdp

            sigma = solve_rdp(target, q, steps, delta)
            if sigma is None:
                raise InfeasiblePrivacySpec(
                    f"target_epsilon {target:g} is too small for {steps} steps at sampling probability {q:.3g}: "
                    f"the noise multiplier would have to exceed the solver's limit of {SIGMA_MAX:g}", "target_epsilon")
            tracker = EpsilonTracker(sigma, q, delta, "rdp", steps)
            eps = tracker.epsilon(steps)
            values = tracker.bounds_at(curve_steps)
        if eps > target:  # pragma: no cover - the solver guarantees this
            raise AssertionError(f"solver returned sigma={sigma} with epsilon {eps} above the target {target}")
    curve = list(zip(curve_steps, values, strict=True))
    curve[-1] = (steps, float(eps))
    return PrivacyPlan(noise_multiplier=float(sigma), sampling_probability=float(q), steps=int(steps),
                       epsilon=float(eps), delta=float(delta), accountant=used, requested_accountant=requested,
                       fell_back=fell_back, target_epsilon=target, num_units=int(num_units),
                       batch_size=int(batch_size), curve=curve, fallback_reason=reason)


__all__ = ["InfeasiblePrivacySpec", "PrivacyPlan", "default_delta", "plan_privacy", "SIGMA_MAX", "SIGMA_MIN",
           "MAX_STEPS", "MAX_SAMPLING_PROBABILITY", "prv_composer"]
