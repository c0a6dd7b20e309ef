"""One file's header (read without pixel data) and the acquisition values kept from it.

``_Header`` is what the later passes need (UIDs, modality, ImageType, frames, where the
headers-only read stopped); ``_fg_value`` reads enhanced multi-frame functional groups.
:func:`_acquisition` keeps only de-identification-safe scanner parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from encoders.deid import RETAINED_WITH_OPTIONS, clean_descriptor, identifying_values
from encoders.dicom.reading import _dcmread, _guard, _label, _quiet
from encoders.dicom.values import _UID_RE, _code, _float, _floats, _fmt, _get, _int, _strs, _text
from encoders.errors import DicomError

_MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"


@dataclass
class _Header:
    index: int
    label: str
    source: Path | bytes
    ds: Dataset  # without pixel data
    study_uid: str
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    n_frames: int
    thickness: float | None
    series_number: int | None
    size: int = 0  # bytes of the source
    burned_in: bool = False  # BurnedInAnnotation is YES
    pixel_offset: int | None = None  # where the headers-only read stopped (see _read_rest)


def _fg_value(ds: Dataset, frame: int, seq: str, keyword: str) -> Any:
    """A per-frame functional-group value (per-frame item, else shared, else top level)."""
    groups = []
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) > 0:
        groups.append(shared[0])
    for grp in groups:
        items = _get(grp, seq)
        if items is not None and len(items) > 0:
            value = _get(items[0], keyword)
            if value is not None:
                return value
    return _get(ds, keyword)


def _read_header(source: Path | bytes, index: int, *, need_study: bool = True) -> _Header:
    with _guard(_label(source, index)), _quiet():
        return _read_header_unguarded(source, index, need_study)


def _read_header_unguarded(source: Path | bytes, index: int, need_study: bool = True) -> _Header:
    label = _label(source, index)
    ds, pixel_offset, size = _dcmread(source, label, headers_only=True)
    meta = getattr(ds, "file_meta", None)
    if (
        meta is not None
        and _text(_get(meta, "MediaStorageSOPClassUID")) == _MEDIA_DIRECTORY_STORAGE
    ):
        raise DicomError(
            "not_image", f"{label}: is a DICOMDIR (media index), not an image; ignore it"
        )
    study_uid = _text(_get(ds, "StudyInstanceUID")) or ""
    if need_study and (not study_uid or not _UID_RE.match(study_uid)):
        raise DicomError(
            "missing_tag",
            f"{label}: no valid StudyInstanceUID; the file cannot be assigned to a study",
        )
    series_uid = _text(_get(ds, "SeriesInstanceUID")) or ""
    n_frames = _int(_get(ds, "NumberOfFrames")) or 1
    if n_frames < 1:
        n_frames = 1
    thickness = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    return _Header(
        index=index,
        label=label,
        source=source,
        ds=ds,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=_code(_get(ds, "Modality")),
        image_type=_strs(_get(ds, "ImageType")),
        n_frames=n_frames,
        thickness=thickness,
        series_number=_int(_get(ds, "SeriesNumber")),
        size=size,
        burned_in=_text(_get(ds, "BurnedInAnnotation"), 8) == "YES",
        pixel_offset=pixel_offset,
    )


def _orientation_of(h: _Header) -> str:
    """'axial' / 'coronal' / 'sagittal' / 'oblique' / 'unknown' from IOP (or ImageType)."""
    iop = _floats(_fg_value(h.ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if iop is None:
        for name in ("AXIAL", "CORONAL", "SAGITTAL"):
            if name in h.image_type:
                return name.lower()
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        return "unknown"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) / norm < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


ACQUISITION_TEXT: tuple[tuple[str, str, str | None], ...] = (
    ("modality", "Modality", None),
    ("manufacturer", "Manufacturer", None),
    ("model", "ManufacturerModelName", None),
    ("software", "SoftwareVersions", None),
    ("kernel", "ConvolutionKernel", "CTReconstructionSequence"),
    ("sequence", "SequenceName", None),
    ("sequence", "PulseSequenceName", None),  # enhanced MR
    ("protocol", "ProtocolName", None),
)
"""Text acquisition parameters kept: (key, keyword, functional group of enhanced
objects). Each value passes :func:`encoders.deid.clean_descriptor` first."""
ACQUISITION_NUMBERS: tuple[tuple[str, str, str | None], ...] = (
    ("kvp", "KVP", "CTXRayDetailsSequence"),
    ("exposure", "Exposure", None),
    ("exposure", "ExposureInmAs", "CTExposureSequence"),  # enhanced CT
    ("field_strength", "MagneticFieldStrength", None),
    ("recon_diameter", "ReconstructionDiameter", "CTReconstructionSequence"),
)
"""Numeric acquisition parameters kept, as in :data:`ACQUISITION_TEXT`."""


def _acquisition(ds: Dataset, spacing: tuple[float, float, float]) -> dict[str, str]:
    """The acquisition parameters that make scanners differ (for harmonisation), as
    strings; absent ones omitted. Only non-identifying values: nothing from the PS3.15
    Basic profile except SoftwareVersions and ProtocolName under the options named in
    :data:`encoders.deid.RETAINED_WITH_OPTIONS`, and every text value is dropped unless
    :func:`encoders.deid.clean_descriptor` passes it."""
    out: dict[str, str] = {}
    identifying = identifying_values(ds, exclude=frozenset(RETAINED_WITH_OPTIONS))
    for key, keyword, group in ACQUISITION_TEXT:
        if key in out:
            continue
        raw = _fg_value(ds, 0, group, keyword) if group else _get(ds, keyword)
        value = _text(raw)
        if value:
            clean = clean_descriptor(value, identifying)
            if clean:
                out[key] = clean
    for key, keyword, group in ACQUISITION_NUMBERS:
        if key in out:
            continue
        num = _float(_fg_value(ds, 0, group, keyword) if group else _get(ds, keyword))
        if num is not None:
            out[key] = _fmt(num)
    thickness = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    if thickness is not None:
        out["slice_thickness"] = _fmt(thickness)
    out["pixel_spacing"] = _fmt(spacing[1])
    for key, keyword in (("rows", "Rows"), ("columns", "Columns")):
        num = _int(_get(ds, keyword))
        if num is not None:
            out[key] = str(num)
    return out
