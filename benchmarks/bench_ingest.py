"""Ingest throughput: our read + preprocess against plain pydicom, one process and all cores.

Writes a seeded synthetic archive (CT studies of 512 x 512 slices, explicit VR little
endian or a compressed syntax), then times on the same files:

* ``plain``  — ``pydicom.dcmread(f).pixel_array`` for every file (the reference);
* ``ours``   — :func:`encoders.dicom.read_study` + :func:`encoders.preprocess.preprocess` per
  study (header pass, checks, geometry, HU, resampling);
* ``ingest`` — the whole ``indexing.ingest.ingest_folder`` (scan, read, preprocess,
  pseudonymise, write the store) with ``--workers 1`` and with all cores;

and prints slices/s and the ratios measured in this run. Nothing is asserted.

Each single-process line also prints the share of a core it got (CPU time / wall time):
well below 1.0 means other jobs were using the cores, and then no parallel ratio of this
run can be read as the code's own. The 1-minute load average is printed before and
after every measurement. The ``workers=1`` and ``workers=N`` ingests alternate (best of
``--repeat`` each), so a load change hits both alike; the worker pool's start-up is
part of every ingest (as in the CLI), and is also timed on its own.

    python benchmarks/bench_ingest.py                 # default preset
    python benchmarks/bench_ingest.py --preset small  # quick look
    python benchmarks/bench_ingest.py --preset large  # parallel ratio with less start-up share
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexing.ingest as ingest_module
from encoders.deid import Pseudonymizer
from encoders.dicom import read_study, scan_folder
from encoders.preprocess import preprocess
from encoders.spec import DEFAULT_SPEC
from indexing.ingest import _context, _start_pool, default_workers, ingest_folder
from indexing.store import CohortStore

PRESETS = {"small": (4, 24, 256), "default": (8, 48, 512), "large": (24, 64, 512)}
"""studies, slices per study, rows (= columns)."""


def write_archive(root: Path, studies: int, slices: int, rows: int, syntax: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:rows]
    body = np.hypot((xx - rows / 2) / (0.45 * rows), (yy - rows / 2) / (0.35 * rows)) < 1
    n = 0
    for s in range(studies):
        study, series = generate_uid(entropy_srcs=[str(seed), str(s)]), generate_uid()
        for k in range(slices):
            hu = np.where(body, 40, -1000) + rng.normal(0, 15, (rows, rows))
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
            ds.Modality, ds.PatientID, ds.PatientName = "CT", f"BENCH-{s:03d}", "Bench^Patient"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 2
            ds.StudyDate, ds.InstanceNumber = "20200101", k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-175.0, -175.0, 2.5 * k]
            ds.PixelSpacing, ds.SliceThickness = [350 / rows, 350 / rows], 2.5
            ds.Rows = ds.Columns = rows
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
            ds.PixelData = np.clip(np.rint(hu), -1024, 3071).astype(np.int16).tobytes()
            if syntax == "rle":
                ds.compress(RLELossless)
            path = root / f"{s:03d}" / f"{k:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            n += 1
    return n


def _plain(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        total += int(pydicom.dcmread(p).pixel_array.shape[0] > 0)
    return total


def _ours(paths: list[Path]) -> int:
    return int(preprocess(read_study(paths), DEFAULT_SPEC).shape[0])


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn(*args)``."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t, time.process_time() - c


def load() -> float:
    return os.getloadavg()[0]


WORKER_CPU: list[float] = []
"""CPU seconds of the ingest's worker processes, summed when its pool shuts down."""


def _proc_cpu(pid: int) -> float:
    """utime + stime of a live process, from /proc (0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _count_worker_cpu() -> None:
    """Wrap the ingest pool's shutdown to record its workers' CPU time (benchmark only:
    the workers are children of the forkserver, so RUSAGE_CHILDREN does not see them)."""
    real_reset = ingest_module._Workers.reset

    def reset(self) -> None:  # type: ignore[no-untyped-def]
        ex = self._ex
        if ex is not None:
            WORKER_CPU.append(sum(_proc_cpu(pid) for pid in list(ex._processes or {})))
        real_reset(self)

    ingest_module._Workers.reset = reset  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--preset", choices=sorted(PRESETS), default="default")
    g.add_argument("--syntax", choices=["native", "rle"], default="native")
    g.add_argument("--seed", type=int, default=0)
    r = ap.add_argument_group("run")
    r.add_argument("--workers", type=int, default=default_workers(), help="'all cores' run")
    r.add_argument("--repeat", type=int, default=2, help="best of N")
    args = ap.parse_args()
    studies, slices, rows = PRESETS[args.preset]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        n = write_archive(tmp / "dicom", studies, slices, rows, args.syntax, args.seed)
        groups, _ = scan_folder(tmp / "dicom")
        series = [sorted(p) for p in groups.values()]
        files = [p for s in series for p in s]
        print(f"machine: {os.cpu_count()} cpus, load average {load():.2f} (1 min)")
        print(f"data: {studies} studies x {slices} slices of {rows}x{rows}, {args.syntax}, {n} files")
        w = args.workers
        results: dict[str, float] = {}
        cpu_of: dict[str, float] = {}

        def best(name: str, fn, *a, in_process: bool = True) -> None:
            before = load()
            runs = [timed(fn, *a) for _ in range(args.repeat)]
            wall, cpu = min(runs)
            results[name] = wall
            cpu_of[name] = min(c for _, c in runs)
            share = f"  core share {cpu / wall:.2f}" if in_process else ""
            print(f"  {name:<32} {n / wall:8.1f} slices/s  ({wall:.2f} s){share}  load {before:.1f}->{load():.1f}")

        best("plain dcmread+pixel_array x1", _plain, files)
        best("ours read+preprocess x1", lambda: [_ours(s) for s in series])
        ctx = _context()  # the ingest's forkserver (its preloads), shared by every pool here
        with ctx.Pool(w) as pool:
            pool.map(_plain, [[f] for f in files[:w]])  # warm the workers
            best(f"plain dcmread+pixel_array x{w}", lambda: pool.map(_plain, series), in_process=False)
            best(f"ours read+preprocess x{w}", lambda: pool.map(_ours, series), in_process=False)
        pseudo = Pseudonymizer(b"bench-secret-0123456789")

        def ingest(workers: int) -> None:
            store_dir = tmp / f"store-{workers}-{time.perf_counter_ns()}"
            ingest_folder(tmp / "dicom", CohortStore(store_dir, create=True), pseudonymizer=pseudo, workers=workers)

        t = time.perf_counter()
        ex = _start_pool(w)
        start_s = time.perf_counter() - t
        if ex is not None:
            ex.shutdown()
        print(f"  worker pool start (x{w}, forkserver running)  {start_s:.2f} s")
        one, many = "ingest_folder workers=1", f"ingest_folder workers={w}"
        runs: dict[str, list[float]] = {one: [], many: []}
        cpu_one: list[float] = []
        cpu_many: list[tuple[float, float]] = []  # (parent, workers)
        _count_worker_cpu()
        for _ in range(args.repeat):  # alternate, so a load change hits both
            for name, k in ((one, 1), (many, w)):
                before = load()
                WORKER_CPU.clear()
                wall, cpu = timed(ingest, k)
                runs[name].append(wall)
                if k == 1:
                    cpu_one.append(cpu)
                    extra = f"  core share {cpu / wall:.2f}, CPU {cpu:.2f} s"
                else:
                    cpu_many.append((cpu, sum(WORKER_CPU)))
                    extra = f"  CPU parent {cpu:.2f} s + workers {sum(WORKER_CPU):.2f} s"
                print(f"  {name:<32} {n / wall:8.1f} slices/s  ({wall:.2f} s){extra}  load {before:.1f}->{load():.1f}")
        results[one], results[many] = min(runs[one]), min(runs[many])
        # Load-independent check of the pool's overhead: CPU seconds, not wall time.
        serial = min(cpu_one)
        parent, workers = min(cpu_many, key=sum)
        bound = serial / max(parent, (parent + workers) / w)
        print(
            f"  CPU time (load-independent): workers=1 {serial:.2f} s; workers={w} parent "
            f"{parent:.2f} + workers {workers:.2f} = {parent + workers:.2f} s "
            f"({(parent + workers) / serial:.2f}x the work); the parent's serial share bounds "
            f"the speed-up on {w} free cores at {bound:.2f}x"
        )
        print("ratios (same run, best of each):")
        print(f"  ours / plain, one process        {results['plain dcmread+pixel_array x1'] / results['ours read+preprocess x1']:.2f}x")
        print(f"  same, by CPU time (less load-sensitive) {cpu_of['plain dcmread+pixel_array x1'] / cpu_of['ours read+preprocess x1']:.2f}x")
        print(f"  ours x{w} / ours x1 (read+prep)   {results['ours read+preprocess x1'] / results[f'ours read+preprocess x{w}']:.2f}x")
        print(f"  plain x{w} / plain x1            {results['plain dcmread+pixel_array x1'] / results[f'plain dcmread+pixel_array x{w}']:.2f}x")
        print(f"  ingest workers={w} / workers=1    {results[one] / results[many]:.2f}x")
        print(f"load average after: {load():.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
