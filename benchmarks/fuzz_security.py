"""Longer fuzzing of the DICOM header pass and of request validation.

Runs the hypothesis targets of ``tests/encoders/test_fuzz_dicom.py`` and
``tests/service/test_fuzz_requests.py`` with many random examples (the test suite runs
them briefly, derandomised). Prints examples per second and any failure; a failure
prints hypothesis' minimal example. Nothing else is asserted.

    python benchmarks/fuzz_security.py                      # 2000 examples per target
    python benchmarks/fuzz_security.py --examples 20000     # a long run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["tests/encoders/test_fuzz_dicom.py", "tests/service/test_fuzz_requests.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per fuzz target")
    args = ap.parse_args()
    env = {**os.environ, "COHORTSIM_FUZZ_EXAMPLES": str(args.examples), "COHORTSIM_FUZZ_RANDOM": "1"}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    worst = 0
    for target in TARGETS:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "--durations=0"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        dt = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if " call " in ln]
        print(f"\n{target}: exit {proc.returncode} in {dt:.1f} s ({args.examples} examples per target)")
        for ln in lines:
            secs, _, name = ln.split(maxsplit=2)
            s = float(secs.rstrip("s"))
            rate = f"~{args.examples / s:,.0f} examples/s" if s > 0.5 else "(not a fuzz target)"
            print(f"  {name.split('::')[-1]:<50} {s:7.2f} s  {rate}")
        if proc.returncode != 0:
            worst = proc.returncode
            print(proc.stdout[-6000:])
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
