"""A synthetic CT cohort with known ground truth: the test bed of the whole pipeline.

Each patient gets one chest CT study written as real CT Image Storage DICOM, from one of
five simulated scanners that differ in noise level and texture, reconstruction kernel
(smooth vs sharpening), HU calibration, slice thickness, field of view / pixel spacing,
signed vs unsigned pixel storage, padding outside the reconstruction circle and
InstanceNumber order. Pixels are 1.9-2.4 mm (128-192 rows over 300-360 mm): coarser than
a clinical CT (0.6-0.8 mm), yet fine enough that a small lesion's spicules span pixels. At
3.8-4.7 mm pixels they do not, and small solid and small spiculated lesions are barely
separable even with labels. The anatomy (body, fat rim, lungs with
vessel texture, spine, ribs) varies per patient; a lung lesion carries the phenotype (size
class x texture class). Survival depends on the phenotype only and the scanner is drawn
independently of it, so an encoder that groups patients by scanner rather than by lesion is
visibly wrong.

Layout under ``out``::

    dicom/<index>/<series_number>/<instance>.dcm   one study per patient
    outcomes.csv   patient_id,time,event,phenotype,grade   (time in months)
    truth.csv      patient_id,scanner,phenotype,lesion_radius_mm,lesion_slice,lesion_row,
                   lesion_col (the lesion centre in voxels of the series, slices ascending)

DICOM headers deliberately carry identifying fake values (names, birth dates,
institution, physicians, accession numbers) so de-identification is exercised.
Everything is deterministic for a seed; patient ``i`` depends only on ``(seed, i)`` and
on the scanner / phenotype draw for the cohort.
"""

from __future__ import annotations

import csv
import datetime as _dt
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

__all__ = ["PHENOTYPES", "SCANNERS", "ScannerProfile", "SynthInfo", "lesion_voxels", "synth_cohort"]


@dataclass(frozen=True)
class ScannerProfile:
    """One simulated scanner / protocol."""

    key: str
    manufacturer: str
    model: str
    software: str
    kernel: str
    kvp: float
    exposure: int
    noise_hu: float  # std of the (kernel-shaped) noise in HU
    kernel_kind: str  # "smooth" (gaussian) or "sharp" (unsharp mask)
    kernel_sigma_mm: float
    sharpen: float  # unsharp-mask amount for "sharp"
    hu_offset: float  # calibration offset
    hu_gain: float  # calibration gain around water (0 HU)
    thickness_mm: float  # slice thickness = spacing between slices
    rows: int  # rows = columns
    fov_mm: float
    signed: bool  # PixelRepresentation 1 (intercept 0) vs 0 (intercept -1024, 12 bits)
    instance_order: str  # "ascending" / "descending" (z) or "random"
    padding: bool  # values outside the reconstruction circle = PixelPaddingValue


SCANNERS: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        key="acme_lumen64",
        manufacturer="Acme Imaging",
        model="Lumen 64",
        software="LM 4.2.1",
        kernel="SOFT-A",
        kvp=120,
        exposure=180,
        noise_hu=10.0,
        kernel_kind="smooth",
        kernel_sigma_mm=1.6,
        sharpen=0.0,
        hu_offset=-20.0,
        hu_gain=1.0,
        thickness_mm=2.5,
        rows=192,
        fov_mm=360.0,
        signed=True,
        instance_order="descending",
        padding=False,
    ),
    ScannerProfile(
        key="borealis_aurora128",
        manufacturer="Borealis Medical",
        model="Aurora CT 128",
        software="AUR-VB20",
        kernel="LUNG-SHARP",
        kvp=140,
        exposure=220,
        noise_hu=25.0,
        kernel_kind="sharp",
        kernel_sigma_mm=2.0,
        sharpen=1.0,
        hu_offset=25.0,
        hu_gain=1.03,
        thickness_mm=5.0,
        rows=128,
        fov_mm=300.0,
        signed=False,
        instance_order="random",
        padding=False,
    ),
    ScannerProfile(
        key="cygnus_orion16",
        manufacturer="Cygnus Systems",
        model="Orion 16",
        software="ORN 7.0",
        kernel="STANDARD",
        kvp=120,
        exposure=150,
        noise_hu=15.0,
        kernel_kind="smooth",
        kernel_sigma_mm=0.8,
        sharpen=0.0,
        hu_offset=5.0,
        hu_gain=1.0,
        thickness_mm=3.0,
        rows=160,
        fov_mm=320.0,
        signed=True,
        instance_order="ascending",
        padding=True,
    ),
    ScannerProfile(
        key="draco_vega40",
        manufacturer="Draco Healthcare",
        model="Vega 40",
        software="V40-2.3",
        kernel="FC52",
        kvp=100,
        exposure=120,
        noise_hu=30.0,
        kernel_kind="sharp",
        kernel_sigma_mm=1.5,
        sharpen=0.6,
        hu_offset=-8.0,
        hu_gain=0.97,
        thickness_mm=4.0,
        rows=144,
        fov_mm=340.0,
        signed=False,
        instance_order="random",
        padding=False,
    ),
    ScannerProfile(
        key="eridani_sirius256",
        manufacturer="Eridani Scientific",
        model="Sirius 256",
        software="SRS 11.1",
        kernel="IR-SMOOTH",
        kvp=120,
        exposure=90,
        noise_hu=8.0,
        kernel_kind="smooth",
        kernel_sigma_mm=2.2,
        sharpen=0.0,
        hu_offset=12.0,
        hu_gain=1.0,
        thickness_mm=3.0,
        rows=176,
        fov_mm=330.0,
        signed=True,
        instance_order="descending",
        padding=False,
    ),
)

SIZE_CLASSES = ("small", "large")
TEXTURE_CLASSES = ("solid", "ground_glass", "spiculated")
PHENOTYPES: tuple[str, ...] = tuple(f"{s}_{t}" for s in SIZE_CLASSES for t in TEXTURE_CLASSES)

# Median survival (months) and base grade (1-4) of each phenotype.
_MEDIAN_MONTHS = {
    "small_ground_glass": 60.0,
    "small_solid": 36.0,
    "small_spiculated": 20.0,
    "large_ground_glass": 30.0,
    "large_solid": 15.0,
    "large_spiculated": 8.0,
}
_BASE_GRADE = {
    "small_ground_glass": 1,
    "small_solid": 2,
    "small_spiculated": 3,
    "large_ground_glass": 2,
    "large_solid": 3,
    "large_spiculated": 4,
}
_WEIBULL_SHAPE = 1.3
_ADMIN_CENSOR_MONTHS = 72.0
_COVERAGE_MM = 100.0
_SUBSAMPLES = 3  # sub-planes per slice (slice-thickness partial volume)
_UID_ROOT = "cohortsim-synth"


@dataclass
class SynthInfo:
    """What :func:`synth_cohort` wrote."""

    n_patients: int
    n_files: int
    scanners: list[str]
    root: Path
    dicom_dir: Path
    outcomes_csv: Path
    truth_csv: Path
    phenotypes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- anatomy


@dataclass
class _Patient:
    index: int
    patient_id: str
    scanner: ScannerProfile
    phenotype: str
    lesion_radius_mm: float
    lesion_voxel: tuple[float, float, float]
    time: float
    event: int
    grade: str
    study_date: _dt.date
    birth_date: _dt.date
    sex: str
    localizer: bool


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]):
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return f / max(float(f.std()), 1e-6)


def lesion_voxels(
    rng: np.random.Generator, phenotype: str, radius: float, dist: np.ndarray,
    dx: np.ndarray, dy: np.ndarray, dz: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One lesion of ``phenotype`` (size class x texture class) and ``radius`` mm: its
    blending weight ``w`` in [0, 1] and HU ``values`` over a box whose voxel offsets
    from the lesion centre are ``dz, dy, dx`` (mm, broadcastable) at distance ``dist``.
    Spiculated lesions have 6-10 spicules and heterogeneous HU (a necrotic core when
    large), ground glass a soft 3 mm edge at -600..-400 HU (blend with ``max(.., bg)``
    so vessels run through), solid ones 25-55 HU."""
    size, texture = phenotype.split("_", 1)
    r_eff = np.full(dist.shape, radius, np.float32)
    edge = 0.8
    if texture == "spiculated":
        n_sp = int(rng.integers(6, 11))
        dirs = rng.standard_normal((n_sp, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        cosang = [(dx * u[0] + dy * u[1] + dz * u[2]) / dist for u in dirs]
        spikes = sum(rng.uniform(0.6, 1.2) * np.clip(c, 0, None) ** 40 for c in cosang)
        r_eff = radius * (1.0 + spikes)
        lesion_hu = rng.uniform(20, 45)
    elif texture == "ground_glass":
        edge = 3.0
        lesion_hu = rng.uniform(-600, -400)
    else:
        lesion_hu = rng.uniform(25, 55)
    w = np.clip((r_eff - dist) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    values = np.full(dist.shape, lesion_hu, np.float32)
    if texture == "spiculated":
        het = _smooth_field(rng, dist.shape, (1.5, 1.5, 1.5))
        values += 20.0 * het
        if size == "large":
            values[dist < 0.4 * radius] = rng.uniform(-15, 10)  # necrotic core
    return w, values


def _phantom(
    rng: np.random.Generator, sc: ScannerProfile, phenotype: str
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, tuple[float, float, float]]:
    """Noise-free HU of one patient on the scanner grid.

    Returns ``(slices (n, N, N) float32, fine sub-planes (n*S, N, N), lesion radius mm,
    z of the slice centres (n,), lesion centre (slice, row, column) of the series)``.
    Coordinates are patient LPS mm: x left, y posterior,
    z superior; the image origin is the first pixel centre at (-fov/2 + ps/2, same, z).
    """
    n_px = sc.rows
    ps = sc.fov_mm / n_px
    n_sl = round(_COVERAGE_MM / sc.thickness_mm)
    n_f = n_sl * _SUBSAMPLES
    coords = -sc.fov_mm / 2 + ps * (np.arange(n_px, dtype=np.float32) + 0.5)
    z_start = float(rng.uniform(-55.0, -45.0))
    z_slices = z_start + sc.thickness_mm * np.arange(n_sl)
    sub = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5
    z_fine = (z_slices[:, None] + sub[None, :] * sc.thickness_mm).reshape(-1).astype(np.float32)

    # Patient-specific body habitus and table centring.
    cx, cy = rng.uniform(-8, 8), rng.uniform(-8, 8)
    a, b = rng.uniform(118, 140), rng.uniform(84, 108)
    fat = rng.uniform(6, 18)
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    body_r = (x / a) ** 2 + (y / b) ** 2
    inner_r = (x / (a - fat)) ** 2 + (y / (b - fat)) ** 2

    img2d = np.full((n_px, n_px), -1000.0, np.float32)
    img2d[body_r < 1] = -100.0 + rng.normal(0, 5)
    img2d[inner_r < 1] = 40.0 + rng.normal(0, 5)
    # Soft-tissue texture (organs) on a 2D smooth field.
    tex = _smooth_field(rng, (n_px, n_px), (6.0 / ps, 6.0 / ps))
    img2d += np.where(inner_r < 1, 8.0 * tex, 0.0).astype(np.float32)
    # Spine: vertebral body (cortex + cancellous bone) and canal.
    sr = rng.uniform(13, 18)
    sy = (b - fat) * 0.62
    d_sp = np.sqrt(x**2 + (y - sy) ** 2)
    img2d[d_sp < sr] = 700.0 + rng.normal(0, 30)
    img2d[d_sp < sr - 3.0] = 260.0 + rng.normal(0, 20)
    d_can = np.sqrt(x**2 + (y - sy - sr - 7.0) ** 2)
    img2d[d_can < 7.0] = 20.0

    vol = np.broadcast_to(img2d, (n_f, n_px, n_px)).copy()

    # Ribs: bone arcs just inside the fat rim, in oblique bands along z.
    rib_ring = (inner_r > 0.86) & (inner_r < 0.93)
    theta = np.arctan2(y, x)
    phase = rng.uniform(0, 2 * np.pi)
    bands = np.sin(2 * np.pi * z_fine[:, None, None] / 24.0 + 1.5 * theta[None] + phase) > 0.55
    vol[bands & rib_ring[None]] = 550.0

    # Lungs: two ellipses, shrinking toward the base; vessel texture inside.
    lz = np.clip(1.0 - ((z_fine - rng.uniform(-10, 10)) / 85.0) ** 2, 0.35, 1.0)
    lung_a, lung_b = (a - fat) * rng.uniform(0.30, 0.36), (b - fat) * rng.uniform(0.62, 0.72)
    lung_cy = -(b - fat) * 0.08
    lungs = np.zeros((n_f, n_px, n_px), bool)
    lung_centres = []
    for side in (-1, 1):
        lcx = side * (a - fat) * rng.uniform(0.42, 0.48)
        lung_centres.append((lcx, lung_cy))
        r2 = ((x - lcx) / lung_a) ** 2 + ((y - lung_cy) / lung_b) ** 2
        lungs |= r2[None] < (lz**2)[:, None, None]
    # Vessels: where two smooth random fields both cross zero (curves in 3D -> tubes).
    f_shape = (n_sl, n_px, n_px)
    sig = (4.0 / sc.thickness_mm, 4.0 / ps, 4.0 / ps)
    f1 = _smooth_field(rng, f_shape, sig)
    f2 = _smooth_field(rng, f_shape, sig)
    vessels = (np.abs(f1) < 0.3) & (np.abs(f2) < 0.3)
    vessels = np.repeat(vessels, _SUBSAMPLES, axis=0)
    parenchyma = -850.0 + rng.normal(0, 15)
    vol[lungs] = parenchyma
    vol[lungs & vessels] = 30.0

    # Lesion in one lung, near the middle of the coverage.
    size = phenotype.split("_", 1)[0]
    lcx, lcy = lung_centres[int(rng.integers(2))]
    radius = float(rng.uniform(6.0, 10.0) if size == "small" else rng.uniform(14.0, 22.0))
    zc = float(rng.uniform(-12, 12))
    px = lcx + rng.uniform(-0.3, 0.3) * lung_a
    py = lcy + rng.uniform(-0.3, 0.3) * lung_b
    reach = radius * 2.0 + 6.0
    zs = np.nonzero(np.abs(z_fine - zc) < reach)[0]
    ys = np.nonzero(np.abs(coords - cy - py) < reach)[0]
    xs = np.nonzero(np.abs(coords - cx - px) < reach)[0]
    if len(zs) and len(ys) and len(xs):
        box = np.ix_(zs, ys, xs)
        dz = (z_fine[zs] - zc)[:, None, None]
        dy = (coords[ys] - cy - py)[None, :, None]
        dx = (coords[xs] - cx - px)[None, None, :]
        dist = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
        w, values = lesion_voxels(rng, phenotype, radius, dist, dx, dy, dz)
        bg = vol[box]
        blended = bg * (1 - w) + values * w
        if phenotype.endswith("ground_glass"):
            blended = np.maximum(blended, bg)  # vessels run through ground glass
        vol[box] = blended

    slices = vol.reshape(n_sl, _SUBSAMPLES, n_px, n_px).mean(axis=1)
    # the lesion centre as voxel indices of the series read back in ascending slice order
    # (slice, row, column): what a box given to the encoder would use
    voxel = ((zc - z_start) / sc.thickness_mm, (cy + py + sc.fov_mm / 2) / ps - 0.5,
             (cx + px + sc.fov_mm / 2) / ps - 0.5)
    return slices, vol, radius, z_slices, voxel


def _scanner_image(rng: np.random.Generator, sc: ScannerProfile, slices: np.ndarray) -> np.ndarray:
    """Apply the scanner: kernel, shaped noise, calibration. ``(n, N, N)`` HU float32."""
    ps = sc.fov_mm / sc.rows
    s = sc.kernel_sigma_mm / ps

    def kernel(v: np.ndarray) -> np.ndarray:
        if sc.kernel_kind == "smooth":
            return ndimage.gaussian_filter(v, (0, s, s))
        base = ndimage.gaussian_filter(v, (0, 0.5, 0.5))
        return base + sc.sharpen * (base - ndimage.gaussian_filter(base, (0, s, s)))

    img = kernel(slices)
    noise = kernel(rng.standard_normal(slices.shape).astype(np.float32))
    noise *= sc.noise_hu / max(float(noise.std()), 1e-6)
    img = (img + noise) * sc.hu_gain + sc.hu_offset
    if sc.padding:
        coords = -sc.fov_mm / 2 + ps * (np.arange(sc.rows) + 0.5)
        outside = coords[None, :] ** 2 + coords[:, None] ** 2 > (sc.fov_mm / 2) ** 2
        img[:, outside] = np.nan  # marked; becomes PixelPaddingValue
    return img.astype(np.float32)


# ---------------------------------------------------------------------------- writing


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_UID_ROOT, str(seed), *(str(p) for p in parts)]))


def _base_dataset(p: _Patient, seed: int, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    date = p.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = f"{9 + p.index % 8:02d}{(7 * p.index) % 60:02d}00"
    ds.AccessionNumber = f"ACC{seed % 1000:03d}{p.index:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = p.scanner.manufacturer
    ds.ManufacturerModelName = p.scanner.model
    ds.SoftwareVersions = p.scanner.software
    ds.InstitutionName = "Synthetic General Hospital"
    ds.InstitutionAddress = "1 Nowhere Road, Faketown"
    ds.StationName = f"CTSTATION{p.index % 3 + 1}"
    ds.DeviceSerialNumber = f"SN-{zlib.crc32(p.scanner.key.encode()) % 10**6:06d}"
    ds.ReferringPhysicianName = "Fake^Referrer^Dr"
    ds.OperatorsName = "Tech^Synthetic"
    ds.StudyDescription = "CT CHEST SYNTHETIC"
    ds.PatientName = f"Synthetic^Patient{p.index}"
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{(p.study_date - p.birth_date).days // 365:03d}Y"
    ds.StudyInstanceUID = _uid(seed, p.index, "study")
    ds.StudyID = f"{p.index + 1}"
    ds.FrameOfReferenceUID = _uid(seed, p.index, "for")
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = "synthetic data generated by cohortsim"
    ds.KVP = p.scanner.kvp
    ds.Exposure = p.scanner.exposure
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleType = "HU"
    return ds


def _storage(sc: ScannerProfile) -> tuple[int, int, float, int, int]:
    """(PixelRepresentation, BitsStored, intercept, min stored, max stored)."""
    if sc.signed:
        return 1, 16, 0.0, -32768, 32767
    return 0, 12, -1024.0, 0, 4095


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_patient(
    out_dir: Path,
    p: _Patient,
    seed: int,
    rng: np.random.Generator,
    image: np.ndarray,
    fine: np.ndarray,
    z_slices: np.ndarray,
) -> int:
    sc = p.scanner
    n_sl, n_px = image.shape[0], image.shape[1]
    ps = sc.fov_mm / n_px
    origin = -sc.fov_mm / 2 + ps / 2
    pr, bits_stored, intercept, lo, hi = _storage(sc)
    stored_dtype = np.int16 if pr == 1 else np.uint16
    padding_value = -2000
    pad_mask = np.isnan(image)
    stored = np.clip(np.rint(np.nan_to_num(image, nan=0.0) - intercept), lo, hi)
    if sc.padding:
        stored[pad_mask] = padding_value
    stored = stored.astype(stored_dtype)
    patient_dir = out_dir / f"{p.index:05d}"
    written = 0

    series_number = 2
    series_uid = _uid(seed, p.index, "series", series_number)
    if sc.instance_order == "ascending":
        instance = np.arange(1, n_sl + 1)
    elif sc.instance_order == "descending":
        instance = np.arange(n_sl, 0, -1)
    else:
        instance = rng.permutation(n_sl) + 1
    for k in rng.permutation(n_sl):
        inst = int(instance[k])
        sop = _uid(seed, p.index, "sop", series_number, inst)
        ds = _base_dataset(p, seed, sop)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = "Chest 1.0 synthetic"
        ds.ProtocolName = "CHEST ROUTINE"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = inst
        ds.ConvolutionKernel = sc.kernel
        ds.SliceThickness = f"{sc.thickness_mm:g}"
        ds.SpacingBetweenSlices = f"{sc.thickness_mm:g}"
        ds.ReconstructionDiameter = f"{sc.fov_mm:g}"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = float(z_slices[k])
        ds.ImagePositionPatient = [f"{origin:.4f}", f"{origin:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelSpacing = [f"{ps:.6g}", f"{ps:.6g}"]
        ds.Rows = ds.Columns = n_px
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pr
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = f"{intercept:g}"
        if sc.padding:
            ds.PixelPaddingValue = padding_value
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = stored[k].tobytes()
        _write(ds, patient_dir / str(series_number) / f"{inst}.dcm")
        written += 1

    if p.localizer:
        # Coronal projection radiograph: rows along z (top = superior), columns along x.
        proj = fine.mean(axis=1)[::-1]  # (n_f, N), superior first
        n_rows = proj.shape[0]
        dz = sc.thickness_mm / _SUBSAMPLES
        loc = np.clip(np.rint(proj + rng.normal(0, 5, proj.shape)), -1024, 3071).astype(np.int16)
        sop = _uid(seed, p.index, "sop", 1, 1)
        ds = _base_dataset(p, seed, sop)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = _uid(seed, p.index, "series", 1)
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Topogram"
        ds.InstanceNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        top = float(z_slices.max()) + sc.thickness_mm / 2 - dz / 2
        ds.ImagePositionPatient = [f"{origin:.4f}", "0", f"{top:.4f}"]
        ds.PixelSpacing = [f"{dz:.6g}", f"{ps:.6g}"]
        ds.Rows, ds.Columns = n_rows, n_px
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        ds.PixelData = loc.tobytes()
        _write(ds, patient_dir / "1" / "1.dcm")
        written += 1
    return written


# ------------------------------------------------------------------------------ cohort


def _survival(rng: np.random.Generator, phenotype: str) -> tuple[float, int]:
    median = _MEDIAN_MONTHS[phenotype]
    scale = median / np.log(2.0) ** (1.0 / _WEIBULL_SHAPE)
    t_event = scale * (-np.log(rng.uniform(1e-12, 1.0))) ** (1.0 / _WEIBULL_SHAPE)
    admin = _ADMIN_CENSOR_MONTHS + rng.uniform(-6.0, 6.0)  # staggered accrual
    dropout = rng.exponential(240.0)  # loss to follow-up
    censor = min(admin, dropout)
    time = max(0.1, round(float(min(t_event, censor)), 1))
    return time, int(t_event <= censor)


def _grade(rng: np.random.Generator, phenotype: str) -> str:
    g = _BASE_GRADE[phenotype]
    if rng.uniform() < 0.25:
        g += 1 if rng.uniform() < 0.5 else -1
    return f"G{min(4, max(1, g))}"


def synth_cohort(
    out: Path,
    *,
    patients: int,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SynthInfo:
    """Write a synthetic CT cohort of ``patients`` patients under ``out``.

    Scanners, phenotypes and localizer series (a third of the patients) are each dealt
    evenly (shuffled round-robin, independently of each other), so every scanner appears
    once ``patients >= len(SCANNERS)`` and every phenotype once ``patients >= 6``.
    ``progress(done, total)`` is called after each patient.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    out = Path(out)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    cohort_rng = np.random.default_rng([seed, 0xC0407])
    scanner_idx = cohort_rng.permutation(np.arange(patients) % len(SCANNERS))
    pheno_idx = cohort_rng.permutation(np.arange(patients) % len(PHENOTYPES))
    localizer = cohort_rng.permutation(np.arange(patients) % 3 == 0)  # a third have a scout

    rows_out: list[_Patient] = []
    n_files = 0
    for i in range(patients):
        rng = np.random.default_rng([seed, i])
        sc = SCANNERS[int(scanner_idx[i])]
        phenotype = PHENOTYPES[int(pheno_idx[i])]
        slices, fine, radius, z_slices, voxel = _phantom(rng, sc, phenotype)
        image = _scanner_image(rng, sc, slices)
        time, event = _survival(rng, phenotype)
        study_date = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 9 * 365)))
        birth = study_date - _dt.timedelta(days=int(rng.integers(45 * 365, 85 * 365)))
        p = _Patient(
            index=i,
            patient_id=f"SYN-{i:05d}",
            scanner=sc,
            phenotype=phenotype,
            lesion_radius_mm=round(radius, 2),
            lesion_voxel=voxel,
            time=time,
            event=event,
            grade=_grade(rng, phenotype),
            study_date=study_date,
            birth_date=birth,
            sex="F" if rng.uniform() < 0.5 else "M",
            localizer=bool(localizer[i]),
        )
        n_files += _write_patient(dicom_dir, p, seed, rng, image, fine, z_slices)
        rows_out.append(p)
        if progress is not None:
            progress(i + 1, patients)

    return cohort_info(out, rows_out, n_files, dicom_dir)


def cohort_info(out: Path, rows_out: list[_Patient], n_files: int, dicom_dir: Path) -> SynthInfo:
    """Write ``out/outcomes.csv`` (what a site knows) and ``out/truth.csv`` (the
    generator's ground truth, for evaluation) for ``rows_out`` and describe the cohort."""
    outcomes_csv = out / "outcomes.csv"
    with open(outcomes_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "time", "event", "phenotype", "grade"])
        for p in rows_out:
            w.writerow([p.patient_id, f"{p.time:.1f}", p.event, p.phenotype, p.grade])
    truth_csv = out / "truth.csv"
    with open(truth_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "scanner", "phenotype", "lesion_radius_mm", "lesion_slice",
                    "lesion_row", "lesion_col"])
        for p in rows_out:
            w.writerow([p.patient_id, p.scanner.key, p.phenotype, f"{p.lesion_radius_mm:.2f}",
                        *(f"{v:.2f}" for v in p.lesion_voxel)])
    return SynthInfo(
        n_patients=len(rows_out),
        n_files=n_files,
        scanners=sorted({p.scanner.key for p in rows_out}),
        root=out,
        dicom_dir=dicom_dir,
        outcomes_csv=outcomes_csv,
        truth_csv=truth_csv,
        phenotypes=sorted({p.phenotype for p in rows_out}),
    )
