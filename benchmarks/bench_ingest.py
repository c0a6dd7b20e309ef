"""Ingest throughput: our read + preprocess against plain pydicom, one process and all cores.

Writes a seeded synthetic archive (CT studies of 512 x 512 slices, explicit VR little
endian or a compressed syntax), then times on the same files:

* ``plain``  — ``pydicom.dcmread(f).pixel_array`` for every file (the reference);
* ``ours``   — :func:`encoders.dicom.read_study` + :func:`encoders.dicom.preprocess` per
  study (header pass, checks, geometry, HU, resampling);
* ``ingest`` — the whole ``indexing.ingest.ingest_folder`` (scan, read, preprocess,
  pseudonymise, write the store) with ``--workers 1`` and with all cores;

and prints slices/s and the ratios measured in this run. Nothing is asserted.

    python benchmarks/bench_ingest.py                 # default preset
    python benchmarks/bench_ingest.py --preset small  # quick look
"""

from __future__ import annotations

import argparse
import multiprocessing
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

from encoders.deid import Pseudonymizer
from encoders.dicom import preprocess, read_study, scan_folder
from encoders.spec import DEFAULT_SPEC
from indexing.ingest import default_workers, ingest_folder
from indexing.store import CohortStore

PRESETS = {"small": (4, 24, 256), "default": (8, 48, 512)}  # studies, slices, rows


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


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


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
        print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} (1 min)")
        print(f"data: {studies} studies x {slices} slices of {rows}x{rows}, {args.syntax}, {n} files")
        w = args.workers
        results: dict[str, float] = {}

        def best(name: str, fn, *a) -> None:
            results[name] = min(timed(fn, *a) for _ in range(args.repeat))
            print(f"  {name:<28} {n / results[name]:8.1f} slices/s")

        best("plain dcmread+pixel_array x1", _plain, files)
        best("ours read+preprocess x1", lambda: [_ours(s) for s in series])
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(w) as pool:
            pool.map(_plain, [[f] for f in files[:w]])  # warm the workers
            best(f"plain dcmread+pixel_array x{w}", lambda: pool.map(_plain, series))
            best(f"ours read+preprocess x{w}", lambda: pool.map(_ours, series))
        pseudo = Pseudonymizer(b"bench-secret-0123456789")

        def ingest(workers: int) -> None:
            store_dir = tmp / f"store-{workers}-{time.perf_counter_ns()}"
            ingest_folder(tmp / "dicom", CohortStore(store_dir, create=True), pseudonymizer=pseudo, workers=workers)

        best("ingest_folder workers=1", ingest, 1)
        best(f"ingest_folder workers={w}", ingest, w)
        print("ratios (same run):")
        print(f"  ours / plain, one process        {results['plain dcmread+pixel_array x1'] / results['ours read+preprocess x1']:.2f}x")
        print(f"  ours x{w} / ours x1 (read+prep)   {results['ours read+preprocess x1'] / results[f'ours read+preprocess x{w}']:.2f}x")
        print(f"  plain x{w} / plain x1            {results['plain dcmread+pixel_array x1'] / results[f'plain dcmread+pixel_array x{w}']:.2f}x")
        print(f"  ingest workers={w} / workers=1    {results['ingest_folder workers=1'] / results[f'ingest_folder workers={w}']:.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
