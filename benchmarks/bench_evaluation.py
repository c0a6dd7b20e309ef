"""Cost of the leave-one-out prognosis evaluation at index build.

Times ``indexing.evaluation.evaluate_prognosis`` (exact neighbours of a sample of up to
2000 members, 10 kernel temperatures, C-index, calibration) beside ``build_snapshot``
(Flat index, OOD reference, checksums, publish) on the same random clustered vectors with
outcomes, and prints the ratio. Nothing is asserted.

    python benchmarks/bench_evaluation.py                  # 100k x 256 (the reference size)
    python benchmarks/bench_evaluation.py --preset small   # 10k x 64
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexing.evaluation import evaluate_prognosis
from indexing.snapshot import build_snapshot

PRESETS = {"small": (10_000, 64), "ref": (100_000, 256)}


def cohort(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    clusters = 50
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    cl = rng.integers(0, clusters, n)
    x = centres[cl] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    death = rng.exponential(5.0 + cl)
    censor = rng.uniform(6, 90, n)
    meta = pa.table(
        {
            "patient_id": [f"P-{i:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "time": np.minimum(death, censor).round(1),
            "event": death <= censor,
        }
    )
    return x, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ref")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    n, d = PRESETS[args.preset]
    x, meta = cohort(n, d)
    print(f"# {n} x {d}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    build_s, eval_s, plain_s = [], [], []
    ev: dict = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            build_snapshot(Path(tmp), x, meta, model_version="bench")
            build_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ev = evaluate_prognosis(x, meta)
        eval_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate_prognosis(x, meta, n_boot=0)
        plain_s.append(time.perf_counter() - t0)
    b, e, p = min(build_s), min(eval_s), min(plain_s)
    print(f"build_snapshot (Flat, reference): {b:.2f} s")
    print(f"evaluate_prognosis:               {e:.2f} s  ({e / b:.2f} x build)")
    print(f"  of which the bootstrap intervals ({ev['n_boot']} resamples): {e - p:.2f} s "
          f"({(e - p) / b:.2f} x build)")
    print(
        f"evaluated {ev['evaluated_studies']} studies; temperature {ev['temperature']}; "
        f"C-index {ev['c_index']:.3f} (95% CI {ev['c_index_interval'][0]:.3f}-"
        f"{ev['c_index_interval'][1]:.3f})"
    )


if __name__ == "__main__":
    main()
