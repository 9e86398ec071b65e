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

import numpy as np

from . import prv as _prv
from .accounting import compute_epsilon, prv_composer, prv_errors
from .rdp import EXTENDED_ORDERS, rdp_epsilon

_INT_ORDERS = EXTENDED_ORDERS[np.equal(np.mod(EXTENDED_ORDERS, 1), 0)]

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
        else:
            lo, f_lo = s, fs
        # Probe just across the crossing from s: one more evaluation often closes the bracket.
        s2 = math.exp(x - step if fs <= 0 else x + step)
        if lo < s2 < hi and hi / lo > 1 + rtol:
            f2 = f(s2)
            evals += 1
            if f2 <= 0:
                hi, f_hi = s2, f2
            else:
                lo, f_lo = s2, f2
    return hi


def _bracket_and_search(f: Callable[[float], float], guess_lo: float, guess_hi: float,
                        rtol: float = RTOL) -> float | None:
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
    return _search(f, lo, f_lo, hi, f_hi, rtol=rtol)


def solve_rdp(target: float, q: float, steps: int, delta: float, orders=None, rtol: float = RTOL) -> float | None:
    """Smallest sigma (to rtol) whose RDP epsilon is <= target (over ``orders``, default all).

    With all orders, a first pass over the (cheap) integer orders brackets the answer: adding the
    fractional orders can only lower epsilon, so the answer is at most the integer-order sigma.
    """
    def f_for(ords):
        def f(sigma: float) -> float:
            eps = rdp_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta,
                              orders=ords)
            return math.log(max(eps, 1e-300) / target)
        return f

    # Gaussian-mechanism-like first guess: eps ~ q sqrt(T log(1/delta)) / sigma
    guess = q * math.sqrt(2 * steps * math.log(1 / delta)) / target
    if orders is not None:
        return _bracket_and_search(f_for(orders), guess / 1.5, guess, rtol=rtol)
    sigma_int = _bracket_and_search(f_for(_INT_ORDERS), guess / 1.5, guess, rtol=min(rtol, 1e-3))
    if sigma_int is None:
        return _bracket_and_search(f_for(None), guess / 1.5, guess, rtol=rtol)
    return _bracket_and_search(f_for(None), sigma_int / 1.02, sigma_int, rtol=rtol)


# The coarse model runs the PRV accountant on a grid COARSE times coarser than the final one.
COARSE = 16
# A fine evaluation within this fraction below the target is accepted (sigma is then within about
# that fraction of the threshold, since |d log eps / d log sigma| >= ~1).
EPS_SLACK = 0.003
_AIM = 1 - EPS_SLACK / 2


def _fine(sigma: float, q: float, steps: int, delta: float) -> float:
    return compute_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta,
                           accountant="prv")


def _coarse(sigma: float, q: float, steps: int, delta: float) -> float:
    """A cheap prediction of the fine upper bound: the same search for delta minus the fine
    delta_error on a COARSE-times coarser grid, plus the fine eps_error."""
    eps_error, delta_error = prv_errors(sigma, q, steps, delta)
    comp = _prv.PRVComposer(noise_multiplier=sigma, sampling_probability=q, max_steps=steps,
                            eps_error=COARSE * eps_error, delta_error=delta_error)
    return max(comp.bounds(delta, steps, eps_error=eps_error)[2], 1e-12)


def solve_prv(target: float, q: float, steps: int, delta: float) -> float | None:
    """Smallest sigma (to about EPS_SLACK) with PRV upper bound <= target; None beyond SIGMA_MAX.

    1. RDP (cheap, looser) gives sigma_rdp; the tight sigma is typically 0.90-0.95 of it.
    2. Secant steps in log-log on the coarse model find sigma_c where the predicted fine bound is
       target * (1 - EPS_SLACK/2).
    3. The fine (final) accountant is evaluated at sigma_c and, if needed, a few secant/bisection
       steps follow, until a sigma with target*(1-EPS_SLACK) <= eps <= target is found or the
       bracket is narrower than RTOL. Only fine evaluations decide: the answer is always a sigma
       whose fine upper bound was computed and is <= target.

    Raises PRVUnavailable when the PRV accountant cannot evaluate a needed point.
    """
    # integer orders only: a starting point, not an answer (cheaper than the fractional series)
    sigma_rdp = solve_rdp(target, q, steps, delta, orders=_INT_ORDERS, rtol=0.01)
    if sigma_rdp is None:
        sigma_rdp = SIGMA_MAX
    log_t = math.log(target * _AIM)

    # -- 2. coarse secant
    pts: list[tuple[float, float]] = []  # (log sigma, log eps)
    slope = -1.2
    x = math.log(min(max(0.93 * sigma_rdp, SIGMA_MIN), SIGMA_MAX))
    try:
        for _ in range(5):
            y = math.log(_coarse(math.exp(x), q, steps, delta))
            pts.append((x, y))
            if len(pts) >= 2:
                (x0, y0), (x1, y1) = pts[-2], pts[-1]
                if x1 != x0 and y1 != y0 and (y1 - y0) / (x1 - x0) < 0:
                    slope = max(min((y1 - y0) / (x1 - x0), -0.3), -8.0)
            if abs(y - log_t) < 2e-4:
                break
            x_new = x + (log_t - y) / slope
            x_new = min(max(x_new, math.log(SIGMA_MIN)), math.log(SIGMA_MAX))
            if x_new == x:
                break
            x = x_new
    except _prv.PRVUnavailable:
        pass

    # -- 3. fine evaluations
    ok: tuple[float, float] | None = None  # (sigma, eps) smallest sigma meeting the target
    fail: tuple[float, float] | None = None  # (sigma, eps) largest sigma missing it
    sigma = math.exp(x)
    for _ in range(12):
        eps = _fine(sigma, q, steps, delta)
        if eps <= target:
            if ok is None or sigma < ok[0]:
                ok = (sigma, eps)
            if eps >= target * (1 - EPS_SLACK) or sigma <= SIGMA_MIN:
                return sigma
        else:
            if fail is None or sigma > fail[0]:
                fail = (sigma, eps)
            if sigma >= SIGMA_MAX:
                return None
        if ok and fail and ok[0] / fail[0] <= 1 + RTOL:
            return ok[0]
        # next point: secant through the bracket ends when both exist, else the local slope
        if ok and fail:
            (xa, ya), (xb, yb) = (math.log(fail[0]), math.log(fail[1])), (math.log(ok[0]), math.log(ok[1]))
            xn = xa + (log_t - ya) * (xb - xa) / (yb - ya) if yb != ya else 0.5 * (xa + xb)
            lo_x, hi_x = xa + 0.1 * (xb - xa), xb - 0.1 * (xb - xa)
            xn = min(max(xn, lo_x), hi_x)
        else:
            xn = math.log(sigma) + (log_t - math.log(eps)) / slope
            # never step by more than a factor 1.5 at a time
            xn = min(max(xn, math.log(sigma) - 0.4), math.log(sigma) + 0.4)
        sigma = min(max(math.exp(xn), SIGMA_MIN), SIGMA_MAX)
    # did not settle: plain bracketed search on the fine accountant
    return _bracket_and_search(lambda s: math.log(max(_fine(s, q, steps, delta), 1e-300) / target),
                               ok[0] / 1.05 if ok else sigma_rdp * 0.9, ok[0] if ok else sigma_rdp)


__all__ = ["SIGMA_MIN", "SIGMA_MAX", "solve_rdp", "solve_prv", "prv_composer", "prv_errors", "_prv"]
