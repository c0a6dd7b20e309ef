"""Reading DICOM studies: folder scan, series choice, geometry, HU volumes, preprocessing.

Every failure a caller can meet leaves :func:`scan_folder` as a :class:`Rejection` and
:func:`read_study` as a :class:`~encoders.errors.DicomError` (never a raw pydicom / numpy
exception). Messages name files by the path given (or ``<bytes #i>`` for in-memory
sources) and never carry patient data.

Reading a study is two passes: headers only (``stop_before_pixels``) for every source, to
group by series, choose one series by :class:`SeriesRule` and work out the geometry; then
full reads for the chosen series only, after checking declared pixel sizes against the
bytes present and the size caps, so absurd headers never allocate.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from encoders.errors import DicomError
from encoders.spec import InputSpec

__all__ = [
    "DEFAULT_SERIES_RULE",
    "MAX_PIXELS_PER_SLICE_SIDE",
    "MAX_SLICES",
    "MAX_VOXELS",
    "Rejection",
    "SeriesRule",
    "Study",
    "preprocess",
    "read_study",
    "scan_folder",
]

log = logging.getLogger(__name__)

MAX_SLICES = 2048
"""Most slices (frames) one series may hold."""
MAX_PIXELS_PER_SLICE_SIDE = 4096
"""Most rows / columns one slice may declare."""
MAX_VOXELS = 2**29
"""Most voxels one series may hold (2 GiB as float32; a 512x512x2048 CT fits)."""

CT_AIR_HU = -1024.0
"""Lowest HU kept for CT: padding / outside-of-FOV values below it are air."""

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
_IDENTITY_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ----------------------------------------------------------------------------- types


@dataclass
class Rejection:
    """A file :func:`scan_folder` could not use; ``reason`` is the human message."""

    path: str
    reason: str


@dataclass
class Study:
    """One decoded study (one chosen series of it).

    ``volume`` is ``(z, y, x) float32``: HU for CT (values below -1024 clipped to -1024),
    modality-rescaled raw values otherwise, sorted along the slice normal. ``spacing`` is
    ``(z, y, x)`` in mm. ``patient_id`` / ``study_uid`` are raw (pseudonymise before
    storing); without a PatientID, ``patient_id`` is ``"NO-PATIENT-ID:<study_uid>"`` so
    such studies never merge into one patient. ``acquisition`` holds only non-identifying acquisition tags, as strings.
    """

    study_uid: str
    patient_id: str
    series_uid: str
    modality: str
    volume: np.ndarray
    spacing: tuple[float, float, float]
    acquisition: dict[str, str] = field(default_factory=dict)
    study_date: _dt.date | None = None
    series_reason: str = ""


@dataclass(frozen=True)
class SeriesRule:
    """Which series of a study to use.

    A series qualifies when its modality is in ``modalities``, it is not a localizer /
    scout (unless ``allow_localizer``), not DERIVED / SECONDARY (unless
    ``allow_derived``), its slices are at most ``max_slice_thickness_mm`` thick (when
    stated) and it has at least ``min_slices`` slices. With ``prefer_axial``, axial
    series win over others when there is one. Among qualifying series, the one with the
    most slices is chosen (ties: thinner slices, then lower SeriesNumber); if it cannot be
    read, the next one is tried and the reason is recorded in ``Study.series_reason``.
    """

    modalities: tuple[str, ...] = ("CT", "MR", "PT")
    allow_localizer: bool = False
    allow_derived: bool = False
    prefer_axial: bool = True
    max_slice_thickness_mm: float = 5.0
    min_slices: int = 3

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("SeriesRule.modalities is empty; name at least one, e.g. ('CT',)")
        if self.min_slices < 1:
            raise ValueError(f"SeriesRule.min_slices must be >= 1, got {self.min_slices}")
        if not self.max_slice_thickness_mm > 0:
            raise ValueError(
                f"SeriesRule.max_slice_thickness_mm must be > 0, got {self.max_slice_thickness_mm}"
            )


DEFAULT_SERIES_RULE = SeriesRule()


# --------------------------------------------------------------------- value helpers


def _strs(value: Any) -> tuple[str, ...]:
    """A (multi-)valued string element as a tuple of stripped upper-case strings."""
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        values: list[Any] = [value]
    else:
        try:
            values = list(value)
        except TypeError:
            values = [value]
    out = []
    for v in values:
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        out.append(s.strip().upper())
    return tuple(out)


def _float(value: Any) -> float | None:
    """A numeric element value as a finite float, or None (missing / non-numeric)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip().strip("\x00")
        if not value:
            return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floats(value: Any, n: int) -> np.ndarray | None:
    """A multi-valued numeric element (e.g. IOP) as ``(n,) float64``, or None if unusable."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        s = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        items: list[Any] = s.split("\\")
    else:
        try:
            items = list(value)
        except TypeError:
            return None
    if len(items) != n:
        return None
    out = [_float(v) for v in items]
    if any(v is None for v in out):
        return None
    return np.asarray(out, dtype=np.float64)


def _int(value: Any) -> int | None:
    f = _float(value)
    if f is None or f != int(f):
        return None
    return int(f)


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.keyword`` or None; never raises (bad values read as None)."""
    try:
        if keyword not in ds:
            return None
        return ds[keyword].value
    except Exception:  # pydicom may fail converting a malformed raw element
        return None


def _text(value: Any, limit: int = 64) -> str | None:
    """A short string element as a clean one-line string (multi-values joined by '\\')."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        parts = [value]
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    cleaned = []
    for p in parts:
        s = p.decode("ascii", "replace") if isinstance(p, bytes) else str(p)
        s = " ".join(s.replace("\x00", " ").split())
        if s:
            cleaned.append(s)
    if not cleaned:
        return None
    return "\\".join(cleaned)[:limit]


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


def _parse_date(value: Any) -> _dt.date | None:
    s = _text(value, 32)
    if not s or len(s) < 8 or not s[:8].isdigit():
        return None
    try:
        return _dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


# ----------------------------------------------------------------------- file reading


def _label(source: Path | bytes, index: int) -> str:
    return f"<bytes #{index}>" if isinstance(source, bytes) else str(source)


def _normalise_source(source: Any, index: int) -> Path | bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return Path(source)
    raise DicomError(
        "unsupported",
        f"source #{index}: expected a path or bytes, got {type(source).__name__}",
    )


def _looks_like_raw_dataset(head: bytes) -> bool:
    """True when a file without preamble starts like a little-endian dataset (group 2/8)."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _dcmread(source: Path | bytes, label: str, *, headers_only: bool) -> Dataset:
    """Read one file with pydicom, mapping every failure to a DicomError."""
    try:
        if isinstance(source, bytes):
            size = len(source)
            head = source[:132]
        else:
            size = source.stat().st_size
            with open(source, "rb") as fh:
                head = fh.read(132)
    except IsADirectoryError:
        raise DicomError("not_dicom", f"{label}: is a folder, not a DICOM file") from None
    except OSError as e:
        raise DicomError(
            "unreadable",
            f"{label}: cannot be read ({e.strerror or e}); check the path and permissions",
        ) from None
    if size == 0:
        raise DicomError("not_dicom", f"{label}: file is empty (0 bytes); not a DICOM file")

    def _read(force: bool) -> Dataset:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        with _quiet():
            return pydicom.dcmread(fp, stop_before_pixels=headers_only, force=force)

    try:
        try:
            ds = _read(force=False)
        except InvalidDicomError:
            if not _looks_like_raw_dataset(head):
                raise DicomError(
                    "not_dicom",
                    f"{label}: not a DICOM file (no 'DICM' marker and no DICOM dataset at the start)",
                ) from None
            ds = _read(force=True)
    except DicomError:
        raise
    except OSError as e:
        raise DicomError(
            "unreadable",
            f"{label}: cannot be read ({e.strerror or e}); check the path and permissions",
        ) from None
    except Exception as e:  # pydicom raises many kinds on a damaged file
        kind = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise DicomError(
            kind,
            f"{label}: DICOM file is damaged and cannot be parsed ({type(e).__name__}); re-export it",
        ) from None
    _check_not_truncated(ds, label)
    return ds


def _check_not_truncated(ds: Dataset, label: str) -> None:
    """pydicom reads a cut-off file silently; a value shorter than its length betrays it."""
    try:
        tags = list(ds.keys())
    except Exception:
        return
    for tag in tags[-3:]:
        try:
            elem = ds.get_item(tag)
        except Exception:
            continue
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if (
            isinstance(length, int)
            and length != _UNDEFINED_LENGTH
            and isinstance(value, bytes)
            and len(value) < length
        ):
            raise DicomError(
                "truncated",
                f"{label}: file is truncated (element {tag} declares {length} bytes, "
                f"{len(value)} present); re-copy or re-export it",
            )


class _MuteWhileReading(logging.Filter):
    """Drops pydicom log records emitted by this thread inside :func:`_quiet`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet_state, "active", False)


_quiet_state = threading.local()
logging.getLogger("pydicom").addFilter(_MuteWhileReading())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom while it reads: its warnings quote element values, which may be
    patient data (names, ids), and logs must never carry patient data. (The warnings
    filter is process-wide while active; Python 3.11 has no per-thread filters.)"""
    previous = getattr(_quiet_state, "active", False)
    _quiet_state.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet_state.active = previous


@contextlib.contextmanager
def _guard(label: str) -> Iterator[None]:
    """Last line of defence: anything unexpected becomes a DicomError naming the file."""
    try:
        yield
    except DicomError:
        raise
    except MemoryError:
        raise DicomError("too_large", f"{label}: not enough memory to decode this series") from None
    except Exception as e:
        log.debug("unexpected %s while reading a DICOM file", type(e).__name__)
        raise DicomError(
            "corrupt",
            f"{label}: cannot be used ({type(e).__name__} while decoding); "
            "the file is damaged or unusual, re-export it",
        ) from None


# ----------------------------------------------------------------------------- headers


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


def _read_header(source: Path | bytes, index: int) -> _Header:
    with _guard(_label(source, index)), _quiet():
        return _read_header_unguarded(source, index)


def _read_header_unguarded(source: Path | bytes, index: int) -> _Header:
    label = _label(source, index)
    ds = _dcmread(source, label, headers_only=True)
    meta = getattr(ds, "file_meta", None)
    if (
        meta is not None
        and _text(_get(meta, "MediaStorageSOPClassUID")) == _MEDIA_DIRECTORY_STORAGE
    ):
        raise DicomError(
            "not_image", f"{label}: is a DICOMDIR (media index), not an image; ignore it"
        )
    study_uid = _text(_get(ds, "StudyInstanceUID"))
    if not study_uid or not _UID_RE.match(study_uid):
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
        modality=(_text(_get(ds, "Modality")) or "").upper(),
        image_type=_strs(_get(ds, "ImageType")),
        n_frames=n_frames,
        thickness=thickness,
        series_number=_int(_get(ds, "SeriesNumber")),
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


# ------------------------------------------------------------------------ folder scan


def scan_folder(root: Path) -> tuple[dict[str, list[Path]], list[Rejection]]:
    """Walk ``root`` recursively (not following folder links), read headers only, and
    group the files by StudyInstanceUID (never by folder or file name).

    Returns ``({study_uid: sorted paths}, rejections)``; non-DICOM, unreadable, damaged
    files and files without a StudyInstanceUID become :class:`Rejection`s. ``root`` may
    also be a single file. Raises ``DicomError("not_found")`` when ``root`` does not exist.
    """
    root = Path(root)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files.extend(Path(dirpath) / name for name in sorted(filenames))
    else:
        raise DicomError("not_found", f"{root}: no such file or folder; check the path")

    studies: dict[str, list[Path]] = {}
    rejections: list[Rejection] = []
    for i, path in enumerate(files):
        if not path.is_file():
            rejections.append(Rejection(str(path), f"{path}: not a regular file (broken link?)"))
            continue
        try:
            h = _read_header(path, i)
        except DicomError as e:
            rejections.append(Rejection(str(path), str(e)))
            continue
        studies.setdefault(h.study_uid, []).append(path)
    for paths in studies.values():
        paths.sort()
    log.info("scanned %d files: %d studies, %d rejected", len(files), len(studies), len(rejections))
    return studies, rejections


# ----------------------------------------------------------------------- series choice


def _series_name(headers: list[_Header]) -> str:
    num = headers[0].series_number
    return f"series #{num}" if num is not None else "series (no number)"


def _skip_reason(rule: SeriesRule, headers: list[_Header]) -> str | None:
    h0 = headers[0]
    allowed = tuple(m.upper() for m in rule.modalities)
    if h0.modality not in allowed:
        return f"modality {h0.modality or '?'} not in {'/'.join(allowed)}"
    types = set().union(*(h.image_type for h in headers))
    if not rule.allow_localizer and types & {"LOCALIZER", "SCOUT"}:
        return "localizer/scout"
    if not rule.allow_derived:
        for h in headers:
            it = h.image_type
            if (len(it) > 0 and it[0] == "DERIVED") or (len(it) > 1 and it[1] == "SECONDARY"):
                return "derived/secondary image"
    thick = [h.thickness for h in headers if h.thickness is not None]
    if thick and max(thick) > rule.max_slice_thickness_mm + 1e-6:
        return f"slices {max(thick):g} mm thick (> {rule.max_slice_thickness_mm:g} mm)"
    n = sum(h.n_frames for h in headers)
    if n < rule.min_slices:
        return f"{n} slice{'s' if n != 1 else ''} (< {rule.min_slices})"
    return None


def _rank_series(
    rule: SeriesRule, series: dict[str, list[_Header]]
) -> tuple[list[list[_Header]], list[str]]:
    """Qualifying series, best first, and one note per skipped series."""
    qualifying: list[list[_Header]] = []
    skipped: list[str] = []
    for headers in series.values():
        why = _skip_reason(rule, headers)
        if why is None:
            qualifying.append(headers)
        else:
            skipped.append(f"{_series_name(headers)}: {why}")
    if rule.prefer_axial and qualifying:
        axial = [s for s in qualifying if _orientation_of(s[0]) == "axial"]
        if axial and len(axial) < len(qualifying):
            for s in qualifying:
                if s not in axial:
                    skipped.append(
                        f"{_series_name(s)}: {_orientation_of(s[0])}, an axial series exists"
                    )
            qualifying = axial

    def key(headers: list[_Header]) -> tuple[int, float, int]:
        thick = [h.thickness for h in headers if h.thickness is not None]
        num = headers[0].series_number
        return (
            -sum(h.n_frames for h in headers),
            max(thick) if thick else math.inf,
            num if num is not None else 1 << 30,
        )

    qualifying.sort(key=key)
    return qualifying, skipped


# ---------------------------------------------------------------------------- geometry


@dataclass
class _Frame:
    header: _Header
    frame: int  # index within its file
    position: np.ndarray  # (3,) mm
    iop: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,) row, column spacing in mm
    slope: float
    intercept: float


def _positions(h: _Header, iop: np.ndarray, notes: list[str]) -> list[np.ndarray]:
    """One ImagePositionPatient per frame of a file."""
    ds, label = h.ds, h.label
    top = _floats(_get(ds, "ImagePositionPatient"), 3)
    if h.n_frames == 1:
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if top is None and per_frame is not None and len(per_frame) > 0:
            items = _get(per_frame[0], "PlanePositionSequence")
            if items is not None and len(items) > 0:
                top = _floats(_get(items[0], "ImagePositionPatient"), 3)
        if top is None:
            raise DicomError(
                "missing_tag",
                f"{label}: ImagePositionPatient missing or malformed; cannot order the slices",
            )
        return [top]
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    found: list[np.ndarray | None] = []
    if per_frame is not None and len(per_frame) == h.n_frames:
        for item in per_frame:
            seq = _get(item, "PlanePositionSequence")
            found.append(
                _floats(_get(seq[0], "ImagePositionPatient"), 3)
                if seq is not None and len(seq)
                else None
            )
    if found and all(p is not None for p in found):
        return [p for p in found if p is not None]
    # Simple multi-frame: frames stacked along the normal from the first position.
    step = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
    if step is None or step <= 0:
        step = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    if step is None or step <= 0:
        raise DicomError(
            "missing_tag",
            f"{label}: multi-frame file without per-frame positions, SpacingBetweenSlices or "
            "SliceThickness; cannot place the frames",
        )
    origin = found[0] if found and found[0] is not None else top
    if origin is None:
        origin = np.zeros(3)
        notes.append("multi-frame without positions: origin assumed at 0")
    notes.append(f"multi-frame without per-frame positions: {step:g} mm steps assumed")
    normal = np.cross(iop[:3], iop[3:])
    return [origin + f * step * normal for f in range(h.n_frames)]


def _frames_of(h: _Header, notes: list[str]) -> list[_Frame]:
    ds, label = h.ds, h.label
    iop0 = _floats(_fg_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if iop0 is None:
        if h.n_frames == 1:
            raise DicomError(
                "missing_tag",
                f"{label}: ImageOrientationPatient missing or malformed; cannot place the slice",
            )
        iop0 = np.asarray(_IDENTITY_IOP)
        notes.append("multi-frame without orientation: assumed axial")
    positions = _positions(h, iop0, notes)
    frames: list[_Frame] = []
    for f in range(h.n_frames):
        iop = iop0
        if f > 0:
            iop = _floats(
                _fg_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
            )  # type: ignore[assignment]
            if iop is None:
                iop = iop0
        ps = _floats(_fg_value(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ps is None or not np.all(ps > 0):
            raise DicomError(
                "missing_tag",
                f"{label}: PixelSpacing missing, malformed or not positive; cannot size the slice",
            )
        raw_slope = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        raw_intercept = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        slope = 1.0 if raw_slope is None else _float(raw_slope)
        intercept = 0.0 if raw_intercept is None else _float(raw_intercept)
        if slope is None or slope == 0.0 or intercept is None:
            raise DicomError(
                "bad_rescale",
                f"{label}: RescaleSlope/RescaleIntercept are non-numeric or the slope is zero "
                f"(slope={_text(raw_slope, 16)!r}, intercept={_text(raw_intercept, 16)!r}); "
                "the pixel values cannot be converted to HU; re-export the series",
            )
        frames.append(_Frame(h, f, positions[f], iop, ps, slope, intercept))
    return frames


@dataclass
class _Geometry:
    frames: list[_Frame]  # in volume order (after sorting; duplicates kept, see groups)
    groups: list[list[int]]  # indices into frames sharing one position; first is kept
    spacing: tuple[float, float, float]
    flips: tuple[bool, bool]  # flip (y, x) axes to canonical orientation
    notes: list[str]


def _geometry(headers: list[_Header], notes: list[str]) -> _Geometry:
    first = headers[0].label
    where = f"{first} ({_series_name(headers)}, {len(headers)} files)"
    rows = {(_int(_get(h.ds, "Rows")), _int(_get(h.ds, "Columns"))) for h in headers}
    if len(rows) != 1:
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different Rows/Columns {sorted(rows, key=str)}; "
            "the series mixes image sizes, split it",
        )
    frames: list[_Frame] = []
    for h in headers:
        frames.extend(_frames_of(h, notes))
    iops = np.stack([f.iop for f in frames])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different ImageOrientationPatient; "
            "the series mixes orientations, split it",
        )
    pss = np.stack([f.pixel_spacing for f in frames])
    if np.abs(pss - pss[0]).max() > 1e-3 * max(1.0, float(pss[0].max())):
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different PixelSpacing; the series mixes fields of view, split it",
        )
    row_cos, col_cos = iops[0][:3], iops[0][3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-2
        or abs(np.linalg.norm(col_cos) - 1) > 1e-2
        or abs(float(row_cos @ col_cos)) > 1e-2
    ):
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: ImageOrientationPatient is not two orthonormal directions; re-export the series",
        )
    normal = np.cross(row_cos, col_cos)
    # Canonical orientation: axis index grows along the dominant patient axis (LPS).
    dom = int(np.argmax(np.abs(normal)))
    descending = bool(normal[dom] < 0)
    dist = np.array([float(normal @ f.position) for f in frames])
    order = np.argsort(-dist if descending else dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]

    groups: list[list[int]] = []
    tol = 1e-2  # mm
    for i in range(len(frames)):
        if groups and abs(dist[i] - dist[groups[-1][0]]) < tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    unique = np.array([dist[g[0]] for g in groups])
    if len(unique) > 1:
        gaps = np.abs(np.diff(unique))
        dz = float(np.median(gaps))
        if gaps.max() > 1.5 * dz or gaps.min() < 0.5 * dz:
            raise DicomError(
                "inconsistent_geometry",
                f"{where}: slice spacing is irregular ({gaps.min():.3g}-{gaps.max():.3g} mm, "
                f"median {dz:.3g} mm); slices are missing or the series holds several stacks",
            )
    else:
        step = _float(_fg_value(headers[0].ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        dz = step or headers[0].thickness or 1.0
        notes.append(f"single slice: z spacing {dz:g} mm from the header")
    flips = tuple(
        bool(abs(v[int(np.argmax(np.abs(v)))]) > 0.8 and v[int(np.argmax(np.abs(v)))] < 0)
        for v in (col_cos, row_cos)
    )
    if descending or any(flips):
        axes = [n for n, on in zip(("z", "y", "x"), (descending, *flips), strict=True) if on]
        notes.append("flipped to canonical orientation along " + "/".join(axes))
    ps = frames[0].pixel_spacing
    return _Geometry(
        frames=frames,
        groups=groups,
        spacing=(dz, float(ps[0]), float(ps[1])),
        flips=(flips[0], flips[1]),
        notes=notes,
    )


# ---------------------------------------------------------------------------- pixels


def _check_size(headers: list[_Header]) -> None:
    """Caps on declared sizes, checked before any pixel data is read."""
    first = headers[0].label
    n = sum(h.n_frames for h in headers)
    if n > MAX_SLICES:
        raise DicomError(
            "too_large",
            f"{first}: series has {n} slices (cap {MAX_SLICES}); choose a smaller series",
        )
    for h in headers:
        r, c = _int(_get(h.ds, "Rows")), _int(_get(h.ds, "Columns"))
        if r is None or c is None or r < 1 or c < 1:
            raise DicomError(
                "missing_tag", f"{h.label}: Rows/Columns missing or invalid; not an image"
            )
        if r > MAX_PIXELS_PER_SLICE_SIDE or c > MAX_PIXELS_PER_SLICE_SIDE:
            raise DicomError(
                "too_large",
                f"{h.label}: declares {r}x{c} pixels (cap {MAX_PIXELS_PER_SLICE_SIDE}"
                f"x{MAX_PIXELS_PER_SLICE_SIDE}); the header is damaged or the image unsupported",
            )
        if n * r * c > MAX_VOXELS:
            raise DicomError(
                "too_large",
                f"{first}: series has {n}x{r}x{c} voxels (cap {MAX_VOXELS}); "
                "choose a smaller series",
            )


def _decode(h: _Header) -> tuple[np.ndarray, float | None]:
    with _guard(h.label), _quiet():
        return _decode_unguarded(h)


def _decode_unguarded(h: _Header) -> tuple[np.ndarray, float | None]:
    """Full read of one file: ``(frames, rows, cols)`` stored values and PixelPaddingValue."""
    label = h.label
    ds = _dcmread(h.source, label, headers_only=False)
    if _text(_get(ds, "BurnedInAnnotation"), 8) == "YES":
        raise DicomError(
            "burned_in_annotation",
            f"{label}: BurnedInAnnotation is YES (text in the pixels may identify the patient); "
            "exclude this series or scrub the pixels first",
        )
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise DicomError(
            "unsupported" if other else "no_pixel_data",
            f"{label}: "
            + ("float pixel data is not supported" if other else "no PixelData; not an image")
            + "; exclude this file",
        )
    rows, cols = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    bits = _int(_get(ds, "BitsAllocated"))
    spp = _int(_get(ds, "SamplesPerPixel")) or 1
    n_frames = max(1, _int(_get(ds, "NumberOfFrames")) or 1)
    photometric = _text(_get(ds, "PhotometricInterpretation"), 16) or ""
    if rows is None or cols is None or bits is None:
        raise DicomError("missing_tag", f"{label}: Rows, Columns or BitsAllocated missing")
    if (rows, cols, n_frames) != (
        _int(_get(h.ds, "Rows")),
        _int(_get(h.ds, "Columns")),
        h.n_frames,
    ):
        raise DicomError("corrupt", f"{label}: header changed between reads; re-run")
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            "unsupported",
            f"{label}: {photometric or '?'} with {spp} samples per pixel; only greyscale "
            "(MONOCHROME1/2) images are supported",
        )
    if bits not in (8, 16, 32):
        raise DicomError("unsupported", f"{label}: BitsAllocated {bits} is not supported")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        tsyntax = pydicom.uid.ImplicitVRLittleEndian
    tsyntax = pydicom.uid.UID(str(tsyntax))
    if not tsyntax.is_transfer_syntax:
        raise DicomError(
            "unsupported",
            f"{label}: TransferSyntaxUID {str(tsyntax)[:64]!r} is not a known transfer syntax; "
            "re-export the file",
        )
    if not tsyntax.is_compressed:
        expected = rows * cols * n_frames * bits // 8
        present = len(ds.PixelData)
        if present < expected:
            raise DicomError(
                "truncated",
                f"{label}: declares {rows}x{cols}x{n_frames} {bits}-bit pixels ({expected} bytes) "
                f"but holds {present}; the file is truncated or the header is wrong",
            )
    else:
        try:
            decoder = pydicom.pixels.get_decoder(tsyntax)
            available = decoder.is_available
        except Exception:
            available = False
        if not available:
            raise DicomError(
                "unsupported",
                f"{label}: no decoder installed for transfer syntax {tsyntax.name}; "
                "decompress the file (e.g. dcmdjpeg) or install the pylibjpeg plugins",
            )
    try:
        with _quiet():
            arr = ds.pixel_array
    except Exception as e:
        raise DicomError(
            "corrupt",
            f"{label}: pixel data cannot be decoded ({type(e).__name__}); the file is damaged, re-export it",
        ) from None
    arr = np.asarray(arr)
    if arr.size != n_frames * rows * cols:
        raise DicomError(
            "corrupt",
            f"{label}: decoded {arr.size} pixels, header declares {n_frames}x{rows}x{cols}; "
            "the file is damaged, re-export it",
        )
    arr = arr.reshape(n_frames, rows, cols)
    padding = _float(_get(ds, "PixelPaddingValue"))
    return arr, padding


def _load_series(headers: list[_Header], notes: list[str]) -> tuple[np.ndarray, _Geometry]:
    _check_size(headers)
    with _guard(headers[0].label):
        geo = _geometry(headers, notes)
    rows = _int(_get(headers[0].ds, "Rows")) or 0
    cols = _int(_get(headers[0].ds, "Columns")) or 0
    n = len(geo.frames)
    volume = np.empty((n, rows, cols), dtype=np.float32)
    slot = {(id(fr.header), fr.frame): i for i, fr in enumerate(geo.frames)}
    is_ct = headers[0].modality == "CT"
    for h in headers:
        stored, padding = _decode(h)
        for f in range(h.n_frames):
            i = slot[(id(h), f)]
            fr = geo.frames[i]
            values = stored[f].astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept)
            if padding is not None:
                values[stored[f] == padding] = CT_AIR_HU if is_ct else 0.0
            volume[i] = values
        del stored
    # Duplicated positions: drop identical copies, refuse differing ones.
    keep = []
    dropped = 0
    for g in geo.groups:
        for j in g[1:]:
            if np.abs(volume[j] - volume[g[0]]).max() > 0.5:
                raise DicomError(
                    "inconsistent_geometry",
                    f"{geo.frames[j].header.label}: two different slices at the same position "
                    f"(also {geo.frames[g[0]].header.label}); the series holds several stacks "
                    "(phases, echoes, repeats); split it",
                )
            dropped += 1
        keep.append(g[0])
    if dropped:
        volume = volume[keep]
        notes.append(f"dropped {dropped} duplicate slice{'s' if dropped != 1 else ''}")
    if geo.flips[0]:
        volume = volume[:, ::-1, :]
    if geo.flips[1]:
        volume = volume[:, :, ::-1]
    if is_ct:
        # Below air is padding / outside the reconstruction circle (e.g. -2000, -3024).
        np.maximum(volume, CT_AIR_HU, out=volume)
    return np.ascontiguousarray(volume), geo


# ------------------------------------------------------------------------- read_study


def _acquisition(ds: Dataset, spacing: tuple[float, float, float]) -> dict[str, str]:
    """Only non-identifying acquisition parameters, as strings; absent ones omitted."""
    out: dict[str, str] = {}
    for key, keyword in (
        ("modality", "Modality"),
        ("manufacturer", "Manufacturer"),
        ("model", "ManufacturerModelName"),
        ("software", "SoftwareVersions"),
        ("kernel", "ConvolutionKernel"),
        ("sequence", "SequenceName"),
        ("protocol", "ProtocolName"),
    ):
        value = _text(_get(ds, keyword))
        if value:
            out[key] = value
    for key, keyword in (
        ("kvp", "KVP"),
        ("exposure", "Exposure"),
        ("field_strength", "MagneticFieldStrength"),
        ("recon_diameter", "ReconstructionDiameter"),
    ):
        num = _float(_get(ds, keyword))
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


def read_study(
    sources: Sequence[Path | bytes], *, series_rule: SeriesRule = DEFAULT_SERIES_RULE
) -> Study:
    """Decode one study from its files (paths, or raw bytes e.g. from a gRPC request).

    All sources must share one StudyInstanceUID; they are grouped by SeriesInstanceUID and
    one series is chosen by ``series_rule``. Slices are sorted along the slice normal
    (``cross(row, col)`` of ImageOrientationPatient) by ``normal . ImagePositionPatient``,
    never by InstanceNumber; z spacing is the median gap. Identical duplicate slices are
    dropped; differing slices at one position, mixed orientations / sizes / pixel
    spacings or irregular gaps raise ``DicomError("inconsistent_geometry")``.

    Pixel values go through RescaleSlope / RescaleIntercept (HU for CT, clipped below at
    -1024). MR values are kept as rescaled raw floats: their scale is arbitrary per
    scanner, robust normalisation is a later step. Raises :class:`DicomError` only.
    """
    if isinstance(sources, str | bytes | os.PathLike):
        sources = [sources]  # type: ignore[list-item]
    items = [_normalise_source(s, i) for i, s in enumerate(sources)]
    if not items:
        raise DicomError("no_files", "read_study got no files; pass the files of one study")

    with _guard(_label(items[0], 0)), _quiet():
        return _read_study(items, series_rule)


def _read_study(items: list[Path | bytes], series_rule: SeriesRule) -> Study:
    headers = [_read_header(src, i) for i, src in enumerate(items)]
    study_uids = {h.study_uid for h in headers}
    if len(study_uids) > 1:
        raise DicomError(
            "mixed_studies",
            f"{headers[0].label}: the {len(headers)} files belong to {len(study_uids)} "
            "different studies; pass one study at a time (scan_folder groups them)",
        )
    series: dict[str, list[_Header]] = {}
    for h in headers:
        series.setdefault(h.series_uid, []).append(h)

    candidates, skipped = _rank_series(series_rule, series)
    if not candidates:
        raise DicomError(
            "no_usable_series",
            f"{headers[0].label}: no series of the study qualifies ("
            + "; ".join(skipped)
            + "); relax the SeriesRule or pass another study",
        )

    failures: list[tuple[list[_Header], DicomError]] = []
    for chosen in candidates:
        notes: list[str] = []
        try:
            volume, geo = _load_series(chosen, notes)
        except DicomError as e:
            failures.append((chosen, e))
            continue
        break
    else:
        first_error = failures[0][1]
        if len(failures) > 1:
            raise DicomError(
                first_error.reason,
                f"{first_error} (and {len(failures) - 1} other qualifying series failed too)",
            )
        raise first_error

    h0 = geo.frames[0].header
    ds = h0.ds
    n_slices = volume.shape[0]
    thick = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    parts = [
        f"{_series_name(chosen)}: {h0.modality}, {n_slices} slices"
        + (f", {thick:g} mm" if thick is not None else "")
        + f", {_orientation_of(h0)}; most slices of {len(candidates)} qualifying"
    ]
    for bad, err in failures:
        parts.append(f"{_series_name(bad)} skipped: unreadable ({err.reason})")
    if skipped:
        parts.append(f"{len(skipped)} other skipped: " + "; ".join(skipped))
    parts.extend(notes)

    patient_id = _text(_get(ds, "PatientID"), 256)
    if not patient_id:
        # Never merge unrelated studies under one empty id: each becomes its own patient.
        patient_id = f"NO-PATIENT-ID:{h0.study_uid}"
        parts.append("no PatientID: the study is treated as its own patient")
    study = Study(
        study_uid=h0.study_uid,
        patient_id=patient_id,
        series_uid=h0.series_uid,
        modality=h0.modality,
        volume=volume,
        spacing=geo.spacing,
        acquisition=_acquisition(ds, geo.spacing),
        study_date=_parse_date(_get(ds, "StudyDate")),
        series_reason="; ".join(parts),
    )
    log.debug("read study: %d slices, %d series considered", n_slices, len(series))
    return study


# ------------------------------------------------------------------------- preprocess


def _block_mean(volume: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Average non-overlapping blocks (anti-aliased integer downsampling), centred."""
    slices = []
    for n, f in zip(volume.shape, factors, strict=True):
        m = (n // f) * f
        start = (n - m) // 2
        slices.append(slice(start, start + m))
    v = volume[tuple(slices)]
    d, h, w = (s // f for s, f in zip(v.shape, factors, strict=True))
    fz, fy, fx = factors
    return v.reshape(d, fz, h, fy, w, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def _crop_or_pad(volume: np.ndarray, shape: tuple[int, int, int], fill: float) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.float32)
    src, dst = [], []
    for n, t in zip(volume.shape, shape, strict=True):
        if n >= t:
            start = (n - t) // 2
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
        else:
            start = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def preprocess(study: Study, spec: InputSpec) -> np.ndarray:
    """Resample ``study.volume`` to ``spec.spacing_mm`` and centre-crop / pad it to
    ``spec.shape`` with ``spec.pad_value_hu``.

    Downsampling first averages whole blocks (anti-aliasing, and fast on large volumes),
    then linear interpolation (``scipy.ndimage.zoom``, order 1) covers the remaining
    factor. Returns ``(D, H, W) int16`` (rounded, clipped to the int16 range).
    """
    volume = np.asarray(study.volume, dtype=np.float32)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise DicomError(
            "unsupported", f"preprocess: expected a (z, y, x) volume, got {volume.shape}"
        )
    spacing = tuple(float(s) for s in study.spacing)
    target = tuple(float(s) for s in spec.spacing_mm)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise DicomError("inconsistent_geometry", f"preprocess: invalid spacing {study.spacing}")
    if not np.isfinite(volume).all():
        volume = np.nan_to_num(volume, nan=spec.pad_value_hu, posinf=32767.0, neginf=-32768.0)

    factors = tuple(
        max(1, min(n, int(t / s + 1e-6)))
        for n, s, t in zip(volume.shape, spacing, target, strict=True)
    )
    if any(f > 1 for f in factors):
        volume = _block_mean(volume, factors)
        spacing = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    zoom = tuple(s / t for s, t in zip(spacing, target, strict=True))
    if any(abs(z - 1.0) > 1e-3 for z in zoom):
        out_shape = tuple(max(1, round(n * z)) for n, z in zip(volume.shape, zoom, strict=True))
        zoom = tuple(o / n for o, n in zip(out_shape, volume.shape, strict=True))
        volume = ndimage.zoom(volume, zoom, order=1, mode="nearest", grid_mode=True)
    d, h, w = (int(s) for s in spec.shape)
    out = _crop_or_pad(volume, (d, h, w), float(spec.pad_value_hu))
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)
