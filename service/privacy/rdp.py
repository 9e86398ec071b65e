"""Renyi-DP accounting of the Poisson-subsampled Gaussian mechanism, in numpy.

This is the analysis of Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled
Gaussian Mechanism" (2019), as implemented by TF-Privacy's ``compute_rdp`` and Opacus'
``opacus.accountants.analysis.rdp``: ``log A_alpha`` by the binomial expansion for integer orders
and by the two-sided series for fractional orders, then the RDP -> (epsilon, delta) conversion of
Balle et al. 2020 (Theorem 21) that Opacus uses. It needs no torch.

Everything is vectorised over the orders. Safety notes:

* An order whose fractional series does not converge within the term cap is dropped (its RDP is
  ``nan``); the conversion minimises over the remaining orders, so dropping orders can only make
  the bound looser, never unsafe.
* ``epsilon`` is the minimum over orders of a valid bound, hence itself a valid upper bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

# The orders Opacus uses by default (``RDPAccountant.DEFAULT_ALPHAS``) and prv-accountant too.
DEFAULT_ORDERS: np.ndarray = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)

# Orders used by dpft's RDP accountant: Opacus' defaults plus larger integer orders, which the
# conversion needs for small epsilon at small delta (a minimum over more orders is still a bound).
EXTENDED_ORDERS: np.ndarray = np.concatenate(
    [DEFAULT_ORDERS, np.array([64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512, 768, 1024], dtype=float)])


def _signed_logsumexp(log_terms: np.ndarray, signs: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(sign * exp(log_terms))) along ``axis``; -inf for a zero sum, nan for a negative one."""
    m = np.max(log_terms, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(signs * np.exp(log_terms - m), axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(s) + np.squeeze(m, axis=axis)


@lru_cache(maxsize=8)
def _log_binom_table(alphas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(alphas, dtype=float)[:, None]
    i = np.arange(int(a.max()) + 1, dtype=float)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        log_binom = special.gammaln(a + 1) - special.gammaln(i + 1) - special.gammaln(a - i + 1)
    log_binom = np.where(i <= a, log_binom, -np.inf)
    return log_binom, i, a


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer alphas (exact binomial expansion)."""
    alphas = np.asarray(alphas, dtype=float)
    if alphas.size == 0:
        return np.zeros(0)
    log_binom, i, a = _log_binom_table(tuple(alphas.tolist()))
    with np.errstate(invalid="ignore"):
        terms = log_binom + (i * (math.log(q) - math.log1p(-q)) + (i * i - i) / (2 * sigma**2)) \
            + a * math.log1p(-q)
    m = terms.max(axis=1, keepdims=True)  # finite: the i = 0 term always is
    return np.log(np.exp(terms - m).sum(axis=1)) + m[:, 0]


def _log_a_frac(q: float, sigma: float, alphas: np.ndarray, n_terms: int) -> tuple[np.ndarray, np.ndarray]:
    """log A_alpha for fractional alphas by the series of Mironov et al. (Section 3.3).

    Returns (log_a, converged): ``converged`` is False where the last terms are not yet below
    exp(-30) (the stopping rule TF-Privacy and Opacus use).
    """
    a = np.asarray(alphas, dtype=float)[:, None]
    i = np.arange(n_terms, dtype=float)[None, :]
    j = a - i
    coef = special.binom(a, i)
    sign = np.sign(coef)
    with np.errstate(divide="ignore"):
        log_coef = np.log(np.abs(coef))
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log1p(-q)
    log_t0 = log_coef + i * log_q + j * log_1q
    log_t1 = log_coef + j * log_q + i * log_1q
    s2 = math.sqrt(2) * sigma
    # log(0.5 * erfc(x)) = log_ndtr(-x * sqrt 2)
    log_e0 = special.log_ndtr(-(i - z0) / s2 * math.sqrt(2))
    log_e1 = special.log_ndtr(-(z0 - j) / s2 * math.sqrt(2))
    log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
    log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
    # TF-Privacy stops at the first i where both terms are below -30; terms after it are kept
    # here (they only make the sum more accurate).
    small = np.maximum(log_s0, log_s1) < -30
    converged = small.any(axis=1)
    log_a0 = _signed_logsumexp(log_s0, sign, axis=1)
    log_a1 = _signed_logsumexp(log_s1, sign, axis=1)
    log_a = np.logaddexp(log_a0, log_a1)
    return log_a, converged


def compute_rdp(*, q: float, noise_multiplier: float, steps: int | float = 1,
                orders: np.ndarray | None = None) -> np.ndarray:
    """RDP of ``steps`` compositions of the Poisson-subsampled Gaussian at each order.

    Same semantics as ``opacus.accountants.analysis.rdp.compute_rdp``. Orders whose series could
    not be evaluated come back as ``nan`` (ignored by :func:`get_privacy_spent`).
    """
    orders = DEFAULT_ORDERS if orders is None else np.atleast_1d(np.asarray(orders, dtype=float))
    sigma = float(noise_multiplier)
    q = float(q)
    if q == 0:
        return np.zeros_like(orders)
    if sigma == 0:
        return np.full_like(orders, np.inf)
    if q == 1.0:
        return orders / (2 * sigma**2) * steps
    out = np.full_like(orders, np.nan)
    is_int = np.equal(np.mod(orders, 1), 0)
    if is_int.any():
        out[is_int] = _log_a_int(q, sigma, orders[is_int])
    frac = ~is_int
    if frac.any():
        fa = orders[frac]
        log_a, ok = _log_a_frac(q, sigma, fa, 64)
        if not ok.all():
            la2, ok2 = _log_a_frac(q, sigma, fa[~ok], 4096)
            log_a[~ok] = np.where(ok2, la2, np.nan)
        out[frac] = log_a
    with np.errstate(invalid="ignore"):
        rdp = out / (orders - 1)
    # a negative or nan value signals a numerical failure of the series: drop that order
    rdp = np.where(np.isfinite(rdp) & (rdp >= 0) | np.isposinf(rdp), rdp, np.nan)
    return rdp * steps


def eps_from_rdp(rdp: np.ndarray, delta: float, orders: np.ndarray | None = None) -> np.ndarray:
    """Epsilon bound for each order (Balle et al. 2020, Thm 21, as in Opacus); reduces over the last axis
    is left to the caller. ``rdp`` may have a leading batch axis."""
    orders = DEFAULT_ORDERS if orders is None else np.asarray(orders, dtype=float)
    return rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)


def get_privacy_spent(*, orders: np.ndarray | None = None, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, optimal order) like Opacus' ``get_privacy_spent``; (inf, nan) if no order is usable."""
    orders = DEFAULT_ORDERS if orders is None else np.atleast_1d(np.asarray(orders, dtype=float))
    eps = eps_from_rdp(np.atleast_1d(rdp), delta, orders)
    if np.isnan(eps).all():
        return math.inf, math.nan
    idx = int(np.nanargmin(eps))
    return float(eps[idx]), float(orders[idx])


def rdp_epsilon(*, noise_multiplier: float, sampling_probability: float, steps: int, delta: float,
                orders: np.ndarray | None = None) -> float:
    """Epsilon after ``steps`` steps by the RDP accountant (an upper bound), over ``EXTENDED_ORDERS``."""
    orders = EXTENDED_ORDERS if orders is None else np.asarray(orders, dtype=float)
    rdp = compute_rdp(q=sampling_probability, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(rdp=rdp, delta=delta, orders=orders)
    return max(eps, 0.0)


def rdp_epsilon_curve(*, noise_multiplier: float, sampling_probability: float, steps: np.ndarray,
                      delta: float) -> np.ndarray:
    """RDP epsilon at many step counts at once (vectorised over steps and orders)."""
    per_step = compute_rdp(q=sampling_probability, noise_multiplier=noise_multiplier, steps=1,
                           orders=EXTENDED_ORDERS)
    steps = np.asarray(steps, dtype=float)
    eps = eps_from_rdp(steps[:, None] * per_step[None, :], delta, EXTENDED_ORDERS)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return np.maximum(eps.min(axis=1), 0.0)
