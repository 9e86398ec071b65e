"""The noise solver: safety, tightness, refusals, fallback, and the tracker agreeing with the plan."""

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import service.privacy as privacy
from service.privacy import (
    EpsilonTracker,
    InfeasiblePrivacySpec,
    PrivacyPlan,
    compute_epsilon,
    default_delta,
    plan_privacy,
)
from service.privacy import prv as prv_module

pytestmark = pytest.mark.unit


def _eps(sigma, plan):
    return compute_epsilon(noise_multiplier=sigma, sampling_probability=plan.sampling_probability,
                           steps=plan.steps, delta=plan.delta, accountant=plan.accountant)


def test_service_privacy_does_not_import_torch():
    code = "import sys, service.privacy as p; p.plan_privacy(num_units=1000, batch_size=10, max_steps=20, " \
           "target_epsilon=2.0); assert 'torch' not in sys.modules and 'opacus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_fields_and_dict():
    plan = plan_privacy(num_units=60_000, batch_size=256, epochs=3, target_epsilon=3.0)
    assert isinstance(plan, PrivacyPlan)
    assert plan.sampling_probability == 256 / 60_000
    assert plan.steps == math.ceil(3 * 60_000 / 256)
    assert plan.accountant == "prv" and plan.requested_accountant == "prv" and not plan.fell_back
    assert plan.delta == default_delta(60_000)
    assert plan.epsilon <= 3.0
    assert plan.target_epsilon == 3.0 and plan.num_units == 60_000 and plan.batch_size == 256
    assert 2 <= len(plan.curve) <= 200
    assert plan.curve[-1] == (plan.steps, plan.epsilon)
    steps = [s for s, _ in plan.curve]
    eps = [e for _, e in plan.curve]
    assert steps == sorted(set(steps)) and all(np.diff(eps) > 0)
    d = plan.to_dict()
    import json

    assert json.loads(json.dumps(d))["noise_multiplier"] == plan.noise_multiplier
    assert d["curve"][-1] == [plan.steps, plan.epsilon]


def test_epochs_to_steps_is_exact():
    plan = plan_privacy(num_units=500, batch_size=50, epochs=5, noise_multiplier=1.0, target_delta=1e-3)
    assert plan.steps == 50
    plan = plan_privacy(num_units=1000, batch_size=10, epochs=0.1, noise_multiplier=1.0)
    assert plan.steps == 10


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_solved_sigma_is_safe_and_tight(accountant):
    plan = plan_privacy(num_units=50_000, batch_size=500, epochs=4, target_epsilon=2.0, accountant=accountant)
    assert plan.accountant == accountant
    assert _eps(plan.noise_multiplier, plan) <= 2.0
    assert _eps(plan.noise_multiplier, plan) == plan.epsilon
    assert _eps(plan.noise_multiplier * 0.99, plan) > 2.0


def test_prv_needs_less_noise_than_rdp():
    kw = dict(num_units=50_000, batch_size=500, epochs=4, target_epsilon=2.0)
    prv = plan_privacy(**kw)
    rdp = plan_privacy(**kw, accountant="rdp")
    assert prv.noise_multiplier < rdp.noise_multiplier
    assert 0.85 < prv.noise_multiplier / rdp.noise_multiplier < 0.99


def test_tight_within_one_percent_of_tight_prv():
    # the tight threshold: smallest sigma whose PRV *estimate* (fine grid) is <= target
    target, q, steps, delta = 1.0, 0.01, 1000, 1e-5
    plan = plan_privacy(num_units=10_000, batch_size=100, max_steps=steps, target_epsilon=target,
                        target_delta=delta)

    def est(sigma):
        comp = prv_module.PRVComposer(noise_multiplier=sigma, sampling_probability=q, max_steps=steps,
                                      eps_error=0.002, delta_error=delta / 1000)
        return comp.epsilon_bounds(delta, steps)[1]

    from scipy.optimize import brentq

    tight = brentq(lambda s: est(s) - target, 0.5 * plan.noise_multiplier, plan.noise_multiplier, xtol=1e-4)
    assert tight <= plan.noise_multiplier <= 1.01 * tight


def test_tiny_noise_multiplier_falls_back_to_a_finite_rdp_epsilon():
    plan = plan_privacy(num_units=1000, batch_size=10, max_steps=100, noise_multiplier=0.05)
    assert plan.fell_back and plan.accountant == "rdp"
    assert math.isfinite(plan.epsilon) and plan.epsilon > 100


def test_noise_multiplier_reports_epsilon():
    plan = plan_privacy(num_units=60_000, batch_size=256, epochs=2, noise_multiplier=1.1)
    assert plan.target_epsilon is None and plan.noise_multiplier == 1.1
    assert plan.epsilon == _eps(1.1, plan)


def test_q_point_one_case_is_planned_with_prv():
    # prv-accountant 0.2.0 cannot compute this spec (the reference trainers fall back to RDP);
    # dpft's PRV accountant can, so no fallback is needed.
    plan = plan_privacy(num_units=500, batch_size=50, epochs=5, target_epsilon=10, target_delta=1e-3)
    assert plan.sampling_probability == 0.1 and plan.steps == 50
    assert plan.accountant == "prv" and not plan.fell_back
    assert plan.epsilon <= 10
    dpsgd = pytest.importorskip("prv_accountant.dpsgd")
    with pytest.raises(RuntimeError, match="Discrete mean differs"):
        dpsgd.find_noise_multiplier(sampling_probability=0.1, num_steps=50, target_epsilon=10, target_delta=1e-3,
                                    eps_error=0.01)


def test_fallback_to_rdp_when_prv_cannot_be_computed(monkeypatch):
    monkeypatch.setattr(prv_module, "MAX_GRID", 1000)
    privacy.accounting.prv_composer.cache_clear()
    try:
        plan = plan_privacy(num_units=500, batch_size=50, epochs=5, target_epsilon=10, target_delta=1e-3)
    finally:
        privacy.accounting.prv_composer.cache_clear()
    assert plan.requested_accountant == "prv" and plan.accountant == "rdp" and plan.fell_back
    assert "PRV" in plan.fallback_reason
    assert plan.epsilon <= 10
    assert compute_epsilon(noise_multiplier=plan.noise_multiplier, sampling_probability=0.1, steps=50,
                           delta=1e-3, accountant="rdp") == plan.epsilon
    tracker = EpsilonTracker.for_plan(plan)
    assert tracker.epsilon(plan.steps) == plan.epsilon


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_tracker_agrees_with_plan_and_increases(accountant):
    plan = plan_privacy(num_units=20_000, batch_size=200, max_steps=300, target_epsilon=1.5, accountant=accountant)
    tracker = EpsilonTracker(plan.noise_multiplier, plan.sampling_probability, plan.delta, plan.accountant,
                             plan.steps)
    eps = [tracker.epsilon(t) for t in range(0, plan.steps + 1)]
    assert eps[0] == 0.0
    assert eps[-1] == plan.epsilon
    assert all(np.diff(eps[1:]) > 0)
    # the planned curve is the same bound (up to float rounding: the tracker builds consecutive spectra by
    # multiplication, the curve by powers)
    for s, e in plan.curve:
        assert tracker.epsilon(s) == pytest.approx(e, rel=1e-6)
    with pytest.raises(ValueError):
        tracker.epsilon(plan.steps + 1)


def test_default_delta_is_well_below_one_over_n():
    for n in [1, 2, 3, 10, 100, 1000, 10**4, 10**5, 10**6, 10**7, 10**9]:
        d = default_delta(n)
        assert 0 < d < 1 / n
        if n >= 100:
            assert d <= 1 / (n * math.log(n)) + 1e-18 or d == 1e-5
    assert default_delta(10**6) < 1e-6 / 10


REFUSALS = [
    (dict(num_units=100, batch_size=200, epochs=1, target_epsilon=1.0), "batch_size", "larger than the dataset"),
    (dict(num_units=100, batch_size=60, epochs=1, target_epsilon=1.0), "batch_size", "too few units"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, target_delta=1e-3), "target_delta",
     "not below 1/num_units"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, target_delta=0.5), "target_delta",
     "not below 1/num_units"),
    (dict(num_units=10**6, batch_size=10**5, max_steps=100_000, target_epsilon=0.01), "target_epsilon",
     "too small for 100000 steps"),
    (dict(num_units=1000, batch_size=10, max_steps=0, target_epsilon=1.0), "max_steps", "zero"),
    (dict(num_units=1000, batch_size=10, epochs=0, target_epsilon=1.0), "epochs", "zero"),
    (dict(num_units=1000, batch_size=10, target_epsilon=1.0), "epochs", "missing"),
    (dict(num_units=1000, batch_size=10, epochs=1), "target_epsilon", "give target_epsilon"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, noise_multiplier=1.0), "noise_multiplier",
     "not both"),
    (dict(num_units=1000, batch_size=10, epochs=1, max_steps=5, target_epsilon=1.0), "max_steps", "not both"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=float("nan")), "target_epsilon", "finite"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=float("inf")), "target_epsilon", "finite"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=-1.0), "target_epsilon", "positive"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=0.0), "target_epsilon", "positive"),
    (dict(num_units=1000, batch_size=10, epochs=-2, target_epsilon=1.0), "epochs", "positive"),
    (dict(num_units=1000, batch_size=10, epochs=float("nan"), target_epsilon=1.0), "epochs", "finite"),
    (dict(num_units=1000, batch_size=10, epochs=1, noise_multiplier=-1.0), "noise_multiplier", "positive"),
    (dict(num_units=1000, batch_size=10, epochs=1, noise_multiplier=float("inf")), "noise_multiplier", "finite"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, target_delta=-1e-6), "target_delta",
     "positive"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, target_delta=float("nan")), "target_delta",
     "finite"),
    (dict(num_units=-5, batch_size=10, epochs=1, target_epsilon=1.0), "num_units", "at least 1"),
    (dict(num_units=0, batch_size=0, epochs=1, target_epsilon=1.0), "num_units", "at least 1"),
    (dict(num_units=None, batch_size=10, epochs=1, target_epsilon=1.0), "num_units", "required"),
    (dict(num_units=1000, batch_size=None, epochs=1, target_epsilon=1.0), "batch_size", "required"),
    (dict(num_units=1000, batch_size=2.5, epochs=1, target_epsilon=1.0), "batch_size", "whole number"),
    (dict(num_units=1000, batch_size=10, max_steps=-3, target_epsilon=1.0), "max_steps", "at least 0"),
    (dict(num_units=1000, batch_size=10, max_steps=10**8, target_epsilon=1.0), "max_steps", "more than the limit"),
    (dict(num_units=1000, batch_size=10, epochs=1, target_epsilon=1.0, accountant="gdp"), "accountant", "'prv'"),
    (dict(num_units="many", batch_size=10, epochs=1, target_epsilon=1.0), "num_units", "integer"),
    (dict(num_units=1000, batch_size=10, epochs=1, noise_multiplier=500.0), "noise_multiplier", "solver's limit"),
]


@pytest.mark.parametrize("kwargs,param,text", REFUSALS)
def test_refusals(kwargs, param, text):
    with pytest.raises(InfeasiblePrivacySpec) as info:
        plan_privacy(**kwargs)
    assert info.value.param == param
    assert text in info.value.message
    assert str(info.value) == info.value.message
    assert isinstance(info.value, ValueError)


def test_limit_message_names_the_fix():
    with pytest.raises(InfeasiblePrivacySpec) as info:
        plan_privacy(num_units=10**6, batch_size=10**5, max_steps=100_000, target_epsilon=0.01)
    msg = info.value.message
    assert "solver's limit" in msg and "raise target_epsilon" in msg


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    log_n=st.floats(min_value=3, max_value=7),
    log_q=st.floats(min_value=-4, max_value=math.log10(0.5)),
    log_steps=st.floats(min_value=1, max_value=4),
    log_eps=st.floats(min_value=-1, max_value=math.log10(50)),
)
def test_property_solved_sigma_meets_target_and_is_tight(log_n, log_q, log_steps, log_eps):
    n = int(10**log_n)
    batch = max(1, min(int(n * 10**log_q), n // 2))
    steps = int(10**log_steps)
    target = 10**log_eps
    try:
        plan = plan_privacy(num_units=n, batch_size=batch, max_steps=steps, target_epsilon=target)
    except InfeasiblePrivacySpec as exc:
        assert exc.param == "target_epsilon"
        return
    assert plan.epsilon <= target
    assert _eps(plan.noise_multiplier, plan) == plan.epsilon
    if plan.noise_multiplier > privacy.SIGMA_MIN:
        assert _eps(plan.noise_multiplier * 0.99, plan) > target


@pytest.mark.slow
def test_tracker_is_cheap_per_step():
    import time

    plan = plan_privacy(num_units=50_000, batch_size=500, epochs=30, target_epsilon=8.0)
    tracker = EpsilonTracker.for_plan(plan)
    start = time.perf_counter()
    eps = [tracker.epsilon(t) for t in range(1, plan.steps + 1)]
    per_step = (time.perf_counter() - start) / plan.steps
    assert per_step < 0.025  # a few ms on a 2-core CPU, with generous headroom for a loaded machine
    assert eps[-1] == plan.epsilon and all(np.diff(eps) > 0)


def test_solved_sigma_meets_target_by_prv_accountant_too():
    # independent check: prv-accountant 0.2.0's own upper bound, at the same eps_error, at dpft's answer
    dpsgd = pytest.importorskip("prv_accountant.dpsgd")
    from service.privacy.accounting import prv_errors

    plan = plan_privacy(num_units=20_000, batch_size=200, max_steps=1000, target_epsilon=2.0, target_delta=1e-5)
    eps_error, delta_error = prv_errors(plan.noise_multiplier, plan.sampling_probability, plan.steps, plan.delta)
    acc = dpsgd.DPSGDAccountant(noise_multiplier=plan.noise_multiplier, sampling_probability=plan.sampling_probability,
                                max_steps=plan.steps, eps_error=eps_error, delta_error=delta_error)
    lower, est, upper = acc.compute_epsilon(delta=plan.delta, num_steps=plan.steps)
    assert upper <= 2.0
    assert upper == pytest.approx(plan.epsilon, abs=1e-4)


def test_tracker_is_strictly_increasing_over_a_wobbling_bound():
    plan = plan_privacy(num_units=20_000, batch_size=200, max_steps=500, target_epsilon=1.5)
    tracker = EpsilonTracker.for_plan(plan)
    t = np.arange(plan.steps + 1)
    rng = np.random.default_rng(0)
    # a bound that increases on average but wobbles down between steps, with ties
    wobbly = plan.epsilon * np.sqrt(t / plan.steps) + 1e-4 * rng.standard_normal(t.size)
    wobbly[100:110] = wobbly[100]
    wobbly[0], wobbly[-1] = 0.0, plan.epsilon
    tracker._u[:] = wobbly
    eps = np.array([tracker.epsilon(s) for s in t])
    assert np.all(np.diff(eps) > 0)
    assert eps[-1] == plan.epsilon
    for s in range(1, plan.steps):
        # never below the smallest bound at s or later (an upper bound, the true epsilon being non-decreasing)
        assert eps[s] >= wobbly[s:min(s + tracker.WINDOW, plan.steps) + 1].min()
