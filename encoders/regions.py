"""Regions of interest from readers: a per-reader box CSV, the LIDC reader XML, and the
DICOM annotation objects a hospital has (SEG, RTSTRUCT).

Every source becomes :class:`ReaderRegion` boxes on one grid: half-open
``(z0, y0, x0, z1, y1, x1)`` voxel indices of the study's sorted series, i.e. of
``Study.volume`` as :func:`encoders.dicom.read_study` returns it (the convention of query
regions, see ``encoders.preprocess.box_to_input_grid``). Several readers of one lesion stay
several regions (same ``lesion``, different ``reader``): reader variation is data.

Sources and how they are mapped:

- :func:`regions_from_csv`: boxes already in voxels, keyed by the raw patient id or the
  study instance UID (pseudonymised by the caller, like outcome files); :func:`regions_for`
  picks one study's and checks them against its volume.
- :func:`regions_from_lidc_xml`: LIDC-IDRI reader XML (namespace ``http://www.nih.gov``),
  contours in source-image pixels per slice, slices found by SOP Instance UID (else by
  ``imageZposition`` along the slice normal); one box per reader per nodule; nodules of
  different readers that overlap are one ``lesion`` (``L1``, ``L2``... by first mention).
  Parsed with defusedxml (no entities, no DTD tricks) and a size cap.
- :func:`regions_for_study` (readers in :mod:`encoders.annotations`): DICOM SEG (read with
  highdicom: its volume and affine; frames
  that do not form one regular grid are placed one by one by their own position) and
  RTSTRUCT (pydicom: ROI contour points in patient mm), mapped through patient space with
  :func:`encoders.geometry.patient_to_voxel`, so any orientation or flip is handled.
  One region per SEG segment / RTSTRUCT ROI (lesion = segment label / ROI name);
  RTSTRUCT ROIs interpreted as anatomy or devices (EXTERNAL, ORGAN, AVOIDANCE, ...) are
  left out. The reader is the object's ContentCreatorName, else its SeriesDescription,
  else Manufacturer, never a value that matches a patient identifier of the object.

Messages name files and lines, never patient data.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException
from pydicom.dataset import Dataset

from encoders.errors import RegionError
from encoders.geometry import slice_index_at

__all__ = [
    "ReaderRegion",
    "box_of",
    "check_box",
    "regions_for",
    "regions_for_study",
    "regions_from_csv",
    "regions_from_lidc_xml",
]

Box = tuple[int, int, int, int, int, int]

MAX_CSV_BYTES = 256 << 20
MAX_XML_BYTES = 64 << 20
LIDC_NS = "http://www.nih.gov"


@dataclass(frozen=True)
class ReaderRegion:
    reader: str                       # reader / observer name
    box: tuple[int, int, int, int, int, int]  # half-open (z0,y0,x0,z1,y1,x1) voxels of
                                      # the study's sorted series (Study.volume) grid
    lesion: str = ""                  # lesion id when the source has one


# ---------------------------------------------------------------------------- boxes


def check_box(box: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` as a 6-tuple of ints if it is a non-empty half-open box inside a volume
    of ``shape`` ``(z, y, x)``; raises ``RegionError("outside_study")`` otherwise."""
    b = tuple(int(v) for v in box)
    if len(b) != 6:
        raise RegionError("bad_box", f"a box has 6 values (z0, y0, x0, z1, y1, x1), got {len(b)}")
    for axis, name in enumerate("zyx"):
        lo, hi, n = b[axis], b[axis + 3], int(shape[axis])
        if not 0 <= lo < hi <= n:
            raise RegionError(
                "outside_study",
                f"box {name}0={lo}, {name}1={hi} is empty or outside the study's {n} "
                f"{'slices' if name == 'z' else 'rows' if name == 'y' else 'columns'} "
                f"(need 0 <= {name}0 < {name}1 <= {n})",
            )
    return b


def box_of(points: np.ndarray, shape: Sequence[int]) -> Box | None:
    """The half-open box of the voxels holding ``points`` ``(n, 3)`` (fractional z, y, x
    indices), clipped to ``shape``; None when it lies wholly outside."""
    idx = np.rint(points).astype(np.int64)
    lo = np.maximum(idx.min(axis=0), 0)
    hi = np.minimum(idx.max(axis=0) + 1, np.asarray(shape[:3], dtype=np.int64))
    if np.any(hi <= lo):
        return None
    return (int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2]))


# ------------------------------------------------------------------------------ CSV

_CSV_COORDS = ("z0", "y0", "x0", "z1", "y1", "x1")


def regions_from_csv(path: Path | str) -> dict[str, list[ReaderRegion]]:
    """Read per-reader boxes from a CSV file.

    Columns (header names, any order, case-insensitive): ``patient_id`` (the raw id, as in
    the DICOM PatientID) or ``study_instance_uid`` (when a patient has several studies;
    wins when both are filled), ``reader``, ``z0, y0, x0, z1, y1, x1`` (half-open voxel
    box of the study's sorted series), optional ``lesion``. Returns ``{key: regions}``
    keyed by the row's study instance UID when given, else its patient id (raw: keep in
    memory, see :func:`regions_for`), rows in file order. Raises :class:`RegionError`
    naming the line for a bad row (the id itself is never quoted).
    """
    path = Path(path)
    if not path.is_file():
        raise RegionError("not_found", f"{path}: no such regions file; check the path")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise RegionError("too_large", f"{path}: regions file over {MAX_CSV_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise RegionError("bad_csv", f"{path}: not UTF-8 text; save the regions as UTF-8 CSV") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        raise RegionError("bad_csv", f"{path}: empty file; expected a header line")
    names = [h.strip().lower() for h in header]
    col = {n: i for i, n in enumerate(names) if n}
    missing = [c for c in ("reader", *_CSV_COORDS) if c not in col]
    if "patient_id" not in col and "study_instance_uid" not in col:
        missing.insert(0, "patient_id or study_instance_uid")
    if missing:
        raise RegionError(
            "missing_column",
            f"{path}: missing column(s) {', '.join(missing)}; header is "
            f"{','.join(n for n in names if n)[:200]}",
        )
    out: dict[str, list[ReaderRegion]] = {}
    try:
        for row in rows:
            _csv_row(path, rows.line_num, row, col, out)
    except csv.Error as e:
        raise RegionError("bad_csv", f"{path}:{rows.line_num}: not valid CSV ({e})") from None
    return out


def _csv_row(
    path: Path, line: int, row: list[str], col: dict[str, int], out: dict[str, list[ReaderRegion]]
) -> None:
    """Validate one CSV row and append its region to ``out`` under its key."""
    if not any(cell.strip() for cell in row):
        return
    cells = {n: (row[i].strip() if i < len(row) else "") for n, i in col.items()}
    key = cells.get("study_instance_uid", "") or cells.get("patient_id", "")
    where = f"{path}:{line}"
    if not key:
        raise RegionError("bad_row", f"{where}: neither patient_id nor study_instance_uid given")
    reader = cells["reader"]
    if not reader:
        raise RegionError("bad_row", f"{where}: reader is empty; name who drew the box")
    box = []
    for c in _CSV_COORDS:
        value = _int_cell(cells[c])
        if value is None:
            raise RegionError(
                "bad_row", f"{where}: {c} must be a whole number of voxels, got {cells[c][:20]!r}"
            )
        box.append(value)
    for axis, name in enumerate("zyx"):
        if not 0 <= box[axis] < box[axis + 3]:
            raise RegionError(
                "bad_row",
                f"{where}: need 0 <= {name}0 < {name}1 (half-open voxels), got "
                f"{name}0={box[axis]}, {name}1={box[axis + 3]}",
            )
    region = ReaderRegion(reader=reader, box=tuple(box), lesion=cells.get("lesion", ""))  # type: ignore[arg-type]
    out.setdefault(key, []).append(region)


def _int_cell(text: str) -> int | None:
    try:
        f = float(text)
    except ValueError:
        return None
    if not np.isfinite(f) or f != int(f) or abs(f) > 1 << 20:
        return None
    return int(f)


def regions_for(regions: Mapping[str, list[ReaderRegion]], study: Any) -> list[ReaderRegion]:
    """One study's regions from :func:`regions_from_csv`'s result: those keyed by its
    StudyInstanceUID, else by its raw patient id; each box checked against
    ``study.volume`` (``RegionError("outside_study")`` naming the reader)."""
    found = regions.get(study.study_uid) or regions.get(study.patient_id) or []
    out = []
    for r in found:
        try:
            check_box(r.box, study.volume.shape)
        except RegionError as e:
            raise RegionError(e.reason, f"region of reader {r.reader!r}: {e}") from None
        out.append(r)
    return out


# ----------------------------------------------------------------------- LIDC XML


def _lidc(tag: str) -> str:
    return f"{{{LIDC_NS}}}{tag}"


def regions_from_lidc_xml(path: Path | str, study: Any) -> list[ReaderRegion]:
    """One box per reader per nodule of an LIDC reader XML, on ``study``'s voxel grid.

    Each ``readingSession`` is a reader (named ``lidc-<servicingRadiologistID>`` when the
    id is a short code unique in the file, else ``reader-<n>``); each
    ``unblindedReadNodule`` one box over its inclusion ROIs: the slice of each ROI by
    ``imageSOP_UID`` (else ``imageZposition`` within half a slice), rows / columns from the
    ``edgeMap`` pixel coordinates (flipped like the volume). Nodules of different readers
    whose boxes overlap (or lie within 3 mm) share a ``lesion`` id ``L1``, ``L2``... in
    order of first mention. Non-nodules are not regions. Raises :class:`RegionError`.
    """
    path = Path(path)
    if not path.is_file():
        raise RegionError("not_found", f"{path}: no such XML file; check the path")
    if path.stat().st_size > MAX_XML_BYTES:
        raise RegionError("too_large", f"{path}: XML over {MAX_XML_BYTES >> 20} MiB; not a reader file")
    try:
        root = SafeET.parse(str(path), forbid_dtd=True).getroot()
    except DefusedXmlException as e:
        raise RegionError("bad_xml", f"{path}: refused ({type(e).__name__}: DTDs and entities are not allowed)") from None
    except SafeET.ParseError as e:
        raise RegionError("bad_xml", f"{path}: not well-formed XML ({e})") from None
    if root is None or root.tag != _lidc("LidcReadMessage"):
        raise RegionError(
            "bad_xml", f"{path}: root element is not LidcReadMessage in namespace {LIDC_NS}"
        )
    header_uid = (root.findtext(f"{_lidc('ResponseHeader')}/{_lidc('StudyInstanceUID')}") or "").strip()
    if header_uid and header_uid != study.study_uid:
        raise RegionError("wrong_study", f"{path}: the reads belong to another study")
    sessions = root.findall(_lidc("readingSession"))
    ids = [(s.findtext(_lidc("servicingRadiologistID")) or "").strip() for s in sessions]
    regions: list[ReaderRegion] = []
    uid_slice = _unique_slice_uids(study)
    for n, (session, rid) in enumerate(zip(sessions, ids, strict=True)):
        ok = re.fullmatch(r"-?[A-Za-z0-9_]{1,32}", rid) and ids.count(rid) == 1
        reader = f"lidc-{rid}" if ok else f"reader-{n + 1}"
        for nodule in session.findall(_lidc("unblindedReadNodule")):
            box = _lidc_nodule_box(path, nodule, study, uid_slice)
            if box is not None:
                regions.append(ReaderRegion(reader=reader, box=box))
    return _group_lesions(regions, study.spacing)


def _unique_slice_uids(study: Any) -> dict[str, int]:
    """SOPInstanceUID -> slice index, for UIDs that name one slice only (not the frames
    of one multi-frame file)."""
    counts = Counter(study.slice_uids)
    return {u: i for i, u in enumerate(study.slice_uids) if u and counts[u] == 1}


def _lidc_nodule_box(path: Path, nodule: Any, study: Any, uid_slice: dict[str, int]) -> Box | None:
    d0 = np.asarray(study.direction[0], dtype=np.float64)
    rows, cols = study.volume.shape[1:]
    points: list[tuple[int, int, int]] = []
    for roi in nodule.findall(_lidc("roi")):
        if (roi.findtext(_lidc("inclusion")) or "TRUE").strip().upper() != "TRUE":
            continue  # an exclusion contour (a hole) does not extend the box
        uid = (roi.findtext(_lidc("imageSOP_UID")) or "").strip()
        z = uid_slice.get(uid)
        z_text = (roi.findtext(_lidc("imageZposition")) or "").strip()
        if z is None and z_text and abs(d0[2]) > 0.99:  # axial: the z position is the slice's
            try:
                z = slice_index_at(study, float(z_text) * float(np.sign(d0[2])))
            except ValueError:
                z = None
        if z is None:
            raise RegionError(
                "outside_study",
                f"{path}: a nodule contour at z {z_text[:16] or '?'} mm matches no slice of the "
                "study (neither by SOP instance UID nor by position); is it the right series?",
            )
        for edge in roi.findall(_lidc("edgeMap")):
            try:
                x = int(float((edge.findtext(_lidc("xCoord")) or "").strip()))
                y = int(float((edge.findtext(_lidc("yCoord")) or "").strip()))
            except ValueError:
                raise RegionError("bad_xml", f"{path}: an edgeMap has no integer xCoord/yCoord") from None
            if not (0 <= x < cols and 0 <= y < rows):
                raise RegionError(
                    "outside_study",
                    f"{path}: contour point ({x}, {y}) lies outside the {cols}x{rows} images",
                )
            if study.in_plane_flips[0]:
                y = rows - 1 - y
            if study.in_plane_flips[1]:
                x = cols - 1 - x
            points.append((z, y, x))
    if not points:
        return None
    return box_of(np.asarray(points, dtype=np.float64), study.volume.shape)


def _group_lesions(
    regions: list[ReaderRegion], spacing: Sequence[float], near_mm: float = 3.0
) -> list[ReaderRegion]:
    """Give regions of different readers that overlap (or lie within ``near_mm``) one
    lesion id; a reader's own regions are never merged with each other."""
    sp = np.asarray(spacing, dtype=np.float64)
    lesions: list[list[int]] = []
    label: list[int] = []
    for i, r in enumerate(regions):
        lo, hi = np.asarray(r.box[:3]) * sp, np.asarray(r.box[3:]) * sp
        chosen = -1
        for k, members in enumerate(lesions):
            if any(regions[j].reader == r.reader for j in members):
                continue
            for j in members:
                olo, ohi = np.asarray(regions[j].box[:3]) * sp, np.asarray(regions[j].box[3:]) * sp
                gap = np.maximum(0.0, np.maximum(olo - hi, lo - ohi))  # per axis, mm
                if float(np.linalg.norm(gap)) <= near_mm:
                    chosen = k
                    break
            if chosen >= 0:
                break
        if chosen < 0:
            lesions.append([])
            chosen = len(lesions) - 1
        lesions[chosen].append(i)
        label.append(chosen)
    return [
        ReaderRegion(reader=r.reader, box=r.box, lesion=f"L{label[i] + 1}")
        for i, r in enumerate(regions)
    ]


# ------------------------------------------------------------------ SEG / RTSTRUCT


def regions_for_study(
    study: Any,
    datasets: Sequence[Dataset | Path | str | bytes],
    *,
    skipped: list[tuple[str, str]] | None = None,
) -> list[ReaderRegion]:
    """Regions of the DICOM SEG and RTSTRUCT objects among ``datasets`` (pydicom
    datasets, paths or raw bytes) that belong to ``study`` (same StudyInstanceUID; same
    FrameOfReferenceUID when both say one); see :mod:`encoders.annotations`.

    Anything else among ``datasets`` (images, other studies' annotations, other objects)
    is passed over; ``encoders.dicom.FileHeader.annotation`` tells ingest which files to
    pass. An annotation of this study that cannot be used raises :class:`RegionError`,
    or, when ``skipped`` is a list, is appended to it as ``(label, message)`` and passed
    over, so one bad object does not lose the others.
    """
    from encoders.annotations import annotation_regions  # highdicom loads only when used

    return annotation_regions(study, datasets, skipped=skipped)
