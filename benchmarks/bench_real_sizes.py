"""Real sizes on real anatomy: read + preprocess speed and ingest memory.

Studies are built from the real chest CT in ``../shared/data/lidc-idri-0001.tar.xz``
(LIDC-IDRI-0001: 133 slices, 512 x 512, GE LightSpeed, see ``../shared/data/README.md``):
its slices, stacked forward and back again so the anatomy stays continuous, are
re-positioned on a regular grid to give a study of any length (new UIDs, pixels
untouched). Two measurements, each against a reference taken in the same run:

* ``read``   — :func:`encoders.dicom.read_study` + :func:`encoders.preprocess.preprocess` of a
  512 x 512 x ``--slices`` study (default 300), against plain
  ``pydicom.dcmread(f).pixel_array`` of the same files (files in the page cache for both;
  best of ``--repeat``). Printed as speed ratios ``plain time / our time`` (1.0 = as fast
  as plain pydicom; #18 asks >= 0.5).
* ``ingest`` — peak RSS (VmHWM) of a child process that runs ``indexing.ingest.ingest_folder``
  (one worker, in-process) on a ``--ingest-slices`` study (default 1,000), against a child
  that only imports the same modules (the floor) and one that stacks the plain pydicom
  pixel arrays of the same files into one int16 array (what holding the study costs).
  #18 asks < 2 GiB.

(``benchmarks/bench_grid.py`` measures the same on the whole-study input grid, with
the lesion proposals and patches, on synthetic slices.)

Nothing is asserted. The 1-minute load average is printed around each measurement.

    python benchmarks/bench_real_sizes.py                    # 300 / 1,000 slices
    python benchmarks/bench_real_sizes.py --slices 120 --ingest-slices 300   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT / ".." / "shared" / "data" / "lidc-idri-0001.tar.xz"


def load() -> float:
    return os.getloadavg()[0]


def unpack(archive: Path, out: Path) -> list[Path]:
    """The archive's CT slices sorted by z (ImagePositionPatient)."""
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(out, filter="data")
    files = sorted(out.rglob("*.dcm"))
    z = {f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files}
    return sorted(files, key=z.__getitem__)


def make_study(sources: list[Path], n: int, out: Path, dz: float, seed: str) -> list[Path]:
    """``n`` slices from ``sources`` (forward, then backward, ...) on a regular ``dz`` grid."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(entropy_srcs=[seed, "series"])
    period = 2 * len(sources) - 2
    paths = []
    for k in range(n):
        i = k % period
        src = sources[i if i < len(sources) else period - i]
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], -1000.0 + k * dz]
        ds.InstanceNumber = k + 1
        ds.SliceThickness = dz
        path = out / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


CPU: dict[float, float] = {}
"""The CPU time (this process, all threads) of the best wall time :func:`best_of` returned."""


def best_of(repeat: int, fn, *args) -> float:
    """Best wall time of ``repeat`` calls; its CPU time is kept in :data:`CPU` (on a
    shared, loaded machine CPU time is the steadier figure for single-threaded work)."""
    best, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn(*args)
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    CPU[best] = cpu
    return best


def _plain(paths: list[Path]) -> None:
    for p in paths:
        pydicom.dcmread(p).pixel_array  # noqa: B018


def bench_read(paths: list[Path], repeat: int) -> None:
    from encoders.dicom import read_study
    from encoders.preprocess import preprocess
    from encoders.spec import DEFAULT_SPEC

    _plain(paths)  # page cache warm for both
    l0 = load()
    t_plain = best_of(repeat, _plain, paths)
    t_read = best_of(repeat, read_study, paths)
    study = read_study(paths)
    t_pre = best_of(repeat, preprocess, study, DEFAULT_SPEC)
    n = len(paths)
    print(f"\n[read] 512 x 512 x {n} slices, load {l0:.1f} -> {load():.1f}")
    c_plain, c_read, c_pre = CPU[t_plain], CPU[t_read], CPU[t_pre]
    print("  (wall s, CPU s; ratio = plain / ours, wall and CPU)")
    print(f"  plain dcmread().pixel_array   {t_plain:7.2f} {c_plain:7.2f}  {n / t_plain:5.0f} slices/s  (reference)")
    print(
        f"  read_study                    {t_read:7.2f} {c_read:7.2f}  {n / t_read:5.0f} slices/s  "
        f"ratio {t_plain / t_read:.2f} / {c_plain / c_read:.2f}"
    )
    print(f"  preprocess (default spec)     {t_pre:7.2f} {c_pre:7.2f}")
    print(
        f"  read_study + preprocess       {t_read + t_pre:7.2f} {c_read + c_pre:7.2f}  "
        f"ratio {t_plain / (t_read + t_pre):.2f} / {c_plain / (c_read + c_pre):.2f}  (#18: >= 0.5)"
    )


_CHILD = r"""
import json, os, resource, sys
from pathlib import Path
mode, folder, tmp = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
os.environ["COHORTSIM_DATE_ANCHORS"] = str(tmp / "anchors.json")
import numpy as np, pydicom
from encoders.deid import Pseudonymizer
from indexing.ingest import ingest_folder
from indexing.store import CohortStore
out = {}
if mode == "ingest":
    store = CohortStore(tmp / "store", create=True)
    report = ingest_folder(folder, store, pseudonymizer=Pseudonymizer(b"k" * 32), workers=1)
    out = {"ingested": report.studies_ingested, "rejected": report.studies_rejected}
elif mode == "plain":
    files = sorted(folder.iterdir())
    stack = None
    for i, f in enumerate(files):
        px = pydicom.dcmread(f).pixel_array
        if stack is None:
            stack = np.empty((len(files), *px.shape), px.dtype)
        stack[i] = px
# VmHWM: this process image's peak (ru_maxrss would carry the parent's over the exec).
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")]
out["peak_kib"] = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(out))
"""


def _child(mode: str, folder: Path, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(folder), str(tmp)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"{mode} child failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_ingest(folder: Path, n: int, tmp: Path) -> None:
    l0 = load()
    floor = _child("imports", folder, tmp / "a")
    plain = _child("plain", folder, tmp / "b")
    ours = _child("ingest", folder, tmp / "c")
    mib = {k: v["peak_kib"] / 1024 for k, v in (("floor", floor), ("plain", plain), ("ours", ours))}
    print(f"\n[ingest] one study of 512 x 512 x {n} slices, one worker; load {l0:.1f} -> {load():.1f}")
    print(f"  imports only (floor)           peak RSS {mib['floor']:7.0f} MiB")
    print(f"  plain pydicom stack (int16)    peak RSS {mib['plain']:7.0f} MiB  (reference)")
    print(
        f"  ingest_folder                  peak RSS {mib['ours']:7.0f} MiB  "
        f"ratio to plain {mib['ours'] / mib['plain']:.2f}; "
        f"{'under' if mib['ours'] < 2048 else 'OVER'} 2 GiB (#18)"
    )
    print(f"  ingested {ours.get('ingested')}, rejected {ours.get('rejected')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--archive", type=Path, default=ARCHIVE)
    g.add_argument("--slices", type=int, default=300, help="read benchmark study length")
    g.add_argument("--ingest-slices", type=int, default=1000, help="ingest memory study length")
    g.add_argument("--dz", type=float, default=1.25, help="slice spacing of the built studies (mm)")
    r = ap.add_argument_group("run")
    r.add_argument("--repeat", type=int, default=3, help="best of N")
    r.add_argument("--skip", nargs="*", default=[], choices=["read", "ingest"])
    args = ap.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive}: not found (LIDC-IDRI-0001, see ../shared/data/README.md)")
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
          f"this process peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp_name:
        tmp = Path(tmp_name)
        sources = unpack(args.archive, tmp / "lidc")
        study = make_study(sources, args.slices, tmp / "read", args.dz, "read")
        if "read" not in args.skip:
            bench_read(study, args.repeat)
        if "ingest" not in args.skip:
            folder = tmp / "ingest"
            make_study(sources, args.ingest_slices, folder, args.dz, "ingest")
            for d in ("a", "b", "c"):
                (tmp / d).mkdir()
            bench_ingest(folder, args.ingest_slices, tmp)


if __name__ == "__main__":
    main()
