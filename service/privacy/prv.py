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


# The safe domain size uses RDP at integer orders only (a valid, slightly larger bound than with the
# fractional orders too, so the domain can only be larger than prv-accountant's; much cheaper).
_DOMAIN_ORDERS = DEFAULT_ORDERS[np.equal(np.mod(DEFAULT_ORDERS, 1), 0)]


@lru_cache(maxsize=64)
def _per_step_rdp(q: float, sigma: float) -> np.ndarray:
    out = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_DOMAIN_ORDERS)
    out.setflags(write=False)
    return out


def _rdp_eps_min(per_step_rdp: np.ndarray, steps: float, delta: float) -> float:
    eps = eps_from_rdp(per_step_rdp * steps, delta, _DOMAIN_ORDERS)
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


def discretise(q: float, sigma: float, L: float, mesh: float, tail_budget: float = 1e-30) -> DiscretePRV:
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
    u_cut = min(_TAIL_U, max(5.0, -float(special.ndtri(max(tail_budget, 1e-300)))))
    z_star = (u_cut + 0.5 / sigma) / sigma
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
        # single-step mass cut above the support: at most 1e-4 of delta_error over all steps
        self.dprv = discretise(self.q, self.sigma, L, mesh, tail_budget=1e-4 * self.delta_error / self.max_steps)
        self.n = self.dprv.n
        F = sfft.rfft(self.dprv.pmf)
        self.dprv.pmf = None  # only the spectrum is kept
        self._F = F
        self._logF_full: np.ndarray | None = None
        self._logF_head: np.ndarray | None = None  # log F on a prefix of frequencies
        self._suffix_max: np.ndarray | None = None
        self._last_upper: dict[float, float] = {}  # warm start of the tracker's crossing search

    # -- composition ------------------------------------------------------------------------------
    # The composed PMF after t steps has the spectrum F**t. For all but the first few steps that
    # spectrum is negligible (< SPECTRAL_TAU) beyond a few hundred frequencies out of n/2, so the
    # tail sums the epsilon search needs are evaluated directly from the kept frequencies (closed
    # form geometric sums, O(K) per probe of a binary search) instead of an O(n log n) inverse FFT.
    SPECTRAL_TAU = 1e-30
    # the spectral path costs ~25 probes of O(K); an inverse FFT O(n log n): switch at K = n/10
    SPECTRAL_MAX_FRACTION = 0.1

    def _recentre(self, steps: int) -> int:
        # the mean-correcting shift accumulates to steps*shift; move the window by whole cells so
        # that it keeps covering [-L, L] in value (prv-accountant keeps it fixed, which misplaces
        # the window once steps*|shift| is comparable to the domain margin)
        return int(round(steps * self.dprv.shift / self.dprv.mesh))

    def _roll(self, steps: int) -> int:
        # raw circular index i of a sum of `steps` cells <-> value steps*(t_min + shift) + i*mesh;
        # domain index j <-> value t_min + steps*shift - m*mesh + j*mesh, so j = i - (steps-1)*k + m
        return (self._recentre(steps) - (steps - 1) * self.dprv.k) % self.n

    def _base(self, steps: int) -> float:
        t_min = self.dprv.t0 - self.dprv.shift
        return t_min + steps * self.dprv.shift - self._recentre(steps) * self.dprv.mesh

    def _ts(self, steps: int) -> np.ndarray:
        return self._base(steps) + np.arange(self.n, dtype=float) * self.dprv.mesh

    def _log_spectrum(self, kmax: int | None) -> np.ndarray:
        """log F on frequencies [0, kmax] (all when None); computed once per prefix length and cached
        (log F[k] does not depend on how many frequencies are computed, so results are identical)."""
        if kmax is None or kmax + 1 > self._F.size // 2:
            if self._logF_full is None:
                with np.errstate(divide="ignore"):
                    self._logF_full = np.log(self._F)
            return self._logF_full if kmax is None else self._logF_full[: kmax + 1]
        if self._logF_full is not None:
            return self._logF_full[: kmax + 1]
        if self._logF_head is None or self._logF_head.size < kmax + 1:
            m = min(self._F.size, max(2 * (kmax + 1), 1024))
            with np.errstate(divide="ignore"):
                self._logF_head = np.log(self._F[:m])
        return self._logF_head[: kmax + 1]

    def _spectrum(self, steps: int, kmax: int | None = None) -> np.ndarray:
        """F**steps (first kmax+1 frequencies), computed as exp(steps * log F)."""
        lf = self._log_spectrum(kmax)
        with np.errstate(under="ignore", invalid="ignore"):
            return np.exp(steps * lf)

    def _check(self, steps: int) -> None:
        if steps < 1 or steps > self.max_steps:
            raise ValueError(f"steps must be in [1, {self.max_steps}]")

    def _kept(self, steps: int) -> int:
        """Largest frequency index whose |F|**steps may exceed SPECTRAL_TAU (suffix-max bound)."""
        if self._suffix_max is None:
            with np.errstate(divide="ignore"):
                lf = np.log(np.abs(self._F))
            self._suffix_max = np.maximum.accumulate(lf[::-1])[::-1]
        thr = math.log(self.SPECTRAL_TAU) / steps
        # suffix max is non-increasing: frequencies [0, K] have suffix max > thr
        return int(np.searchsorted(-self._suffix_max, -thr, side="left")) - 1

    def composed(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(steps)
        f = sfft.irfft(self._spectrum(steps), self.n)
        return self._ts(steps), np.roll(f, self._roll(steps))

    def _fp_allowance(self, steps: int, abs_spec_sum: float) -> float:
        """Floating-point allowance in delta: ``steps * eps_machine * sum_k |F_k|**steps`` (the sum
        over all n frequencies bounds n * max|p|, so this is at least ``n * steps * eps * max|p|``,
        tens of times the error measured against a long-double composition)."""
        return steps * np.finfo(float).eps * abs_spec_sum

    def bounds(self, delta: float, steps: int, eps_error: float | None = None,
               upper_only: bool = False) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon after ``steps`` compositions.

        delta allowance = delta_error + steps * tail_mass (single-step mass cut above the
        evaluated support, by total variation) + floating-point allowance (+ the dropped-frequency
        bound on the spectral path). Deterministic in (parameters, steps, delta).
        """
        self._check(steps)
        eps_error = self.eps_error if eps_error is None else float(eps_error)
        base_allow = self.delta_error + steps * self.dprv.tail_mass
        K = self._kept(steps)
        if 0 <= K <= self.SPECTRAL_MAX_FRACTION * self.n:
            return self._bounds_spectral(delta, steps, K, base_allow, eps_error, upper_only)
        spec = self._spectrum(steps)
        a = np.abs(spec)
        abs_sum = float(a[0] + 2 * a[1:].sum() - (a[-1] if self.n % 2 == 0 else 0.0))
        p = np.roll(sfft.irfft(spec, self.n), self._roll(steps))
        allow = base_allow + self._fp_allowance(steps, abs_sum)
        return epsilon_from_pmf(self._ts(steps), p, delta, allow, eps_error)

    def _bounds_spectral(self, delta: float, steps: int, K: int, base_allow: float,
                         eps_error: float, upper_only: bool = False) -> tuple[float, float, float]:
        n, h = self.n, self.dprv.mesh
        k = np.arange(K + 1, dtype=np.int64)
        c = self._spectrum(steps, K)
        r = self._roll(steps)
        c = c * np.exp(-2j * np.pi * ((r * k) % n) / n)  # spectrum of the rolled PMF
        w = np.exp(2j * np.pi * k[1:] / n)  # omega^k
        a1 = c[1:] / (1 - w)
        a2_0 = c[0] / (1 - math.exp(-h))
        a2 = c[1:] / (1 - w * math.exp(-h))
        k1 = k[1:]

        def tails(i: int) -> tuple[float, float]:
            """d1(i) = sum_{j>=i} p_j and d2'(i) = sum_{j>=i} p_j exp(-(j-i) h)."""
            wi = np.exp(2j * np.pi * ((i * k1) % n) / n)
            e = math.exp(-(n - i) * h)
            d1 = (c[0].real * (n - i) + 2 * float(np.dot(a1, wi - 1).real)) / n
            d2 = (a2_0.real * (1 - e) + 2 * float(np.dot(a2, wi - e).real)) / n
            return d1, d2

        abs_sum = float(abs(c[0]) + 2 * np.abs(c[1:]).sum()) + n * self.SPECTRAL_TAU
        # dropped frequencies (|c_k| <= tau): each tail sum moves by at most 2 tau (log n + 1)
        trunc = 4 * self.SPECTRAL_TAU * (math.log(n) + 1)
        # rounding of the O(K) sums of terms of size <= |a_k|
        rnd = 8 * (K + 8) * np.finfo(float).eps * float(abs(c[0]) + 2 * np.abs(a1).sum() + abs(a2_0)
                                                        + 2 * np.abs(a2).sum()) / n
        allow = base_allow + self._fp_allowance(steps, abs_sum) + trunc + rnd
        if delta - allow <= 0:
            raise PRVUnavailable("delta too small for the PRV accountant's floating-point precision")
        base = self._base(steps)
        s0 = max(int(math.ceil(-base / h)) - 1, 0)
        cache: dict[int, tuple[float, float]] = {}

        def nd(i: int) -> float:
            if i not in cache:
                cache[i] = tails(i)
            d1, d2 = cache[i]
            return d2 - d1

        def find(target: float, hint: int | None = None) -> float:
            if nd(s0) >= -target:
                return base + s0 * h
            lo, hi = s0, n - 1  # nd(lo) < -target <= nd(hi)
            if nd(hi) < -target:
                raise PRVUnavailable("Cannot compute epsilon (epsilon beyond the domain)")
            if hint is not None and lo < hint < hi:
                # exponential search out of a warm start (same answer when nd is monotone)
                step = 1
                if nd(hint) >= -target:
                    hi = hint
                    while hi - step > lo and nd(hi - step) >= -target:
                        hi, step = hi - step, step * 2
                    lo = max(lo, hi - step)
                else:
                    lo = hint
                    while lo + step < hi and nd(lo + step) < -target:
                        lo, step = lo + step, step * 2
                    hi = min(hi, lo + step)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if nd(mid) >= -target:
                    hi = mid
                else:
                    lo = mid
            d1, d2 = cache[hi]
            return base + hi * h + math.log((d1 - target) / d2)

        hint = None
        warm = upper_only and steps != self.max_steps
        if warm and delta in self._last_upper:
            hint = int(round((self._last_upper[delta] - base) / h))
        upper = find(delta - allow, hint) + eps_error
        if warm:
            self._last_upper[delta] = upper - eps_error
        if upper_only:
            return math.nan, math.nan, upper
        lower = find(delta + allow) - eps_error
        est = find(delta)
        return lower, est, upper

    def epsilon_bounds(self, delta: float, steps: int) -> tuple[float, float, float]:
        return self.bounds(delta, steps)

    def upper_many(self, delta: float, steps_list) -> list[float]:
        """Upper bounds at several step counts (each exactly as :meth:`epsilon_bounds`)."""
        return [self.bounds(delta, int(s), upper_only=True)[2] for s in steps_list]


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
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        d1 = np.cumsum(p[::-1])[::-1]
        d2 = np.cumsum((p * np.exp(-ts))[::-1])[::-1]
        ndelta = np.exp(ts) * d2 - d1
    if not np.all(np.isfinite(ndelta)):
        raise PRVUnavailable("epsilon too large for the PRV accountant's floating-point range")

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
