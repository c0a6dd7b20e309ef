"""Regions of a study from its DICOM annotation objects: SEG (read with highdicom) and
RTSTRUCT (pydicom), mapped through patient coordinates onto the study's voxel grid.

:func:`encoders.regions.regions_for_study` is the public entry; this module holds the
readers. A SEG gives one region per non-empty segment (its volume and affine from
highdicom; frames that do not form one regular grid are placed one by one by their own
position); an RTSTRUCT one region per ROI from its ContourData (mm), except ROIs whose
RTROIInterpretedType marks anatomy or devices (:data:`NON_LESION_ROI_TYPES`). The reader
is the object's ContentCreatorName, else SeriesDescription, else Manufacturer, never a
value that matches a patient identifier of the object; the lesion is the segment label /
ROI name under the same rule, else its number.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from encoders.deid import clean_descriptor, identifying_values
from encoders.errors import RegionError
from encoders.geometry import patient_to_voxel
from encoders.regions import ReaderRegion, box_of

__all__ = ["NON_LESION_ROI_TYPES", "RTSTRUCT_SOP_CLASS", "SEG_SOP_CLASS", "annotation_regions"]

MAX_ANNOTATION_BYTES = 256 << 20
NON_LESION_ROI_TYPES = frozenset(
    {
        "EXTERNAL", "ORGAN", "AVOIDANCE", "BOLUS", "SUPPORT", "FIXATION", "CONTROL",
        "DOSE_REGION", "ISOCENTER", "MARKER", "REGISTRATION", "CONTRAST_AGENT", "CAVITY",
        "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD",
    }
)  # fmt: skip
"""RTSTRUCT RTROIInterpretedType values that mark anatomy, devices or planning aids."""
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def annotation_regions(
    study: Any,
    datasets: Sequence[Dataset | Path | str | bytes],
    *,
    skipped: list[tuple[str, str]] | None = None,
) -> list[ReaderRegion]:
    """Regions of the DICOM SEG and RTSTRUCT objects among ``datasets`` (pydicom
    datasets, paths or raw bytes) that belong to ``study`` (same StudyInstanceUID; same
    FrameOfReferenceUID when both say one).

    Anything else among ``datasets`` (images, other studies' annotations, other objects)
    is passed over; ``encoders.dicom.FileHeader.annotation`` tells ingest which files to
    pass. An annotation of this study that cannot be used raises :class:`RegionError`,
    or, when ``skipped`` is a list, is appended to it as ``(label, message)`` and passed
    over, so one bad object does not lose the others.
    """
    out: list[ReaderRegion] = []
    for i, item in enumerate(datasets):
        label = str(item) if isinstance(item, Path | str) else f"<dataset #{i}>"
        try:
            ds = _load(item, label)
            if ds is None:
                continue
            sop = str(ds.get("SOPClassUID", ""))
            if str(ds.get("StudyInstanceUID", "")) != study.study_uid:
                continue
            for_uid = _frame_of_reference(ds)
            if study.frame_of_reference_uid and for_uid and for_uid != study.frame_of_reference_uid:
                raise RegionError(
                    "wrong_frame_of_reference",
                    f"{label}: drawn in another frame of reference than the study's chosen series; "
                    "its coordinates cannot be mapped",
                )
            if sop == SEG_SOP_CLASS:
                out.extend(_seg_regions(ds, study, label))
            else:
                out.extend(_rtstruct_regions(ds, study, label))
        except RegionError as e:
            if skipped is None:
                raise
            skipped.append((label, str(e)))
    return out


def _load(item: Dataset | Path | str | bytes, label: str) -> Dataset | None:
    """The dataset when it is a SEG or RTSTRUCT (headers checked before a full read)."""
    if isinstance(item, Dataset):
        ds = item
        return ds if str(ds.get("SOPClassUID", "")) in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS) else None
    try:
        if isinstance(item, bytes):
            fp: Any = io.BytesIO(item)
            size = len(item)
        else:
            p = Path(item)
            size = p.stat().st_size
            fp = p
        head = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return None  # not DICOM or unreadable: not an annotation we can tell; scans report it
    if str(head.get("SOPClassUID", "")) not in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
        return None
    try:
        if size > MAX_ANNOTATION_BYTES:
            raise RegionError("too_large", f"{label}: annotation object over {MAX_ANNOTATION_BYTES >> 20} MiB")
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
        return pydicom.dcmread(fp)
    except RegionError:
        raise
    except Exception as e:
        raise RegionError("unreadable", f"{label}: cannot be read as DICOM ({type(e).__name__})") from None


def _frame_of_reference(ds: Dataset) -> str:
    uid = str(ds.get("FrameOfReferenceUID", "") or "")
    if uid:
        return uid
    for item in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        uid = str(item.get("FrameOfReferenceUID", "") or "")
        if uid:
            return uid
    return ""


def _reader_name(ds: Dataset, fallback: str) -> str:
    """ContentCreatorName, else SeriesDescription, else Manufacturer, each only if it
    passes :func:`encoders.deid.clean_descriptor` against the object's patient data."""
    identifying = identifying_values(
        ds, exclude=frozenset({"ContentCreatorName", "SeriesDescription"})
    )
    for keyword in ("ContentCreatorName", "SeriesDescription", "Manufacturer"):
        raw = ds.get(keyword)
        if raw is None:
            continue
        text = " ".join(p for p in re.split(r"[\^=]", str(raw)) if p.strip())
        clean = clean_descriptor(text, identifying)
        if clean:
            return clean
    return fallback


def _lesion_name(ds: Dataset, label: str, number: int, keyword: str) -> str:
    """A segment label / ROI name if it passes ``clean_descriptor`` against the object's
    other identifying values (the names' own element ``keyword`` left out: PS3.15 lists
    it, so it would always match itself), else its number."""
    clean = (
        clean_descriptor(label, identifying_values(ds, exclude=frozenset({keyword})))
        if label else None
    )
    return clean or str(number)


def _seg_regions(ds: Dataset, study: Any, label: str) -> list[ReaderRegion]:
    """One region per non-empty segment of a SEG, through patient space."""
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as e:
        raise RegionError(
            "unreadable", f"{label}: not a valid SEG ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    reader = _reader_name(ds, "seg")
    try:
        volume = seg.get_volume(combine_segments=False)
    except Exception:
        # Frames not on one regular grid (e.g. slice positions that jitter more than
        # highdicom's 1 % tolerance): map each frame through its own position instead.
        return _seg_regions_by_frame(ds, seg, study, label, reader)
    numbers = list(seg.segment_numbers)
    array = np.asarray(volume.array)
    if array.ndim == 3:
        array = array[..., None]
    affine = np.asarray(volume.affine, dtype=np.float64)
    out = []
    for k, number in enumerate(numbers):
        if k >= array.shape[-1]:
            break
        nz = np.argwhere(array[..., k] > 0)
        if nz.size == 0:
            continue
        lo, hi = nz.min(axis=0), nz.max(axis=0)
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
            dtype=np.float64,
        )
        xyz = corners @ affine[:3, :3].T + affine[:3, 3]
        box = box_of(patient_to_voxel(study, xyz), study.volume.shape)
        if box is None:
            raise RegionError("outside_study", f"{label}: segment {number} lies outside the study's volume")
        desc = seg.get_segment_description(number)
        name = _lesion_name(ds, str(getattr(desc, "SegmentLabel", "") or ""), number, "SegmentLabel")
        out.append(ReaderRegion(reader=reader, box=box, lesion=name))
    return out


def _seg_regions_by_frame(ds: Dataset, seg: Any, study: Any, label: str, reader: str) -> list[ReaderRegion]:
    """One region per segment from the SEG's frames one by one (BINARY / FRACTIONAL
    SEGs: one segment per frame), each placed by its own ImagePositionPatient."""
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        frames = np.asarray(ds.pixel_array)
        frames = frames.reshape(-1, *frames.shape[-2:])
        corners_by_segment: dict[int, list[np.ndarray]] = {}
        for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            nz = np.argwhere(frames[f] > 0)
            if nz.size == 0:
                continue
            number = int(
                _functional(item, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            )
            iop = np.asarray(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), float)
            dy, dx = (float(v) for v in _functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"))
            ipp = np.asarray(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient"), float)
            (r0, c0), (r1, c1) = nz.min(axis=0), nz.max(axis=0)
            for r, c in ((r0, c0), (r0, c1), (r1, c0), (r1, c1)):
                corners_by_segment.setdefault(number, []).append(ipp + c * dx * iop[:3] + r * dy * iop[3:])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise RegionError(
            "unreadable", f"{label}: SEG frames cannot be placed ({type(e).__name__}); re-export it"
        ) from None
    out = []
    for number in sorted(corners_by_segment):
        box = box_of(patient_to_voxel(study, np.stack(corners_by_segment[number])), study.volume.shape)
        if box is None:
            raise RegionError("outside_study", f"{label}: segment {number} lies outside the study's volume")
        desc = seg.get_segment_description(number)
        name = _lesion_name(ds, str(getattr(desc, "SegmentLabel", "") or ""), number, "SegmentLabel")
        out.append(ReaderRegion(reader=reader, box=box, lesion=name))
    return out


def _functional(item: Dataset, shared: Dataset, seq: str, keyword: str) -> Any:
    """A per-frame functional group value, else the shared one."""
    for grp in (item, shared):
        if seq in grp and len(grp[seq].value) > 0 and keyword in grp[seq].value[0]:
            return grp[seq].value[0][keyword].value
    raise KeyError(keyword)


def _rtstruct_regions(ds: Dataset, study: Any, label: str) -> list[ReaderRegion]:
    """One region per lesion-like ROI of an RTSTRUCT, from its contour points (mm)."""
    names = {int(r.ROINumber): str(r.get("ROIName", "") or "") for r in ds.get("StructureSetROISequence", [])}
    kinds = {
        int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
        for o in ds.get("RTROIObservationsSequence", [])
        if "ReferencedROINumber" in o
    }
    reader = _reader_name(ds, "rtstruct")
    out = []
    for item in ds.get("ROIContourSequence", []):
        number = int(item.get("ReferencedROINumber", -1))
        if kinds.get(number, "") in NON_LESION_ROI_TYPES:
            continue
        points = []
        for contour in item.get("ContourSequence", []) or []:
            data = contour.get("ContourData")
            if data is None:
                continue
            xyz = np.asarray([float(v) for v in data], dtype=np.float64)
            if xyz.size == 0 or xyz.size % 3:
                raise RegionError("bad_contour", f"{label}: ROI {number} has ContourData not in (x, y, z) triples")
            points.append(xyz.reshape(-1, 3))
        if not points:
            continue
        box = box_of(patient_to_voxel(study, np.concatenate(points)), study.volume.shape)
        if box is None:
            raise RegionError("outside_study", f"{label}: ROI {number} lies outside the study's volume")
        name = _lesion_name(ds, names.get(number, ""), number, "ROIName")
        out.append(ReaderRegion(reader=reader, box=box, lesion=name))
    return out
