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
from functools import lru_cache

import numpy as np
from scipy import fft as sfft
from scipy import special

from .rdp import DEFAULT_ORDERS, compute_rdp, eps_from_rdp

# Largest grid (points) the PRV accountant will build; beyond it the caller falls back to RDP.
MAX_GRID = 1 << 23


class PRVUnavailable(RuntimeError):
    """The PRV accountant cannot produce a bound for these parameters (caller should fall back)."""


@lru_cache(maxsize=64)
def _per_step_rdp(q: float, sigma: float) -> np.ndarray:
    out = compute_rdp(q=q, noise_multiplier=sigma, steps=1)
    out.setflags(write=False)
    return out


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
    z_max = t_max if q >= 1.0 else math.log(math.expm1(t_max) + q) - math.log(q)
    x_max = sigma**2 * z_max + 0.5
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
    """Discretised single-step PRV on n points t0 + i*mesh (i = 0..n-1), t0 = -k*mesh + shift."""

    pmf: np.ndarray
    t0: float
    mesh: float
    shift: float
    n: int
    k: int
    tail_mass: float  # P(Y > t_hi): mass cut above the evaluated support (accounted in delta)


def fast_even_length(n: int) -> int:
    m = sfft.next_fast_len(int(n), real=True)
    while m % 2:
        m = sfft.next_fast_len(m + 1, real=True)
    return m


# Phi(-11.5) ~ 6e-31: the single-step PRV has less than this mass above the support we evaluate
_TAIL_U = 11.5


def discretise(q: float, sigma: float, L: float, mesh: float) -> DiscretePRV:
    """prv-accountant's CellCentred discretisation of the PRV truncated to the grid, mean-corrected.

    The grid is [-k*mesh, (n-1-k)*mesh] with k = ceil(L/mesh) and n >= 2k+2 an FFT-friendly even
    length, so it contains [-L, L]. Cells are only evaluated where the PRV has mass: above
    log(1-q) (where the CDF is exactly 0 below) and below t_hi where P(Y > t_hi) < 1e-30; the cut
    upper tail is reported as ``tail_mass`` and charged to delta by the composer.
    """
    k = int(math.ceil(L / mesh - 1e-9))
    n_min = 2 * k + 2
    if n_min > MAX_GRID:
        raise PRVUnavailable(f"PRV grid of {n_min} points exceeds the limit {MAX_GRID}")
    n = fast_even_length(n_min)
    t_min = -k * mesh
    t_max = t_min + (n - 1) * mesh
    # support of the evaluation
    z_star = (_TAIL_U + 0.5 / sigma) / sigma
    t_star = z_star if q >= 1.0 else math.log1p(q * math.expm1(z_star))
    t_lo = t_min if q >= 1.0 else max(t_min, math.log1p(-q))
    t_hi = min(t_max, t_star)
    # cells i have edges [t_min + (i - 1/2) mesh, t_min + (i + 1/2) mesh] clipped to [t_min, t_max]
    i0 = max(0, int(math.floor((t_lo - t_min) / mesh + 0.5)) - 1)
    i1 = min(n - 1, int(math.ceil((t_hi - t_min) / mesh - 0.5)) + 1)
    idx = np.arange(i0, i1 + 2, dtype=float)
    edges = t_min + (idx - 0.5) * mesh
    edges[0] = max(edges[0], t_min)
    if i1 == n - 1:
        edges[-1] = t_max
    tail_cut = float(edges[-1])
    low = edges <= 0.0
    F = prv_cdf(edges[low], q, sigma)
    S = prv_sf(edges[~low], q, sigma)
    nl = int(low.sum())
    cells = i1 - i0 + 1
    mass = np.empty(cells)
    if nl >= 2:
        mass[: nl - 1] = np.diff(F)
    if nl < len(edges):
        mass[nl:] = -np.diff(S)
        if nl >= 1:
            mass[nl - 1] = (1.0 - S[0]) - F[-1]
    F_lo = F[0] if nl else 1.0 - S[0]
    S_hi = S[-1] if nl < len(edges) else 1.0 - F[-1]
    # mass below the first evaluated edge is exactly 0 when q < 1 (the PRV is > log(1-q)); for q = 1
    # the first edge is t_min, the truncation point
    remaining = (1.0 - S_hi) - F_lo
    if not remaining > 0:
        raise PRVUnavailable("PRV truncation removed all mass")
    pmf = np.zeros(n)
    pmf[i0:i1 + 1] = mass / remaining
    ts_cells = t_min + np.arange(i0, i1 + 1, dtype=float) * mesh
    mean_d = float(np.dot(ts_cells, pmf[i0:i1 + 1]))
    lower_moment = 0.0
    if q >= 1.0 and F_lo > 0:
        lower_moment = _truncated_first_moment(q, sigma, float(edges[0]))
    mean_c = (_truncated_first_moment(q, sigma, tail_cut) - lower_moment) / remaining
    shift = mean_c - mean_d
    if not abs(shift) < mesh / 2:
        raise PRVUnavailable("Discrete mean differs from continuous mean significantly")
    tail_mass = float(S_hi) if i1 < n - 1 else 0.0
    return DiscretePRV(pmf=pmf, t0=t_min + shift, mesh=mesh, shift=shift, n=n, k=k, tail_mass=tail_mass)


class PRVComposer:
    """Compose one discretised PRV with itself any number of times up to ``max_steps``."""

    def __init__(self, *, noise_multiplier: float, sampling_probability: float, max_steps: int,
                 eps_error: float, delta_error: float) -> None:
        self.sigma = float(noise_multiplier)
        self.q = float(sampling_probability)
        self.max_steps = int(max_steps)
        self.eps_error = float(eps_error)
        self.delta_error = float(delta_error)
        per_step = _per_step_rdp(self.q, self.sigma)
        n, mesh, L = grid_size(per_step, self.max_steps, self.eps_error, self.delta_error)
        if n > MAX_GRID:
            raise PRVUnavailable(f"PRV grid of {n} points exceeds the limit {MAX_GRID}")
        self.L = L
        self.dprv = discretise(self.q, self.sigma, L, mesh)
        self.n = self.dprv.n
        F = sfft.rfft(self.dprv.pmf)
        self.dprv.pmf = None  # only the spectrum is kept
        with np.errstate(divide="ignore"):
            self._logF = np.log(F)
        self._F = F
        self._arange = np.arange(self.n, dtype=float)

    def _roll(self, steps: int) -> int:
        # raw circular index i of a sum of `steps` cells <-> value steps*(t_min + shift) + i*mesh;
        # index j of the domain t0 + shift*(steps-1) + j*mesh is i - (steps-1)*k (mod n)
        return (-(steps - 1) * self.dprv.k) % self.n

    def _ts(self, steps: int) -> np.ndarray:
        return (self.dprv.t0 + self.dprv.shift * (steps - 1)) + self._arange * self.dprv.mesh

    def _spectrum(self, steps: int) -> np.ndarray:
        """F**steps, computed as exp(steps * log F) (the canonical, deterministic way)."""
        with np.errstate(under="ignore", invalid="ignore"):
            return np.exp(steps * self._logF)

    def _check(self, steps: int) -> None:
        if steps < 1 or steps > self.max_steps:
            raise ValueError(f"steps must be in [1, {self.max_steps}]")

    def composed(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(steps)
        f = sfft.irfft(self._spectrum(steps), self.n)
        return self._ts(steps), np.roll(f, self._roll(steps))

    def delta_allowance(self, steps: int, p: np.ndarray) -> float:
        """delta_error plus what is not covered by the PRV theorem: the cut single-step tail (by total
        variation, at most steps * tail_mass) and floating-point error of the FFT composition (at most
        about n * steps * eps_machine * max|p|, tens of times what was measured against long double)."""
        fp = self.n * steps * np.finfo(float).eps * float(np.max(np.abs(p)))
        return self.delta_error + steps * self.dprv.tail_mass + fp

    def epsilon_bounds(self, delta: float, steps: int) -> tuple[float, float, float]:
        ts, p = self.composed(steps)
        return epsilon_from_pmf(ts, p, delta, self.delta_allowance(steps, p), self.eps_error)

    def upper_many(self, delta: float, steps_list, batch: int = 8) -> list[float]:
        """Upper bounds at several step counts.

        The spectrum at consecutive requested steps is obtained by multiplying by F (cheaper than a
        power); ``max_steps`` itself always uses the canonical power, so that the value there is
        bit-identical to :meth:`epsilon_bounds`.
        """
        steps_list = [int(s) for s in steps_list]
        for s in steps_list:
            self._check(s)
        order = sorted(range(len(steps_list)), key=lambda i: steps_list[i])
        out = [0.0] * len(steps_list)
        prev_s, prev_spec = None, None
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            specs = []
            for i in idx:
                s = steps_list[i]
                if s == self.max_steps or prev_s is None or s - prev_s > 4:
                    spec = self._spectrum(s)
                else:
                    spec = prev_spec
                    for _ in range(s - prev_s):
                        spec = spec * self._F
                if s != self.max_steps:
                    prev_s, prev_spec = s, spec
                specs.append(spec)
            fs = sfft.irfft(np.stack(specs), self.n, axis=1)
            for i, f in zip(idx, fs, strict=True):
                s = steps_list[i]
                p = np.roll(f, self._roll(s))
                out[i] = epsilon_from_pmf(self._ts(s), p, delta, self.delta_allowance(s, p), self.eps_error)[2]
        return out


def epsilon_from_pmf(ts: np.ndarray, p: np.ndarray, delta: float, delta_error: float,
                     eps_error: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) of epsilon, as ``DiscretePrivacyRandomVariable.compute_epsilon``.

    Only the part of the grid above 0 is searched (epsilon >= 0); when the crossing lies below it
    the bound returned is the grid point at 0, which is then an upper bound of the estimate.
    """
    if delta - delta_error <= 0:
        raise PRVUnavailable("delta too small for the PRV accountant's floating-point precision")
    s0 = max(int(np.searchsorted(ts, 0.0)) - 1, 0)
    ts = ts[s0:]
    p = p[s0:]
    d1 = np.cumsum(p[::-1])[::-1]
    d2 = np.cumsum((p * np.exp(-ts))[::-1])[::-1]
    ndelta = np.exp(ts) * d2 - d1

    def find(delta_target: float) -> float:
        i = int(np.searchsorted(ndelta, -delta_target, side="left"))
        if i <= 0:
            return float(ts[0])
        if i >= len(ts):
            raise PRVUnavailable("Cannot compute epsilon (epsilon beyond the domain)")
        return float(np.log((d1[i] - delta_target) / d2[i]))

    upper = find(delta - delta_error) + eps_error
    lower = find(delta + delta_error) - eps_error
    est = find(delta)
    return lower, est, upper
