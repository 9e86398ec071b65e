"""The engine's view of the accountant: epsilon after k noisy steps of the plan being trained.

The accounting itself lives in ``service.privacy`` (shared with the API's noise solver); this
module only turns a plan into ``epsilon_fn(steps)``. It never clamps the step count: asking for
more steps than planned is an error upstream, and the trainer never takes them (PRIVACY.md 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import PrivacyArguments, _as_dict
from .errors import EngineError

EpsilonFn = Callable[[int], float]


def epsilon_fn_for(privacy: PrivacyArguments, *, plan: Any = None, num_units: int | None = None) -> EpsilonFn:
    """``EpsilonTracker.for_plan(plan).epsilon`` for the plan ``privacy`` was built from.

    When no plan object is at hand (a notebook passing ``PrivacyArguments`` alone), the plan is
    recomputed with ``plan_privacy`` from the mechanism itself, and checked to describe the same
    sampling probability and noise.
    """
    try:
        from service.privacy import EpsilonTracker, PrivacyPlan, plan_privacy
    except ImportError as error:  # pragma: no cover - depends on the deployment
        raise EngineError(f"service.privacy is not available for accounting: {error}") from error

    if plan is None:
        if num_units is None:
            raise EngineError("accounting needs the plan or the number of privacy units")
        batch_size = privacy.sampling_probability * num_units
        plan = plan_privacy(
            num_units=num_units,
            batch_size=round(batch_size),
            max_steps=privacy.steps,
            noise_multiplier=privacy.noise_multiplier,
            target_delta=privacy.delta,
            accountant=privacy.accountant,
        )
    elif not isinstance(plan, PrivacyPlan):
        plan = _plan_from_dict(PrivacyPlan, _as_dict(plan))
    _check_same_mechanism(privacy, plan)
    tracker = EpsilonTracker.for_plan(plan)
    return tracker.epsilon


def _plan_from_dict(plan_cls: Any, values: dict[str, Any]) -> Any:
    if hasattr(plan_cls, "model_validate"):
        return plan_cls.model_validate(values)
    if hasattr(plan_cls, "from_dict"):
        return plan_cls.from_dict(values)
    names = getattr(plan_cls, "__dataclass_fields__", None)
    return plan_cls(**({key: values[key] for key in names if key in values} if names else values))


def _check_same_mechanism(privacy: PrivacyArguments, plan: Any) -> None:
    """The accountant must describe the process the trainer runs (PRIVACY.md 1)."""
    planned = (float(plan.noise_multiplier), float(plan.sampling_probability), int(plan.steps))
    trained = (privacy.noise_multiplier, privacy.sampling_probability, privacy.steps)
    if abs(planned[0] - trained[0]) > 1e-12 * max(1.0, trained[0]) or abs(planned[1] - trained[1]) > 1e-12:
        raise EngineError(f"plan (noise, q, steps)={planned} differs from the trained mechanism {trained}")
    if planned[2] < trained[2]:
        raise EngineError(f"the plan covers {planned[2]} steps but {trained[2]} would be trained")
