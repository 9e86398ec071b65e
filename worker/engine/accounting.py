"""The engine's view of the accountant: epsilon after k noisy steps of the mechanism being trained.

The accounting lives in ``service.privacy`` (shared with the API's noise solver). The tracker is
built from the mechanism the trainer actually runs (noise multiplier, sampling probability,
delta, accountant, planned steps), which ``PrivacyArguments.from_plan`` copies from the plan, so
the accountant describes the process that happens (PRIVACY.md 1). It never clamps the step
count: the tracker refuses steps beyond the plan and the trainer never takes them (PRIVACY.md 4).
"""

from __future__ import annotations

from collections.abc import Callable

from .config import PrivacyArguments

EpsilonFn = Callable[[int], float]


def epsilon_fn_for(privacy: PrivacyArguments) -> EpsilonFn:
    """``epsilon(steps)``: the accountant's upper bound after ``steps`` noisy steps."""
    from service.privacy import EpsilonTracker

    tracker = EpsilonTracker(
        privacy.noise_multiplier,
        privacy.sampling_probability,
        privacy.delta,
        privacy.accountant,
        privacy.steps,
    )
    return tracker.epsilon
