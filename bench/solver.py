"""Noise solver benchmark: dpft's plan_privacy beside prv-accountant and Opacus, same run.

    .venv/bin/python bench/solver.py            # all specs, all baselines (several minutes)
    .venv/bin/python bench/solver.py --quick    # 8 specs, baselines on them too
    .venv/bin/python bench/solver.py --no-baselines

For each spec it prints the noise multiplier and wall time of

* dpft: ``service.privacy.plan_privacy`` (PRV accountant, default delta unless given), the whole plan
  including validation and the epsilon curve, in-process, after one warm-up plan of an unrelated spec;
* prv: ``prv_accountant.dpsgd.find_noise_multiplier`` (eps_error 0.01);
* opacus-prv / opacus-rdp: ``opacus.accountants.utils.get_noise_multiplier`` (accountant "prv" / "rdp",
  epsilon_tolerance 0.01);

and dpft's noise relative to the smallest noise multiplier in the row that actually meets the target by
a tight PRV estimate (see ``--check``). Failures are shown as ``fail``. Times are wall-clock seconds on
this machine; every solver is single-threaded numpy/scipy.
"""

from __future__ import annotations

import argparse
import math
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


def _time(fn):
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val = fn()
    except Exception as exc:  # noqa: BLE001 - a baseline failing is a result
        return None, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"[:80]
    return val, time.perf_counter() - t, None


def tight_estimate(sigma: float, q: float, steps: int, delta: float) -> float:
    """A tight PRV *estimate* (not a bound) at eps_error 0.002, for judging tightness."""
    comp = PRVComposer(noise_multiplier=sigma, sampling_probability=q, max_steps=steps,
                       eps_error=0.002, delta_error=delta / 1000)
    return comp.epsilon_bounds(delta, steps)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--check", action="store_true", help="tight PRV estimate at each row's smallest sigma")
    args = ap.parse_args()

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

            row["prv"] = _time(partial(find_noise_multiplier, sampling_probability=q, num_steps=steps,
                                                             target_epsilon=eps, target_delta=d, eps_error=0.01))
            row["opacus-prv"] = _time(partial(get_noise_multiplier, target_epsilon=eps, target_delta=d,
                                                                   sample_rate=q, steps=steps, accountant="prv",
                                                                   epsilon_tolerance=0.01))
            row["opacus-rdp"] = _time(partial(get_noise_multiplier, target_epsilon=eps, target_delta=d,
                                                                   sample_rate=q, steps=steps, accountant="rdp",
                                                                   epsilon_tolerance=0.01))
        rows.append(row)
        _print_row(row, args)
        sys.stdout.flush()

    print()
    print(f"dpft plan time over {len(times)} specs: median {statistics.median(times) * 1e3:.0f} ms, "
          f"worst {max(times) * 1e3:.0f} ms")
    if not args.no_baselines:
        rel = [r["rel"] for r in rows if r.get("rel") is not None]
        if rel:
            print(f"dpft noise / smallest noise meeting the target in the row: median {statistics.median(rel):.4f}, "
                  f"worst {max(rel):.4f}")


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
        cells.append(f"{name} {'fail' if val is None else f'{val:.4f}'} {t:6.2f}s")
        if val is not None and name != "opacus-rdp":
            sigmas.append(val)
    if plan is not None and len(sigmas) > 1:
        best = min(sigmas)
        row["rel"] = plan.noise_multiplier / best
        cells.append(f"rel {row['rel']:.4f}")
        if args.check:
            est = tight_estimate(best, plan.sampling_probability, plan.steps, plan.delta)
            cells.append(f"tight-est@min={est:.4f}")
    print(" | ".join(cells))


if __name__ == "__main__":
    main()
