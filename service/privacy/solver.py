"""Find the smallest noise multiplier whose accountant upper bound meets a target epsilon.

The search works on log(epsilon) against log(sigma), which is close to a straight line, with
secant steps inside a bracket and a "neighbour check" that closes the bracket from both sides:
after a secant guess x it evaluates x*(1 -/+ tol) so that the final bracket [lo, hi] satisfies
hi/lo <= 1 + tol with eps(hi) <= target < eps(lo). The returned sigma is always ``hi``, a point
where the accountant's upper bound was actually evaluated and found at most the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import prv as _prv
from .accounting import compute_epsilon, prv_composer, prv_errors
from .rdp import rdp_epsilon

SIGMA_MIN = 0.3
SIGMA_MAX = 100.0
# relative width of the final bracket
RTOL = 1e-3


def _search(f: Callable[[float], float], lo: float, f_lo: float, hi: float, f_hi: float,
            rtol: float = RTOL, max_evals: int = 60) -> float:
    """f decreasing in sigma; f(lo) > 0 >= f(hi). Returns hi' with f(hi') <= 0 and hi'/lo' <= 1+rtol."""
    evals = 0
    while hi / lo > 1 + rtol and evals < max_evals:
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        else:
            x = 0.5 * (x_lo + x_hi)
        # keep strictly inside, at least a fraction of the step away from the ends
        margin = min(0.5 * (x_hi - x_lo), math.log1p(rtol) * 0.45)
        x = min(max(x, x_lo + margin), x_hi - margin)
        s = math.exp(x)
        fs = f(s)
        evals += 1
        step = math.log1p(rtol) * 0.9
        if fs <= 0:
            hi, f_hi = s, fs
            s2 = math.exp(x - step)
            if s2 > lo and hi / lo > 1 + rtol:
                f2 = f(s2)
                evals += 1
                if f2 <= 0:
                    hi, f_hi = s2, f2
                else:
                    lo, f_lo = s2, f2
        else:
            lo, f_lo = s, fs
            s2 = math.exp(x + step)
            if s2 < hi and hi / lo > 1 + rtol:
                f2 = f(s2)
                evals += 1
                if f2 <= 0:
                    hi, f_hi = s2, f2
                else:
                    lo, f_lo = s2, f2
    return hi


def _bracket_and_search(f: Callable[[float], float], guess_lo: float, guess_hi: float) -> float | None:
    """Smallest sigma in [SIGMA_MIN, SIGMA_MAX] with f(sigma) <= 0 (to RTOL); None if f(SIGMA_MAX) > 0."""
    guess_lo = min(max(guess_lo, SIGMA_MIN), SIGMA_MAX)
    guess_hi = min(max(guess_hi, guess_lo), SIGMA_MAX)
    hi, f_hi = guess_hi, f(guess_hi)
    lo = f_lo = None
    while f_hi > 0:
        if hi >= SIGMA_MAX:
            return None
        lo, f_lo = hi, f_hi
        hi = min(hi * 1.25, SIGMA_MAX)
        f_hi = f(hi)
    if lo is None:
        if hi <= SIGMA_MIN:
            return SIGMA_MIN
        lo = max(min(guess_lo, hi / 1.01), SIGMA_MIN)
        f_lo = f(lo)
        while f_lo <= 0:
            if lo <= SIGMA_MIN:
                return SIGMA_MIN
            hi, f_hi = lo, f_lo
            lo = max(lo / 1.25, SIGMA_MIN)
            f_lo = f(lo)
    return _search(f, lo, f_lo, hi, f_hi)


def solve_rdp(target: float, q: float, steps: int, delta: float) -> float | None:
    def f(sigma: float) -> float:
        eps = rdp_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta)
        return math.log(max(eps, 1e-300) / target)

    # Gaussian-mechanism-like first guess: eps ~ q sqrt(T log(1/delta)) / sigma
    guess = q * math.sqrt(2 * steps * math.log(1 / delta)) / target
    return _bracket_and_search(f, guess / 1.5, guess)


def solve_prv(target: float, q: float, steps: int, delta: float) -> float:
    """Smallest sigma (to RTOL) with PRV upper bound <= target; None if it exceeds SIGMA_MAX.

    Raises PRVUnavailable when the PRV accountant cannot evaluate some needed point.
    """
    sigma_rdp = solve_rdp(target, q, steps, delta)
    if sigma_rdp is None:
        # RDP is looser than PRV: still try the PRV accountant at the limit
        sigma_rdp = SIGMA_MAX

    def f(sigma: float) -> float:
        eps = compute_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta,
                              accountant="prv")
        return math.log(max(eps, 1e-300) / target)

    return _bracket_and_search(f, sigma_rdp * 0.9, sigma_rdp)


__all__ = ["SIGMA_MIN", "SIGMA_MAX", "solve_rdp", "solve_prv", "prv_composer", "prv_errors", "_prv"]
