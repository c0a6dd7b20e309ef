"""Storage chaos, long runs: kill -9, disk full / I/O errors, corruption.

Prints counts; asserts nothing. The short versions run in the test suite
(``tests/indexing/test_crash_kill9.py``, ``test_io_faults.py``, ``test_corruption.py``);
the machinery and the definition of "acknowledged" are in
``tests/indexing/storage_chaos.py``.

    python benchmarks/chaos_storage.py                     # 1,000 kills, full sweeps
    python benchmarks/chaos_storage.py --kills 100 --fault-points interesting --offsets 4

- kill -9: forked ingest / index-build children (4 synthetic patients, ingested in two
  halves, a rebuild after each) SIGKILLed at a random storage operation or after a
  random delay; the invariants are checked after every kill and each episode must end
  with every study stored once and served.
- I/O faults: ENOSPC and EIO at every storage operation N of an ingest and of a rebuild
  (``--fault-points all``), each followed by the checks and a clean re-run.
- corruption: every file of two snapshot versions (Flat with an encoder copy, IVF-PQ)
  and of a store, bit-flipped at ``--offsets`` places and truncated to 0/50/99 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "indexing"))

from storage_chaos import (  # noqa: E402
    EIO,
    ENOSPC,
    ForkRunner,
    Workload,
    corruption_campaign,
    fault_sweep,
    kill_campaign,
    measure,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("sizes")
    g.add_argument("--kills", type=int, default=1000, help="kill -9 iterations (runs killed mid-work)")
    g.add_argument("--fault-points", choices=("all", "interesting"), default="all")
    g.add_argument("--offsets", type=int, default=16, help="bit-flip offsets per file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", type=Path, help="also write the counts here")
    g.add_argument("--skip", nargs="*", default=[], choices=("kill", "faults", "corruption"))
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        workload = Workload(base / "workload", patients=4).prepare()
        with ForkRunner(workload) as runner:
            print(f"workload ready in {time.perf_counter() - t0:.1f} s ({len(workload.reference)} studies)")
            if "kill" not in args.skip:
                t = time.perf_counter()
                ops, secs = measure(runner, base / "measure")
                print(f"uninterrupted runs: storage ops {ops}, seconds { {k: round(v, 2) for k, v in secs.items()} }")
                k = kill_campaign(runner, workload, base / "kills", kills=args.kills, seed=args.seed,
                                  op_counts=ops, durations=secs)  # fmt: skip
                wall = time.perf_counter() - t
                print(f"kill -9: runs {k.iterations}, killed mid-work {k.killed}, completed runs {k.completed}, "
                      f"episodes (ingest, build, ingest, build) {k.episodes}, checks passed "
                      f"{k.iterations - len(k.failures)}, failures {len(k.failures)} ({wall:.0f} s)")  # fmt: skip
                for f in k.failures[:5]:
                    print("  ", f)
                out["kill"] = {**asdict(k), "seconds": wall, "ops": ops}
            if "faults" not in args.skip:
                out["faults"] = {}
                for op in ("ingest", "build"):
                    t = time.perf_counter()
                    f = fault_sweep(op, workload, base / f"faults-{op}", errnos=(ENOSPC, EIO), points=args.fault_points)
                    wall = time.perf_counter() - t
                    print(f"I/O faults ({op}): points {f.points} x ENOSPC+EIO = runs {f.runs}, typed errors "
                          f"{f.typed_errors}, published before the fault (last fsync) {f.published_anyway}, "
                          f"failures {len(f.failures)} ({wall:.0f} s)")  # fmt: skip
                    for msg in f.failures[:5]:
                        print("  ", msg)
                    out["faults"][op] = {**asdict(f), "seconds": wall}  # type: ignore[index]
        if "corruption" not in args.skip:
            t = time.perf_counter()
            c = corruption_campaign(base / "corruption", offsets=args.offsets, seed=args.seed)
            wall = time.perf_counter() - t
            print(f"corruption: files {c.files}, damages {c.damaged}, detected {c.detected}, "
                  f"failures {len(c.failures)} ({wall:.0f} s)")  # fmt: skip
            for msg in c.failures[:5]:
                print("  ", msg)
            out["corruption"] = {**asdict(c), "seconds": wall}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
