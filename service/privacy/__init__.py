"""Privacy math shared by the API and the worker: accountants, the noise solver, spec validation.

Never imports torch (nor opacus): the API process runs without it.

Public interface:

* ``AccountantName`` -- ``Literal["prv", "rdp"]``
* ``default_delta(num_units)`` -- the default target delta, well below 1/N
* ``InfeasiblePrivacySpec`` -- ``ValueError`` with ``message`` and ``param``
* ``PrivacyPlan`` and ``plan_privacy(...)`` -- the noise solver
* ``EpsilonTracker`` -- epsilon after each step of a planned run (what the trainer records)
* ``compute_epsilon(...)`` -- one accountant upper bound
"""

from .accounting import AccountantName, EpsilonTracker, compute_epsilon
from .plan import InfeasiblePrivacySpec, PrivacyPlan, default_delta, plan_privacy
from .prv import PRVUnavailable
from .solver import SIGMA_MAX, SIGMA_MIN

__all__ = [
    "AccountantName",
    "EpsilonTracker",
    "InfeasiblePrivacySpec",
    "PRVUnavailable",
    "PrivacyPlan",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "compute_epsilon",
    "default_delta",
    "plan_privacy",
]
