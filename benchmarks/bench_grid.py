"""Whole-study grid on real sizes: read + preprocess speed, and ingest memory.

Writes a seeded synthetic 512 x 512 CT study (``bench_ingest.write_archive``) and times,
on the same files in one run:

* ``plain``   — ``pydicom.dcmread(f).pixel_array`` for every file (the reference);
* ``context`` — :func:`encoders.dicom.read_study` + :func:`encoders.preprocess.preprocess`
  (the whole-study context volume);
* ``input``   — ``read_study`` + :func:`encoders.grid.study_input` (context, the top 4
  lesion proposals and their detail patches: what ingest stores);

and prints each as a ratio to ``plain`` (speed: plain time / ours). Then it ingests a
study of ``--rss-slices`` slices in a fresh process (``workers=1``) and prints that
process's peak resident memory. Nothing is asserted.

    python benchmarks/bench_grid.py                  # 300 slices; 1,000 for the RSS run
    python benchmarks/bench_grid.py --slices 60 --rss-slices 200   # quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ingest import write_archive  # noqa: E402

from encoders.dicom import read_study  # noqa: E402
from encoders.grid import study_input  # noqa: E402
from encoders.preprocess import preprocess  # noqa: E402
from encoders.spec import DEFAULT_SPEC  # noqa: E402

_CHILD = """
import sys, resource
sys.path.insert(0, {root!r})
from pathlib import Path
from encoders.deid import Pseudonymizer
from indexing.ingest import ingest_folder
from indexing.store import CohortStore
store = CohortStore(Path({store!r}), create=True)
r = ingest_folder(Path({dicom!r}), store, pseudonymizer=Pseudonymizer(b"bench" * 8), workers=1)
print(r.studies_ingested, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _plain(paths: list[Path]) -> None:
    for p in paths:
        _ = pydicom.dcmread(p).pixel_array


def _best(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best wall time of ``repeat`` runs and the share of a core it got (CPU / wall)."""
    out = []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        out.append((wall, (time.process_time() - c0) / wall))
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rss-slices", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_archive(root / "a", 1, args.slices, 512, "native", 0)
        paths = sorted((root / "a").rglob("*.dcm"))
        plain, c_plain = _best(lambda: _plain(paths), args.repeat)
        ctx, c_ctx = _best(lambda: preprocess(read_study(paths), DEFAULT_SPEC), args.repeat)
        full, c_full = _best(lambda: study_input(read_study(paths), DEFAULT_SPEC), args.repeat)
        print(f"512^2 x {args.slices} slices, best of {args.repeat}:")
        print(f"  plain dcmread().pixel_array   {plain:6.2f} s  (core share {c_plain:.2f})")
        print(f"  read + context volume         {ctx:6.2f} s  speed {plain / ctx:.2f}x plain "
              f"(core share {c_ctx:.2f})")
        print(f"  read + context + 4 proposals  {full:6.2f} s  speed {plain / full:.2f}x plain "
              f"(core share {c_full:.2f}); proposals + patches {full - ctx:.2f} s")
        write_archive(root / "b", 1, args.rss_slices, 512, "native", 1)
        code = _CHILD.format(root=str(ROOT), store=str(root / "store"), dicom=str(root / "b"))
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        n, kib = res.stdout.split()[-2:]
        print(f"ingest of one 512^2 x {args.rss_slices}-slice study ({n} ingested, workers=1): "
              f"peak RSS {int(kib) / 2**20:.2f} GiB, {time.perf_counter() - t0:.1f} s "
              f"(raw int16 pixels {args.rss_slices * 512 * 512 * 2 / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
