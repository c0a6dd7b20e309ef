"""A cohort with real anatomy: lesions of the synthetic phenotypes inserted into real CT.

:func:`synth_background` takes one real CT study as the anatomical background (e.g. the
shared LIDC-IDRI-0001 chest) and makes each patient from it: a random z sub-range (at
least ``min_mm``, the whole study at most), a left-right flip half of the time and an
in-plane shift of up to 20 mm, then one lesion of a phenotype of :mod:`encoders.synth`
(same sizes, HU, spicules and ground glass, :func:`encoders.synth.lesion_voxels`) at a
random point at least its radius + 4 mm inside the lungs. The result is resampled to one
of the simulated scanners' grids and written through the same scanner simulation (noise,
kernel, HU calibration, storage) and DICOM writer as the phantoms; outcomes depend on the
phenotype only, as there. Readers: ``regions.csv`` holds two readers' boxes per lesion
(``patient_id,reader,z0,y0,x0,z1,y1,x1``, half-open voxels of the written series), each
with its own jitter of the centre (sd 1.5 mm) and size (sd 15 %).

Where the background has its own marked lesions, pass ``avoid_mm`` (z ranges of study mm
to leave out) so that the inserted lesion is the only lesion of a patient.
"""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from encoders.dicom import read_study, scan_folder
from encoders.grid import _resample, block_mean
from encoders.roi import lung_region
from encoders.synth import (
    _SUBSAMPLES,
    PHENOTYPES,
    SCANNERS,
    SynthInfo,
    _grade,
    _Patient,
    _scanner_image,
    _survival,
    _write_patient,
    cohort_info,
    lesion_voxels,
)

__all__ = ["insert_lesion", "synth_background"]

READERS = ("reader1", "reader2")


def insert_lesion(
    vol: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, phenotype: str
) -> tuple[tuple[float, float, float], float] | None:
    """Insert one lesion of ``phenotype`` in the lungs of ``vol`` ``(z, y, x)`` HU (in
    place), at least its radius + 4 mm inside them; its centre (study mm: voxel ``i``
    spans ``[i s, (i + 1) s)``) and radius, or None when the lungs have no room."""
    size = phenotype.split("_", 1)[0]
    radius = float(rng.uniform(6.0, 10.0) if size == "small" else rng.uniform(14.0, 22.0))
    f = tuple(max(1, int(3.0 / float(s))) for s in spacing)
    small = block_mean(vol, f)
    ssp = [float(s) * k for s, k in zip(spacing, f, strict=True)]
    inside = ndimage.distance_transform_edt(lung_region(small), sampling=ssp) >= radius + 4.0
    cand = np.argwhere(inside)
    if len(cand) == 0:
        return None
    c = cand[int(rng.integers(len(cand)))]
    starts = [(n - (n // k) * k) // 2 for n, k in zip(vol.shape, f, strict=True)]
    centre = tuple((s0 + (ci + 0.5) * k) * float(s)
                   for ci, k, s0, s in zip(c, f, starts, spacing, strict=True))
    reach = radius * 2.0 + 6.0
    idx = [np.nonzero(np.abs((np.arange(n) + 0.5) * float(s) - m) < reach)[0]
           for n, s, m in zip(vol.shape, spacing, centre, strict=True)]
    box = np.ix_(*idx)
    dz = ((idx[0] + 0.5) * spacing[0] - centre[0])[:, None, None]
    dy = ((idx[1] + 0.5) * spacing[1] - centre[1])[None, :, None]
    dx = ((idx[2] + 0.5) * spacing[2] - centre[2])[None, None, :]
    dist = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
    w, values = lesion_voxels(rng, phenotype, radius, dist, dx, dy, dz)
    bg = vol[box]
    blended = bg * (1 - w) + values * w
    if phenotype.endswith("ground_glass"):
        blended = np.maximum(blended, bg)  # vessels run through ground glass
    vol[box] = blended
    return centre, radius


def _background(rng: np.random.Generator, base: np.ndarray, sp: Sequence[float],
                min_mm: float, avoid: list[tuple[int, int]]) -> np.ndarray:
    """A random z sub-range of ``base`` (outside the ``avoid`` slice ranges), flipped
    left-right half of the time, shifted in-plane by up to 20 mm (air comes in)."""
    n = base.shape[0]
    free = np.ones(n, dtype=bool)
    for a, b in avoid:
        free[max(0, a):min(n, b)] = False
    runs, start = [], None
    for i in range(n + 1):
        if i < n and free[i]:
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    need = max(1, round(min_mm / sp[0]))
    runs = [r for r in runs if r[1] - r[0] >= min(need, n)] or runs or [(0, n)]
    lens = np.array([b - a for a, b in runs], dtype=float)
    a, b = runs[int(rng.choice(len(runs), p=lens / lens.sum()))]
    length = int(rng.integers(min(need, b - a), b - a + 1))
    z0 = int(rng.integers(a, b - length + 1))
    vol = base[z0 : z0 + length]
    if rng.random() < 0.5:
        vol = vol[:, :, ::-1]
    shift = rng.uniform(-20, 20, 2) / np.asarray(sp[1:], dtype=float)
    return ndimage.shift(np.ascontiguousarray(vol, dtype=np.float32), (0, *shift), order=0,
                         mode="constant", cval=-1024.0)


def synth_background(
    out: Path,
    background: Path,
    *,
    patients: int,
    seed: int = 0,
    min_mm: float = 100.0,
    avoid_mm: Sequence[tuple[float, float]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> SynthInfo:
    """Write a real-anatomy cohort under ``out`` (layout of :func:`encoders.synth.synth_cohort`
    plus ``regions.csv``) from the first study found under ``background``. Scanners and
    phenotypes are spread evenly as there; everything is deterministic for a seed."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    groups, _rejected = scan_folder(Path(background))
    if not groups:
        raise ValueError(f"no DICOM study under {background}")
    study = read_study(groups[sorted(groups)[0]])
    if study.modality != "CT":
        raise ValueError(f"the background must be a CT study, got {study.modality}")
    base = np.asarray(study.volume, dtype=np.float32)
    sp = tuple(float(s) for s in study.spacing)
    avoid = [(int(a // sp[0]), int(np.ceil(b / sp[0]))) for a, b in avoid_mm]
    out = Path(out)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    cohort_rng = np.random.default_rng([seed, 0xB4C6])
    scanner_idx = cohort_rng.permutation(np.arange(patients) % len(SCANNERS))
    pheno_idx = cohort_rng.permutation(np.arange(patients) % len(PHENOTYPES))
    localizer = cohort_rng.permutation(np.arange(patients) % 3 == 0)
    rows_out: list[_Patient] = []
    boxes: list[tuple[str, str, list[int]]] = []
    n_files = 0
    for i in range(patients):
        rng = np.random.default_rng([seed, i, 0xB4C6])
        sc = SCANNERS[int(scanner_idx[i])]
        phenotype = PHENOTYPES[int(pheno_idx[i])]
        for _attempt in range(20):
            vol = _background(rng, base, sp, min_mm, avoid)
            placed = insert_lesion(vol, sp, rng, phenotype)
            if placed is not None:
                break
        else:
            raise ValueError("the background's lungs have no room for a lesion; give a chest CT")
        centre, radius = placed
        # onto the scanner's grid: its pixel size and slice thickness, centred
        ps, th = sc.fov_mm / sc.rows, sc.thickness_mm
        ext = [n * s for n, s in zip(vol.shape, sp, strict=True)]
        shape = (max(1, round(ext[0] / th)), sc.rows, sc.rows)
        out_sp = (th, ps, ps)
        origin = [(e - n * s) / 2 for e, n, s in zip(ext, shape, out_sp, strict=True)]
        slices = _resample(vol, sp, shape, out_sp, origin, -1024.0)
        voxel = tuple(round((c - o) / s - 0.5, 2)
                      for c, o, s in zip(centre, origin, out_sp, strict=True))
        image = _scanner_image(rng, sc, slices)
        time, event = _survival(rng, phenotype)
        study_date = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 9 * 365)))
        birth = study_date - _dt.timedelta(days=int(rng.integers(45 * 365, 85 * 365)))
        p = _Patient(
            index=i, patient_id=f"SYNR-{i:05d}", scanner=sc, phenotype=phenotype,
            lesion_radius_mm=round(radius, 2), lesion_voxel=voxel,
            time=time, event=event, grade=_grade(rng, phenotype), study_date=study_date,
            birth_date=birth, sex="F" if rng.uniform() < 0.5 else "M",
            localizer=bool(localizer[i]),
        )
        z_slices = -ext[0] / 2 + (np.arange(shape[0]) + 0.5) * th
        fine = np.repeat(slices, _SUBSAMPLES, axis=0)
        n_files += _write_patient(dicom_dir, p, seed, rng, image, fine, z_slices)
        for reader in READERS:
            c = [v + rng.normal(0, 1.5 / s) for v, s in zip(voxel, out_sp, strict=True)]
            half = [radius * max(0.5, 1 + rng.normal(0, 0.15)) / s for s in out_sp]
            lo = [max(0, int(np.floor(cc - h + 0.5))) for cc, h in zip(c, half, strict=True)]
            hi = [min(n, max(a + 1, int(np.ceil(cc + h + 0.5))))
                  for cc, h, a, n in zip(c, half, lo, shape, strict=True)]
            boxes.append((p.patient_id, reader, [*lo, *hi]))
        rows_out.append(p)
        if progress is not None:
            progress(i + 1, patients)
    return _write_tables(out, rows_out, boxes, n_files, dicom_dir)


def _write_tables(out: Path, rows_out: list[_Patient], boxes: list[tuple[str, str, list[int]]],
                  n_files: int, dicom_dir: Path) -> SynthInfo:
    """The phantom cohort's outcome and truth tables, and the readers' boxes."""
    with open(out / "regions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "reader", "z0", "y0", "x0", "z1", "y1", "x1"])
        for pid, reader, box in boxes:
            w.writerow([pid, reader, *box])
    return cohort_info(out, rows_out, n_files, dicom_dir)
