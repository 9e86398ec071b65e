"""Noise solver benchmark: dpft's plan_privacy beside prv-accountant and Opacus, same run.

    .venv/bin/python bench/solver.py --tight    # all specs, all baselines, tight sigma (10-20 minutes)
    .venv/bin/python bench/solver.py --quick    # 8 specs, baselines on them too
    .venv/bin/python bench/solver.py --no-baselines
    .venv/bin/python bench/solver.py --random 1000   # dpft alone on 1000 random specs: time spread

For each spec it prints the noise multiplier and wall time of

* dpft: ``service.privacy.plan_privacy`` (PRV accountant, default delta unless given), the whole plan
  including validation and the epsilon curve, in-process, after one warm-up plan of an unrelated spec;
* prv: ``prv_accountant.dpsgd.find_noise_multiplier`` (eps_error 0.01);
* opacus-prv / opacus-rdp: ``opacus.accountants.utils.get_noise_multiplier`` (accountant "prv" / "rdp",
  epsilon_tolerance 0.01);

and dpft's noise relative to the smallest noise multiplier in the row ("rel"; note prv-accountant's
answer is only guaranteed to within its eps_error, so it can sit slightly below the tight value) and,
with ``--tight``, relative to the tight sigma: the smallest sigma whose PRV estimate on a grid with
eps_error = target/1000 meets the target. PRV baselines whose grid would exceed ``--max-grid`` points
are skipped (they would need gigabytes); each baseline call is limited to ``--limit`` seconds.
Times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.privacy import default_delta, plan_privacy  # noqa: E402
from service.privacy.prv import PRVComposer  # noqa: E402

# (num_units, batch_size, epochs, target_epsilon, target_delta or None)
SPECS = [
    (1_000, 10, 3, 1.0, None),
    (1_000, 100, 10, 8.0, None),
    (500, 50, 5, 10.0, 1e-3),
    (5_000, 64, 20, 3.0, None),
    (10_000, 256, 10, 1.0, None),
    (10_000, 1_000, 50, 0.5, None),
    (50_000, 500, 100, 8.0, None),
    (60_000, 256, 60, 2.0, None),
    (100_000, 1_000, 3, 0.1, None),
    (100_000, 50_000, 20, 50.0, None),
    (100_000, 10, 10, 1.0, None),
    (1_000_000, 1_000, 5, 1.0, None),
    (1_000_000, 100, 100, 4.0, None),
    (1_000_000, 4_096, 1, 0.3, None),
    (10_000_000, 1_000, 1, 0.5, None),
    (10_000_000, 100_000, 10, 2.0, None),
    (10_000_000, 1_000, 10, 8.0, None),
    (2_000, 1_000, 5, 20.0, None),
    (300_000, 3_000, 30, 5.0, None),
    (10_000, 100, 0.1, 0.2, None),
    (1_000, 500, 100, 50.0, None),
    (10_000, 1, 50, 2.0, None),
]
QUICK = [0, 2, 4, 7, 9, 12, 14, 18]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _time(fn, limit: int = 0):
    t = time.perf_counter()
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = fn()
    except _Timeout:
        return None, time.perf_counter() - t, f"timeout after {limit}s"
    except Exception as exc:  # noqa: BLE001 - a baseline failing is a result
        return None, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"[:80]
    finally:
        if limit:
            signal.alarm(0)
    return val, time.perf_counter() - t, None


def baseline_grid(target: float, steps: int, delta: float, eps_error: float) -> float:
    """Rough size of the PRV grid prv-accountant/Opacus would allocate (L ~ 2 eps + 3)."""
    return 2 * (2 * target + 3) * math.sqrt(steps * math.log(12 / (delta / 1000)) / 2) / eps_error


def tight_sigma(target: float, q: float, steps: int, delta: float, near: float) -> float:
    """Smallest sigma whose PRV *estimate* on a fine grid (eps_error = target/1000) is <= target,
    searched near ``near`` (dpft's answer)."""
    from scipy.optimize import brentq

    def f(s):
        comp = PRVComposer(noise_multiplier=s, sampling_probability=q, max_steps=steps,
                           eps_error=target / 1000, delta_error=delta / 1000)
        return comp.epsilon_bounds(delta, steps)[1] - target

    lo, hi = near * 0.97, near * 1.001
    while f(lo) < 0:
        lo *= 0.97
    while f(hi) > 0:
        hi *= 1.01
    return brentq(f, lo, hi, xtol=1e-6, rtol=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--tight", action="store_true",
                    help="also compute the tight sigma (fine-grid PRV estimate) for specs with <= 20000 steps")
    ap.add_argument("--limit", type=int, default=120, help="seconds allowed per baseline call")
    ap.add_argument("--max-grid", type=float, default=4e6,
                    help="skip PRV baselines whose grid would exceed this many points (memory)")
    ap.add_argument("--random", type=int, default=0, metavar="N",
                    help="instead: time dpft alone on N random specs from the issue's spread, print the slowest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.random:
        random_spread(args.random, args.seed)
        return

    specs = [SPECS[i] for i in QUICK] if args.quick else SPECS
    plan_privacy(num_units=12_345, batch_size=67, epochs=2, target_epsilon=3.3)  # warm-up (imports, caches)

    rows = []
    times = []
    for n, b, epochs, eps, delta in specs:
        q = b / n
        steps = math.ceil(epochs * n / b)
        d = delta if delta is not None else default_delta(n)
        plan, t, err = _time(partial(plan_privacy, num_units=n, batch_size=b, epochs=epochs, target_epsilon=eps,
                                                  target_delta=delta))
        times.append(t)
        row = {"spec": f"N={n:.0e} q={q:.0e} T={steps} eps={eps:g} d={d:.1e}", "dpft": plan, "dpft_t": t,
               "dpft_err": err}
        if not args.no_baselines:
            from opacus.accountants.utils import get_noise_multiplier
            from prv_accountant.dpsgd import find_noise_multiplier

            skip = (None, 0.0, "skipped (grid too large)")
            row["prv"] = _time(partial(find_noise_multiplier, sampling_probability=q, num_steps=steps,
                                       target_epsilon=eps, target_delta=d, eps_error=0.01), args.limit) \
                if baseline_grid(eps, steps, d, 0.005) <= args.max_grid else skip
            row["opacus-prv"] = _time(partial(get_noise_multiplier, target_epsilon=eps, target_delta=d,
                                              sample_rate=q, steps=steps, accountant="prv",
                                              epsilon_tolerance=0.01), args.limit) \
                if baseline_grid(eps, steps, d, 0.01) <= args.max_grid else skip
            row["opacus-rdp"] = _time(partial(get_noise_multiplier, target_epsilon=eps, target_delta=d,
                                              sample_rate=q, steps=steps, accountant="rdp",
                                              epsilon_tolerance=0.01), args.limit)
        if args.tight and plan is not None and steps <= 20_000:
            row["tight"] = _time(partial(tight_sigma, eps, q, steps, d, plan.noise_multiplier), args.limit)
        rows.append(row)
        _print_row(row, args)
        sys.stdout.flush()

    print()
    print(f"dpft plan time over {len(times)} specs: median {statistics.median(times) * 1e3:.0f} ms, "
          f"worst {max(times) * 1e3:.0f} ms")
    if not args.no_baselines:
        rel = [r["rel"] for r in rows if r.get("rel") is not None]
        if rel:
            print(f"dpft noise / smallest baseline-or-dpft noise in the row: median {statistics.median(rel):.4f}, "
                  f"worst {max(rel):.4f}")
    rel_t = [r["rel_tight"] for r in rows if r.get("rel_tight") is not None]
    if rel_t:
        print(f"dpft noise / tight noise ({len(rel_t)} specs): median {statistics.median(rel_t):.4f}, "
              f"worst {max(rel_t):.4f}, best {min(rel_t):.4f}")


def random_spread(count: int, seed: int) -> None:
    """Time ``plan_privacy`` on ``count`` specs drawn log-uniformly from the realistic spread:
    10^3..10^7 units, q 1e-4..0.5, 10..10^6 steps, target epsilon 0.1..50, default delta. A refusal
    (no noise multiplier up to the solver's limit meets the target) is an answer too and is timed."""
    import random

    rng = random.Random(seed)

    def log_uniform(lo: float, hi: float) -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    plan_privacy(num_units=12_345, batch_size=67, epochs=2, target_epsilon=3.3)  # warm-up
    timed = []
    for i in range(count):
        n = round(log_uniform(1e3, 1e7))
        b = min(max(1, round(log_uniform(1e-4, 0.5) * n)), n // 2)
        steps = round(log_uniform(10, 1e6))
        eps = log_uniform(0.1, 50)
        plan, t, err = _time(partial(plan_privacy, num_units=n, batch_size=b, max_steps=steps, target_epsilon=eps))
        outcome = f"sigma {plan.noise_multiplier:.4f}" if plan is not None else f"refused: {err[:60]}"
        timed.append((t, f"N={n} batch={b} (q={b / n:.1e}) T={steps} eps={eps:.3g}", outcome))
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{count} specs timed", file=sys.stderr)
    times = sorted(t for t, _, _ in timed)
    print(f"dpft plan time over {count} random specs (seed {seed}): median {statistics.median(times) * 1e3:.0f} ms, "
          f"p99 {times[int(0.99 * (count - 1))] * 1e3:.0f} ms, worst {times[-1] * 1e3:.0f} ms, "
          f"over 1 s: {sum(t > 1 for t in times)}, refused: {sum(o.startswith('refused') for _, _, o in timed)}")
    print("slowest:")
    for t, spec, outcome in sorted(timed, reverse=True)[:10]:
        print(f"  {t * 1e3:7.0f} ms  {spec}  {outcome}")


def _print_row(row, args):
    plan = row["dpft"]
    cells = [row["spec"]]
    if plan is None:
        cells.append(f"dpft fail ({row['dpft_err']})")
    else:
        fb = " (rdp fallback)" if plan.fell_back else ""
        cells.append(f"dpft {plan.noise_multiplier:.4f} {row['dpft_t'] * 1e3:6.0f}ms eps={plan.epsilon:.4f}{fb}")
    sigmas = [plan.noise_multiplier] if plan is not None else []
    for name in ("prv", "opacus-prv", "opacus-rdp"):
        if name not in row:
            continue
        val, t, err = row[name]
        if val is None:
            cells.append(f"{name} {'skip' if err.startswith('skipped') else 'fail'}"
                         f"{'' if err.startswith('skipped') else f' {t:6.2f}s ({err[:40]})'}")
        else:
            cells.append(f"{name} {val:.4f} {t:6.2f}s")
        if val is not None and name != "opacus-rdp":
            sigmas.append(val)
    if plan is not None and len(sigmas) > 1:
        best = min(sigmas)
        row["rel"] = plan.noise_multiplier / best
        cells.append(f"rel {row['rel']:.4f}")
    if plan is not None and row.get("tight") and row["tight"][0] is not None:
        row["rel_tight"] = plan.noise_multiplier / row["tight"][0]
        cells.append(f"tight {row['tight'][0]:.4f} (dpft/tight {row['rel_tight']:.4f})")
    print(" | ".join(cells))


if __name__ == "__main__":
    main()
