"""The numpy RDP accountant against Opacus (which is TF-Privacy's code) and published values."""

import math

import numpy as np
import pytest

from service.privacy.rdp import DEFAULT_ORDERS, compute_rdp, get_privacy_spent, rdp_epsilon

pytestmark = pytest.mark.unit

opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")


@pytest.mark.parametrize(
    "q,sigma",
    [(0.04, 1.5), (0.01, 0.7), (0.5, 0.5), (1e-4, 3.0), (0.3, 0.6), (0.001, 0.8), (0.1, 0.4), (0.02, 4.0)],
)
def test_rdp_matches_opacus_per_order(q, sigma):
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=1)
    ref = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(DEFAULT_ORDERS))
    assert not np.isnan(ours).any()
    # ours sums the fractional-order series a little further than TF-Privacy's stopping rule
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize(
    "q,sigma,steps,delta",
    [(0.04, 1.5, 2250, 1e-5), (0.01, 1.0, 10_000, 1e-6), (0.256, 0.8, 40, 1e-3), (1e-3, 0.6, 100_000, 1e-7)],
)
def test_rdp_epsilon_matches_opacus(q, sigma, steps, delta):
    ref_rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(DEFAULT_ORDERS))
    ref_eps, _ = opacus_rdp.get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=ref_rdp, delta=delta)
    ours = rdp_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta,
                       orders=DEFAULT_ORDERS)
    assert ours == pytest.approx(ref_eps, rel=1e-4)
    # dpft's RDP accountant also tries larger orders: never looser
    assert rdp_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta) <= ours


def test_extended_orders_reach_small_epsilon():
    # with orders only up to 63, epsilon cannot go below log(1/delta)/62 whatever the noise
    default = rdp_epsilon(noise_multiplier=50.0, sampling_probability=0.01, steps=300, delta=1e-7,
                          orders=DEFAULT_ORDERS)
    extended = rdp_epsilon(noise_multiplier=50.0, sampling_probability=0.01, steps=300, delta=1e-7)
    assert default > 0.17 > 0.1 > extended


def test_rdp_published_opacus_value():
    # Opacus' accountant tests: noise 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.3291 (RDP)
    eps = rdp_epsilon(noise_multiplier=1.5, sampling_probability=0.04, steps=2250, delta=1e-5)
    assert eps == pytest.approx(7.3291, abs=5e-4)


def test_rdp_full_batch_is_gaussian_rdp():
    sigma, steps = 2.0, 7
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps)
    np.testing.assert_allclose(rdp, DEFAULT_ORDERS * steps / (2 * sigma**2))
    eps, order = get_privacy_spent(rdp=rdp, delta=1e-5)
    expected = np.min(
        DEFAULT_ORDERS * steps / (2 * sigma**2)
        - (math.log(1e-5) + np.log(DEFAULT_ORDERS)) / (DEFAULT_ORDERS - 1)
        + np.log((DEFAULT_ORDERS - 1) / DEFAULT_ORDERS)
    )
    assert eps == pytest.approx(expected)


def test_rdp_edge_cases():
    assert np.all(compute_rdp(q=0.0, noise_multiplier=1.0, steps=10) == 0)
    assert np.all(np.isinf(compute_rdp(q=0.1, noise_multiplier=0.0, steps=10)))
