"""Small seeded DICOM series for the encoders tests (not a test module).

``write_series`` writes one axial series of CT, MR or PET slices with a deterministic
phantom, in whatever storage the test needs; ``phantom_hu`` is the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}


def phantom_hu(n: int = 6, rows: int = 32, seed: int = 0) -> np.ndarray:
    """``(n, rows, rows) int16`` HU: air, a body ellipse with fat rim, lungs, a bone, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n, 0:rows, 0:rows].astype(np.float32)
    c = (rows - 1) / 2
    r = np.hypot((x - c) / (0.45 * rows), (y - c) / (0.35 * rows))
    vol = np.full((n, rows, rows), -1000.0, np.float32)
    vol[r < 1.0] = -90.0
    vol[r < 0.85] = 40.0
    for sx in (-1, 1):
        lung = np.hypot((x - c - sx * 0.2 * rows) / (0.14 * rows), (y - c) / (0.2 * rows)) < 1
        vol[lung] = -850.0
    vol[np.hypot(x - c, y - c - 0.22 * rows) < 0.06 * rows] = 900.0
    vol += 0.5 * z  # a gentle change along z so slice order matters
    vol += rng.normal(0.0, 8.0, vol.shape)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def base_dataset(
    modality: str = "CT", *, study_uid: str, series_uid: str, patient_id: str = "PAT-0001"
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.StudyDate = "20200102"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "Factory Medical"
    ds.ManufacturerModelName = "Model 9"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return ds


def write_series(
    folder: Path,
    values: np.ndarray,
    *,
    modality: str = "CT",
    spacing: tuple[float, float, float] = (2.0, 1.5, 1.5),
    signed: bool = True,
    intercept: float = 0.0,
    slope: float = 1.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PAT-0001",
    edit: Callable[[Dataset, int], None] | None = None,
) -> list[Path]:
    """Write ``values`` ``(z, y, x)`` (modality units) as one slice per file.

    Stored = (values - intercept) / slope, int16 when ``signed`` else uint16 (12 bits).
    ``edit(ds, k)`` may change slice ``k`` before it is written. Files are written in a
    shuffled order of instance numbers so readers must sort by position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(entropy_srcs=[str(folder), "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder), "series"])
    stored = np.rint((values.astype(np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    if not signed:
        stored = np.clip(stored, 0, 4095)
    stored = stored.astype(dtype)
    dz, dy, dx = spacing
    paths = []
    for k in range(values.shape[0]):
        ds = base_dataset(modality, study_uid=study_uid, series_uid=series_uid, patient_id=patient_id)
        sop = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = values.shape[0] - k  # reversed: order must come from positions
        ds.ImagePositionPatient = [-20.0, -20.0, 10.0 + k * dz]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.BitsStored = 16 if signed else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = stored[k].tobytes()
        if edit is not None:
            edit(ds, k)
        path = folder / f"im{(k * 7919) % 1000:03d}_{k}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_series(folder: Path, n: int = 6, rows: int = 32, seed: int = 0, **kw) -> list[Path]:
    """A CT series of :func:`phantom_hu` (signed int16, intercept 0 unless given)."""
    return write_series(folder, phantom_hu(n, rows, seed), **kw)
