"""Coverage of the neighbours' Kaplan–Meier 95 % band, by simulation.

Simulated "neighbour sets": k neighbours with similarities uniform in [0.5, 0.9], each
with its own exponential event time whose rate depends on its similarity (closer
neighbours carry a different risk, so the weighted estimand is a mixture), independent
censoring (uniform administrative 10-60 plus exponential drop-out). The true curve is the
weighted mixture sum_i w_i exp(-rate_i t) (for unit weights, the plain mixture). At fixed
times the band "covers" when lower <= S_true(t) <= upper; cohorts whose follow-up ends
before the time are not counted there. Also printed: simultaneous coverage (the band
holds at all four times at once), the share of cohorts estimable at each time, and the
same figures for lifelines' own band on the same weights (the reference: what one gets
from ``KaplanMeierFitter(weights=...)``). Nothing is asserted; the test suite runs a
smaller version (tests/indexing/test_prognosis.py).

    python benchmarks/bench_band_coverage.py                  # 2000 cohorts per setting
    python benchmarks/bench_band_coverage.py --reps 300       # a quick look
    python benchmarks/bench_band_coverage.py --tails          # the tails (issue #25)

``--tails``: coverage where the true curve is near 1 (S = 0.99, 0.95) and near 0 (S = 0.05,
0.01), for n_eff 5-50, with little censoring (administrative at 120-200, drop-out mean
400) so that neighbour sets whose every member had the event (estimate S = 0) are common
at the low end. A time counts where the answer reports it: within the follow-up, or past
it when the curve has reached 0 (as ``indexing.prognosis`` reports horizons). Printed
beside the band: the same band with the upper bound at S = 0 forced to 0 (the band
before issue #25) and lifelines' band, and the share of sets whose estimate is exactly 0
there.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np

from indexing.prognosis import effective_sample_size, kaplan_meier, similarity_weights

CHECK_TIMES = np.array([3.0, 6.0, 12.0, 24.0])


def simulate(rng: np.random.Generator, k: int, temperature: float | None):
    sims = rng.uniform(0.5, 0.9, k)
    w = np.ones(k) if temperature is None else similarity_weights(sims, temperature=temperature)
    rate = np.exp(2.0 * (sims - 0.7)) / 20.0
    death = rng.exponential(1.0 / rate)
    censor = np.minimum(rng.uniform(10, 60, k), rng.exponential(80, k))
    time_, event = np.minimum(death, censor), death <= censor
    truth = np.array([np.sum(w / w.sum() * np.exp(-rate * t)) for t in CHECK_TIMES])
    return time_, event, w, truth


def band_ours(t, e, w):
    c = kaplan_meier(t, e, w)
    return np.array([p.time for p in c]), np.array([p.lower for p in c]), np.array([p.upper for p in c])


def band_lifelines(t, e, w):
    from lifelines import KaplanMeierFitter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmf = KaplanMeierFitter().fit(t, e, weights=w)
    ci = kmf.confidence_interval_.to_numpy()
    return kmf.confidence_interval_.index.to_numpy(), ci[:, 0], ci[:, 1]


def coverage(k: int, temperature: float | None, reps: int, seed: int, method) -> dict:
    rng = np.random.default_rng(seed)
    covered = np.zeros(CHECK_TIMES.size)
    counted = np.zeros(CHECK_TIMES.size)
    joint = joint_n = 0
    n_eff = []
    for _ in range(reps):
        t, e, w, truth = simulate(rng, k, temperature)
        n_eff.append(effective_sample_size(w))
        grid, lo, hi = method(t, e, w)
        ok_all, all_estimable = True, True
        for j, x in enumerate(CHECK_TIMES):
            if x > t.max():
                all_estimable = False
                continue
            i = int(np.searchsorted(grid, x, side="right")) - 1
            inside = bool(lo[i] <= truth[j] <= hi[i])  # NaN bounds count as a miss
            counted[j] += 1
            covered[j] += inside
            ok_all &= inside
        if all_estimable:
            joint_n += 1
            joint += ok_all
    return {
        "pointwise": covered / np.maximum(counted, 1),
        "estimable": counted / reps,
        "simultaneous": joint / max(joint_n, 1),
        "n_eff": float(np.mean(n_eff)),
    }


TAIL_LEVELS = np.array([0.99, 0.95, 0.05, 0.01])
TAIL_TIMES = -20.0 * np.log(TAIL_LEVELS)  # base rate 1/20: S(t) = exp(-t / 20)


def simulate_tails(rng: np.random.Generator, k: int, temperature: float | None):
    sims = rng.uniform(0.5, 0.9, k)
    w = np.ones(k) if temperature is None else similarity_weights(sims, temperature=temperature)
    rate = np.exp(1.0 * (sims - 0.7)) / 20.0
    death = rng.exponential(1.0 / rate)
    censor = np.minimum(rng.uniform(120, 200, k), rng.exponential(400, k))
    time_, event = np.minimum(death, censor), death <= censor
    truth = np.array([np.sum(w / w.sum() * np.exp(-rate * t)) for t in TAIL_TIMES])
    return time_, event, w, truth


def tail_coverage(k: int, temperature: float | None, reps: int, seed: int) -> dict:
    """Pointwise coverage at TAIL_TIMES of: our band, ours with upper = 0 at S = 0, lifelines."""
    rng = np.random.default_rng(seed)
    hits = {name: np.zeros(TAIL_TIMES.size) for name in ("ours", "zero", "lifelines")}
    counted = np.zeros(TAIL_TIMES.size)
    at_zero = np.zeros(TAIL_TIMES.size)
    n_eff = []
    for _ in range(reps):
        t, e, w, truth = simulate_tails(rng, k, temperature)
        n_eff.append(effective_sample_size(w))
        curve = kaplan_meier(t, e, w)
        grid = np.array([p.time for p in curve])
        s = np.array([p.survival for p in curve])
        lo = np.array([p.lower for p in curve])
        hi = np.array([p.upper for p in curve])
        lgrid, llo, lhi = band_lifelines(t, e, w)
        for j, x in enumerate(TAIL_TIMES):
            i = int(np.searchsorted(grid, x, side="right")) - 1
            if x > grid[-1] and s[-1] > 0:
                continue  # beyond the follow-up with S > 0: not reported
            counted[j] += 1
            at_zero[j] += s[i] <= 0.0
            hits["ours"][j] += lo[i] <= truth[j] <= hi[i]
            hits["zero"][j] += lo[i] <= truth[j] <= (0.0 if s[i] <= 0.0 else hi[i])
            li = int(np.searchsorted(lgrid, x, side="right")) - 1
            hits["lifelines"][j] += bool(llo[li] <= truth[j] <= lhi[li])
    out = {name: v / np.maximum(counted, 1) for name, v in hits.items()}
    out["at_zero"] = at_zero / np.maximum(counted, 1)
    out["reported"] = counted / reps
    out["n_eff"] = float(np.mean(n_eff))
    return out


def main_tails(reps: int, seed: int) -> None:
    levels = " ".join(f"{v:g}" for v in TAIL_LEVELS)
    print(f"# tail coverage, nominal 95%; {reps} neighbour sets per setting; true S = {levels}")
    print(f"# at t = {' '.join(f'{v:.1f}' for v in TAIL_TIMES)}; "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'k':>3} {'weights':>7} {'n_eff':>5} | {'ours (S=.99 .95 .05 .01)':>24} | "
          f"{'upper 0 at S=0':>24} | {'lifelines':>24} | {'share S^=0':>18}")
    t0 = time.perf_counter()
    settings = [(5, None), (10, None), (20, None), (50, None), (20, 0.1), (50, 0.1), (100, 0.1)]
    for k, temp in settings:
        r = tail_coverage(k, temp, reps, seed)
        f = {n: " ".join(f"{v:.3f}" for v in r[n]) for n in ("ours", "zero", "lifelines")}
        z = " ".join(f"{v:.2f}" for v in r["at_zero"])
        label = "unit" if temp is None else f"T={temp:g}"
        print(f"{k:>3} {label:>7} {r['n_eff']:>5.1f} | {f['ours']:>24} | {f['zero']:>24} | "
              f"{f['lifelines']:>24} | {z:>18}")
    print(f"# {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2000, help="simulated cohorts per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="10,20,50", help="neighbour counts k")
    ap.add_argument("--temperatures", default="unit,0.2,0.1,0.05,0.02",
                    help="'unit' (equal weights) or softmax temperatures")
    ap.add_argument("--tails", action="store_true", help="coverage near S = 0 and S = 1 (issue #25)")
    args = ap.parse_args()
    if args.tails:
        main_tails(args.reps, args.seed)
        return
    print(f"# band coverage, nominal 95%; {args.reps} cohorts per setting; times {CHECK_TIMES.tolist()}")
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    header = (
        f"{'k':>3} {'weights':>8} {'n_eff':>6} | {'pointwise coverage at t=3,6,12,24':>34} "
        f"{'simult.':>7} | {'lifelines (same weights)':>34} {'simult.':>7} | estimable at t"
    )
    print(header)
    t0 = time.perf_counter()
    for k in (int(x) for x in args.ks.split(",")):
        for temp_s in args.temperatures.split(","):
            temp = None if temp_s == "unit" else float(temp_s)
            ours = coverage(k, temp, args.reps, args.seed, band_ours)
            ref = coverage(k, temp, args.reps, args.seed, band_lifelines)
            fmt = " ".join(f"{v:.3f}" for v in ours["pointwise"])
            fmt_ref = " ".join(f"{v:.3f}" for v in ref["pointwise"])
            est = " ".join(f"{v:.2f}" for v in ours["estimable"])
            print(
                f"{k:>3} {temp_s:>8} {ours['n_eff']:>6.1f} | {fmt:>34} {ours['simultaneous']:>7.3f} "
                f"| {fmt_ref:>34} {ref['simultaneous']:>7.3f} | {est}"
            )
    print(f"# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
