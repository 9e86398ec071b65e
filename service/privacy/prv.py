"""PRV (privacy random variable) accountant for DP-SGD, in numpy, without torch.

This re-implements the accountant of Gopi, Lee and Wutschitz, "Numerical Composition of Differential
Privacy" (NeurIPS 2021), exactly as prv-accountant 0.2.0 (``prv_accountant.PRVAccountant`` with
``PoissonSubsampledGaussianMechanism``) and Opacus' ``PRVAccountant`` do it:

* the privacy loss random variable Y = log(P(X)/Q(X)), X ~ P, of the pair P = (1-q) N(0, s^2) +
  q N(1, s^2), Q = N(0, s^2) (the "remove" direction both libraries use);
* the domain [-L, L] with L from RDP tail bounds plus 3 (their ``compute_safe_domain_size``), the
  mesh ``eps_error / sqrt(T/2 * log(12/delta_error))`` (their Theorem 5.5), cell-centred
  discretisation of the truncated PRV, shifted so that the discrete mean equals the continuous
  mean;
* T-fold composition by FFT, then epsilon from delta with the bounds
  ``upper = eps(delta - delta_error) + eps_error`` and ``lower = eps(delta + delta_error) - eps_error``.

What differs is numerical, not mathematical: float64 with both the CDF and the survival function
(so that tail cells keep their relative precision), the truncated mean by composite Gauss-Legendre
quadrature in the Gaussian variable instead of ``scipy.integrate.quad`` on the CDF (this is why the
q = 0.1 case that prv-accountant 0.2.0 refuses with "Discrete mean differs from continuous mean
significantly" works here), a floating-point allowance subtracted from delta on top of
``delta_error``, and composition at many step counts from one FFT of the single-step PMF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import special

from .rdp import DEFAULT_ORDERS, compute_rdp, eps_from_rdp

# Largest grid (points) the PRV accountant will build; beyond it the caller falls back to RDP.
MAX_GRID = 1 << 23


class PRVUnavailable(RuntimeError):
    """The PRV accountant cannot produce a bound for these parameters (caller should fall back)."""


def _rdp_eps_min(per_step_rdp: np.ndarray, steps: float, delta: float) -> float:
    eps = eps_from_rdp(per_step_rdp * steps, delta, DEFAULT_ORDERS)
    eps = eps[np.isfinite(eps)]
    return float(eps.min()) if eps.size else math.inf


def safe_domain_size(per_step_rdp: np.ndarray, max_steps: int, eps_error: float, delta_error: float) -> float:
    """prv-accountant's ``compute_safe_domain_size`` (Remark 5.6 of Gopi et al.)."""
    l_comp = _rdp_eps_min(per_step_rdp, max_steps, delta_error / 4)
    l_one = _rdp_eps_min(per_step_rdp, 1, delta_error / 8 / max_steps)
    return max(l_comp, l_one, eps_error) + 3.0


def grid_size(per_step_rdp: np.ndarray, max_steps: int, eps_error: float, delta_error: float) -> tuple[int, float, float]:
    """(n, mesh, L) of the grid the accountant would build, without building it."""
    L = safe_domain_size(per_step_rdp, max_steps, eps_error, delta_error)
    mesh = eps_error / math.sqrt(max_steps * math.log(12 / delta_error) / 2)
    if not (math.isfinite(L) and mesh > 0):
        return (1 << 62), mesh, L
    k = int(math.ceil(L / mesh - 1e-9))
    return 2 * k + 2, mesh, L


# --- the single-step PRV -------------------------------------------------------------------------

def _u_args(t: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For Y <= t  <=>  X <= s^2 z + 1/2: return (valid, u1, u0) with
    P(Y <= t) = q Phi(u1) + (1-q) Phi(u0), u1 = s z - 1/(2s), u0 = s z + 1/(2s)."""
    if q >= 1.0:
        z = t
        valid = np.ones_like(t, dtype=bool)
    else:
        inner = np.expm1(t) + q  # e^t - (1 - q)
        valid = inner > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log(np.where(valid, inner, 1.0)) - math.log(q)
    u1 = sigma * z - 0.5 / sigma
    u0 = sigma * z + 0.5 / sigma
    return valid, u1, u0


def prv_cdf(t: np.ndarray, q: float, sigma: float) -> np.ndarray:
    valid, u1, u0 = _u_args(np.asarray(t, dtype=float), q, sigma)
    return np.where(valid, q * special.ndtr(u1) + (1 - q) * special.ndtr(u0), 0.0)


def prv_sf(t: np.ndarray, q: float, sigma: float) -> np.ndarray:
    valid, u1, u0 = _u_args(np.asarray(t, dtype=float), q, sigma)
    return np.where(valid, q * special.ndtr(-u1) + (1 - q) * special.ndtr(-u0), 1.0)


_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def _truncated_first_moment(q: float, sigma: float, t_max: float) -> float:
    """E[Y 1{Y <= t_max}] for Y = log(1 - q + q exp((2X - 1)/(2 s^2))), X ~ (1-q)N(0,s^2)+qN(1,s^2).

    (Y > log(1-q) > t_min always holds on the domains used here.) Composite Gauss-Legendre in x.
    """
    if q >= 1.0:
        x_max = sigma**2 * t_max + 0.5
    else:
        x_max = sigma**2 * (math.log(math.expm1(t_max) + q) - math.log(q)) + 0.5
    lo = -16.0 * sigma
    hi = min(x_max, 1.0 + 16.0 * sigma)
    if hi <= lo:
        return 0.0
    panels = 400
    edges = np.linspace(lo, hi, panels + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    half = 0.5 * (edges[1:] - edges[:-1])[:, None]
    x = mid + half * _GL_X[None, :]
    w = half * _GL_W[None, :]
    u = (2 * x - 1) / (2 * sigma**2)
    g = u if q >= 1.0 else np.log1p(q * np.expm1(u))
    dens = ((1 - q) * np.exp(-0.5 * (x / sigma) ** 2) + q * np.exp(-0.5 * ((x - 1) / sigma) ** 2)) / (
        sigma * math.sqrt(2 * math.pi))
    return float(np.sum(w * g * dens))


@dataclass
class DiscretePRV:
    """Discretised single-step PRV on n points t_min + shift + i*mesh (i = 0..n-1)."""

    pmf: np.ndarray
    t0: float  # t_min + shift
    mesh: float
    shift: float
    n: int


def discretise(q: float, sigma: float, L: float, mesh: float) -> DiscretePRV:
    k = int(math.ceil(L / mesh - 1e-9))
    n = 2 * k + 2
    if n > MAX_GRID:
        raise PRVUnavailable(f"PRV grid of {n} points exceeds the limit {MAX_GRID}")
    t_min = -k * mesh
    t_max = (k + 1) * mesh
    i = np.arange(n + 1, dtype=float)
    edges = t_min + (i - 0.5) * mesh
    edges[0] = t_min
    edges[-1] = t_max
    # CDF for edges <= 0, survival function above (keeps tail cells precise)
    low = edges <= 0.0
    F = prv_cdf(edges[low], q, sigma)
    S = prv_sf(edges[~low], q, sigma)
    F_all = np.concatenate([F, 1.0 - S])
    mass = np.empty(n)
    nl = int(low.sum())  # number of edges on the CDF side
    # cells entirely on the CDF side: cells 0..nl-2; cells entirely on the SF side: nl..n-1
    mass[: max(nl - 1, 0)] = np.diff(F)
    if nl - 1 < n:
        mass[nl:] = -np.diff(S)
        if nl >= 1:
            mass[nl - 1] = F_all[nl] - F_all[nl - 1]
    F_tmin = F_all[0]
    S_tmax = S[-1] if S.size else 0.0
    remaining = (1.0 - S_tmax) - F_tmin
    if not remaining > 0:
        raise PRVUnavailable("PRV truncation removed all mass")
    pmf = mass / remaining
    ts = t_min + np.arange(n, dtype=float) * mesh
    mean_d = float(np.dot(ts, pmf))
    mean_c = _truncated_first_moment(q, sigma, t_max) / remaining
    shift = mean_c - mean_d
    if not abs(shift) < mesh / 2:
        raise PRVUnavailable("Discrete mean differs from continuous mean significantly")
    return DiscretePRV(pmf=pmf, t0=t_min + shift, mesh=mesh, shift=shift, n=n)


class PRVComposer:
    """Compose one discretised PRV with itself any number of times up to ``max_steps``."""

    def __init__(self, *, noise_multiplier: float, sampling_probability: float, max_steps: int,
                 eps_error: float, delta_error: float) -> None:
        self.sigma = float(noise_multiplier)
        self.q = float(sampling_probability)
        self.max_steps = int(max_steps)
        self.eps_error = float(eps_error)
        self.delta_error = float(delta_error)
        per_step = compute_rdp(q=self.q, noise_multiplier=self.sigma, steps=1)
        n, mesh, L = grid_size(per_step, self.max_steps, self.eps_error, self.delta_error)
        if n > MAX_GRID:
            raise PRVUnavailable(f"PRV grid of {n} points exceeds the limit {MAX_GRID}")
        self.L = L
        self.dprv = discretise(self.q, self.sigma, L, mesh)
        self.n = self.dprv.n
        self._F = sfft.rfft(self.dprv.pmf)
        # floating-point allowance in delta: rounding in the PMF, FFT and the cumulative sums
        self.fp_delta = 64 * np.finfo(float).eps * math.sqrt(self.n) * math.log2(self.n) * 8

    def composed(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        if steps < 1 or steps > self.max_steps:
            raise ValueError(f"steps must be in [1, {self.max_steps}]")
        f = sfft.irfft(self._F ** steps, self.n)
        m = steps - 1
        if steps % 2 == 0:
            m += self.n // 2
        f = np.roll(f, m)
        ts = self.dprv.t0 + self.dprv.shift * (steps - 1) + np.arange(self.n) * self.dprv.mesh
        return ts, f

    def epsilon_bounds(self, delta: float, steps: int) -> tuple[float, float, float]:
        ts, p = self.composed(steps)
        return epsilon_from_pmf(ts, p, delta, self.delta_error + self.fp_delta, self.eps_error)


def epsilon_from_pmf(ts: np.ndarray, p: np.ndarray, delta: float, delta_error: float,
                     eps_error: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) of epsilon, as ``DiscretePrivacyRandomVariable.compute_epsilon``."""
    if delta - delta_error <= 0:
        raise PRVUnavailable("delta too small for the PRV accountant's floating-point precision")
    d1 = np.cumsum(p[::-1])[::-1]
    d2 = np.cumsum((p * np.exp(-ts))[::-1])[::-1]
    ndelta = np.exp(ts) * d2 - d1

    def find(delta_target: float) -> float:
        i = int(np.searchsorted(ndelta, -delta_target, side="left"))
        if i <= 0:
            raise PRVUnavailable("Cannot compute epsilon (domain too small)")
        if i >= len(ts):
            raise PRVUnavailable("Cannot compute epsilon (epsilon beyond the domain)")
        return float(np.log((d1[i] - delta_target) / d2[i]))

    upper = find(delta - delta_error) + eps_error
    lower = find(delta + delta_error) - eps_error
    est = find(delta)
    return lower, est, upper
