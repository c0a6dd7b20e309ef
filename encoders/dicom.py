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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from scipy import ndimage

from encoders import budget
from encoders.deid import RETAINED_WITH_OPTIONS, clean_descriptor, identifying_values
from encoders.errors import DicomError
from encoders.geometry import AXIAL_DIRECTION, patient_to_voxel, voxel_to_patient
from encoders.spec import InputSpec

__all__ = [
    "ACQUISITION_NUMBERS",
    "ACQUISITION_TEXT",
    "COLOUR_PHOTOMETRIC",
    "DEFAULT_SERIES_RULE",
    "MAX_PIXELS_PER_SLICE_SIDE",
    "MAX_SLICES",
    "MAX_VOXELS",
    "FileHeader",
    "Rejection",
    "SeriesRule",
    "Study",
    "annotation_files",
    "find_files",
    "patient_to_voxel",
    "preprocess",
    "read_file_header",
    "read_pixels",
    "read_study",
    "scan_folder",
    "voxel_to_patient",
]

log = logging.getLogger(__name__)

MAX_SLICES = 2048
"""Most slices (frames) one series may hold."""
MAX_PIXELS_PER_SLICE_SIDE = 4096
"""Most rows / columns one slice may declare."""
MAX_VOXELS = 2**29
"""Most voxels one series may hold (2 GiB as float32; a 512x512x2048 CT fits)."""
MAX_HEADER_BYTES = 64 << 20
"""Most bytes a header (everything before the pixel data) may take."""
MAX_HEADER_READS = 2_000_000
"""Most read calls while parsing a header (~2.5 per element: bounds element bombs)."""
MAX_INFLATED_BYTES = 512 << 20
"""Most bytes a deflated dataset may inflate to."""
MAX_EXTRA_FILE_BYTES = 64 << 20
"""Bytes a file may hold beyond twice its declared pixel data before it is refused."""

CT_AIR_HU = -1024.0
"""Lowest HU kept for CT: padding / outside-of-FOV values below it are air."""

_BURNED_IN_NOTE = "burned_in_annotation (BurnedInAnnotation YES)"
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
    ``(z, y, x)`` in mm. ``units``: ``HU`` (CT), ``SUVbw`` (PET converted to SUV body
    weight), ``PT_raw`` (PET whose tags do not allow SUV), ``MR_raw``, ``raw``;
    :func:`preprocess` normalises by it. ``patient_id`` / ``study_uid`` are raw (pseudonymise before
    storing); without a PatientID, ``patient_id`` is ``"NO-PATIENT-ID:<study_uid>"`` so
    such studies never merge into one patient. ``acquisition`` holds only non-identifying acquisition tags, as strings.

    Geometry (see :mod:`encoders.geometry` for the conventions and the mapping):
    ``origin`` ``(x, y, z)`` mm is the patient position of voxel ``(0, 0, 0)``;
    ``direction`` ``(3, 3)``: row ``i`` is the patient-space unit vector along volume
    axis ``i`` (z, y, x); ``slice_positions`` ``(z,)`` mm along ``direction[0]``,
    increasing; ``slice_uids`` ``(z,)`` the SOPInstanceUID each slice came from (raw; in
    memory only); ``in_plane_flips`` ``(y, x)``: the source images' rows / columns were
    reversed to reach the canonical orientation, so source pixel ``(row r, column c)`` is
    volume ``(rows - 1 - r if flipped else r, ...)``; ``frame_of_reference_uid`` (raw).
    ``ignored_files``: files of the study left out without sinking it (damaged duplicate
    copies of an instance that is also present intact), each with why.
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
    units: str = ""
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION
    slice_positions: tuple[float, ...] = ()
    slice_uids: tuple[str, ...] = ()
    in_plane_flips: tuple[bool, bool] = (False, False)
    frame_of_reference_uid: str = ""
    ignored_files: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesRule:
    """Which series of a study to use.

    A series qualifies when its modality is in ``modalities`` (``"*"`` admits any), it is
    not a localizer / scout (unless ``allow_localizer``), no file of it says
    BurnedInAnnotation YES (unless ``allow_burned_in``: text burned into the pixels may
    name the patient), its slices are at most ``max_slice_thickness_mm`` thick (when
    stated) and it has at least ``min_slices`` slices.

    Refused by name unless ``allow_non_diagnostic``: screen captures (the Secondary
    Capture SOP classes, ImageType SCREEN SAVE), maximum / minimum intensity projections
    (ImageType MIP / MINIP, enhanced Derived Pixel Contrast MAXIMUM / MINIMUM),
    projection images and reformats (ImageType MPR / REFORMATTED / CURVED / PROJECTION):
    their pixels are a rendering, not the acquired anatomy. Annotation objects (SEG,
    RTSTRUCT, SR...) are never an image series; ``encoders.regions`` reads them.

    ImageType ranks what qualifies: ORIGINAL\\PRIMARY first; ORIGINAL\\SECONDARY (images
    created after the examination, e.g. re-sent or re-archived) when no primary series
    qualifies; DERIVED axial series (e.g. a thick-slab or lossy re-encoded copy) when no
    original one does; ``Study.series_reason`` says which it took and why. With
    ``allow_derived`` all three compete on an equal footing and DERIVED need not be axial.
    With ``prefer_axial``, axial series win over others when there is one. Then the one
    with the most slices is chosen (ties: thinner slices, then lower SeriesNumber); if it
    cannot be read, the next one is tried and the reason is recorded in
    ``Study.series_reason``.
    """

    modalities: tuple[str, ...] = ("CT", "MR", "PT")
    allow_localizer: bool = False
    allow_derived: bool = False
    allow_burned_in: bool = False
    allow_non_diagnostic: bool = False
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
    """``ds.keyword`` or None; never raises (bad values read as None). DS / IS values may
    come back as their raw text (``"0.5\\0.5"``): pass them through :func:`_float`,
    :func:`_floats`, :func:`_int` or :func:`_text`."""
    try:
        # A cached keyword -> tag and one dict look-up: 'keyword in ds' / ds.get(keyword)
        # parse the keyword each time, and a missing one costs an exception (~9 us
        # against ~0.4 us; a file takes ~50 look-ups, many of absent elements).
        tag = _TAGS.get(keyword)
        if tag is None:
            number = tag_for_keyword(keyword)
            if number is None:
                return None
            tag = _TAGS.setdefault(keyword, BaseTag(number))
            if dictionary_VR(number) in ("DS", "IS"):
                _NUMBER_TEXT.add(tag)
        if tag not in ds:
            return None
        if tag in _NUMBER_TEXT:
            # Decimal / integer strings: the raw text, as every caller parses numbers
            # itself (_float / _floats); pydicom's DSfloat conversion and validation
            # cost more than the rest of reading such an element.
            elem = ds.get_item(tag)
            raw = getattr(elem, "value", None)
            if isinstance(raw, bytes) and not isinstance(elem, DataElement):
                return raw.decode("ascii", "replace")
        return ds[tag].value
    except Exception:  # pydicom may fail converting a malformed raw element
        return None


_TAGS: dict[str, BaseTag] = {}
_NUMBER_TEXT: set[BaseTag] = set()
"""Tags of DS / IS elements, which :func:`_get` returns as raw text when unconverted."""


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


def _code(value: Any) -> str:
    """A code string (CS: Modality, PhotometricInterpretation) reduced to ``[A-Z0-9_ ]``,
    at most 16 characters: safe to put in a message whatever a hostile file holds."""
    return re.sub(r"[^A-Z0-9_ ]", "", (_text(value, 32) or "").upper()).strip()[:16]


def _numeric_text(value: Any) -> str:
    """A would-be number reduced to number characters, for messages (never free text)."""
    return re.sub(r"[^0-9.eE+\-]", "?", _text(value, 16) or "")


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


class _ReadBudgetExceeded(Exception):
    """Raised by :class:`_BoundedReader` when a read would exceed one of its limits."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _BoundedReader:
    """The file-like object pydicom reads from: bounded in bytes, calls and inflation.

    * a read never asks for more than what remains of the source, so an element that
      claims 4 GiB on a 1 kB file allocates 1 kB (pydicom and Python's buffered reader
      would otherwise allocate the claimed size before reading);
    * a headers-only read stops after :data:`MAX_HEADER_BYTES` bytes and
      :data:`MAX_HEADER_READS` read calls (an "element bomb" of millions of tiny
      elements costs ~400 bytes of Python objects each);
    * a read of everything (pydicom does that only to inflate a deflated dataset) is
      refused when it would inflate beyond :data:`MAX_INFLATED_BYTES` (a zip bomb).
    """

    def __init__(
        self, source: Path | bytes, size: int, *, headers_only: bool, fh: Any = None
    ) -> None:
        self._owns = fh is None  # close only a handle opened here
        if fh is None:
            fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        self._fh: Any = fh
        self._pos = int(fh.seek(0))  # tracked here: pydicom asks tell() for every element
        self._size = size
        self._headers_only = headers_only
        self._reads = 0
        if not isinstance(source, bytes):
            self.name = str(source)

    def read(self, n: int | None = -1) -> bytes:
        self._reads += 1
        if self._headers_only and self._reads > MAX_HEADER_READS:
            raise _ReadBudgetExceeded(
                "too_large",
                f"header holds more than ~{MAX_HEADER_READS // 2} elements; the file is "
                "malformed (an element bomb) or far outside what this reader accepts",
            )
        pos = self._pos
        remaining = max(0, self._size - pos)
        whole = n is None or n < 0
        n = remaining if n is None or n < 0 or n > remaining else n
        if self._headers_only and pos + n > MAX_HEADER_BYTES:
            raise _ReadBudgetExceeded(
                "too_large",
                f"header (the elements before the pixel data) exceeds {MAX_HEADER_BYTES >> 20} MiB",
            )
        data: bytes = self._fh.read(n)
        self._pos = pos + len(data)
        if whole and data:
            _check_inflated_size(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = int(self._fh.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._owns:
            self._fh.close()

    def __enter__(self) -> _BoundedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_inflated_size(data: bytes) -> None:
    """Refuse raw-deflate data that inflates beyond MAX_INFLATED_BYTES; inflates in 16 MiB
    steps and keeps nothing, so the check itself needs little memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, data
    room = budget.remaining()  # the request's decode budget: pydicom holds the data twice
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 16 << 20))
            pending = inflater.unconsumed_tail
            if room is not None and 2 * total > room:
                budget.charge(2 * total, "inflating a deflated dataset")  # raises
            if total > MAX_INFLATED_BYTES:
                raise _ReadBudgetExceeded(
                    "too_large",
                    f"deflated dataset inflates to more than {MAX_INFLATED_BYTES >> 20} MiB "
                    "(a decompression bomb?)",
                )
    except zlib.error:
        return  # not deflate data (or damaged): pydicom reports it
    budget.charge(2 * total, "inflating a deflated dataset")


_EXECUTABLE_MAGIC = ((b"MZ", "a Windows executable (MZ/PE)"), (b"\x7fELF", "an ELF executable"), (b"#!", "a script"))


def _dcmread(
    source: Path | bytes, label: str, *, headers_only: bool
) -> tuple[Dataset, int | None, int]:
    """Read one file with pydicom, mapping every failure to a DicomError.

    Returns the dataset; for a headers-only read, the offset of the element where
    reading stopped (the pixel data, read later by :func:`_read_rest` without parsing
    the header again), None for a full read or a deflated file (whose offsets refer to
    the inflated stream); and the size of the source in bytes.
    """
    with contextlib.ExitStack() as stack:
        return _dcmread_open(source, label, headers_only, stack)


def _dcmread_open(
    source: Path | bytes, label: str, headers_only: bool, stack: contextlib.ExitStack
) -> tuple[Dataset, int | None, int]:
    fh: Any = None
    try:
        if isinstance(source, bytes):
            size = len(source)
            head = source[:132]
        else:
            fh = stack.enter_context(open(source, "rb"))  # noqa: SIM115 (one open per read)
            size = os.fstat(fh.fileno()).st_size
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
    if len(head) == 132 and head[128:132] == b"DICM":
        for magic, what in _EXECUTABLE_MAGIC:
            if head.startswith(magic):
                raise DicomError(
                    "executable_preamble",
                    f"{label}: the 128-byte preamble starts like {what}; the file may be a "
                    "DICOM/executable polyglot (CVE-2019-11687): quarantine it, or zero the "
                    "preamble and re-import",
                )

    def _read(force: bool) -> tuple[Dataset, int]:
        with _BoundedReader(source, size, headers_only=headers_only, fh=fh) as fp, _quiet():
            ds = pydicom.dcmread(fp, stop_before_pixels=headers_only, force=force)
            return ds, fp.tell()

    with _parse_errors(label):
        try:
            ds, stop = _read(force=False)
        except InvalidDicomError:
            if not _looks_like_raw_dataset(head):
                raise DicomError(
                    "not_dicom",
                    f"{label}: not a DICOM file (no 'DICM' marker and no DICOM dataset at the start)",
                ) from None
            ds, stop = _read(force=True)
    meta = getattr(ds, "file_meta", None)
    group_length = _int(_get(meta, "FileMetaInformationGroupLength")) if meta is not None else None
    if head[128:132] == b"DICM" and group_length is not None and size < 144 + group_length:
        raise DicomError(
            "truncated",
            f"{label}: file ends inside its file meta header ({size} bytes, the header alone "
            f"declares {144 + group_length}); re-copy or re-export it",
        )
    _check_not_truncated(ds, label)
    deflated = (
        _text(_get(meta, "TransferSyntaxUID")) == pydicom.uid.DeflatedExplicitVRLittleEndian
        if meta is not None
        else False
    )
    return ds, (stop if headers_only and not deflated else None), size


@contextlib.contextmanager
def _parse_errors(label: str) -> Iterator[None]:
    """Map what pydicom (or :class:`_BoundedReader`) raises on a damaged file to a
    DicomError naming the file."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:
        # pydicom turns any failure inside some reads into a generic OSError ("No tag to
        # read at ..."): what happened first (deep nesting, a read limit) is the reason.
        e = _first_cause(exc)
        if isinstance(e, DicomError):  # the decode budget (encoders.budget), raised in a read
            raise e from None
        if isinstance(e, _ReadBudgetExceeded):
            raise DicomError(e.reason, f"{label}: {e.message}; refusing the file") from None
        if isinstance(e, RecursionError):
            raise DicomError(
                "too_deep",
                f"{label}: sequences are nested too deeply to parse (hundreds of levels); "
                "the file is malformed or hostile, refusing it",
            ) from None
        if isinstance(e, OSError):
            raise DicomError(
                "unreadable",
                f"{label}: cannot be read ({e.strerror or e}); check the path and permissions",
            ) from None
        # pydicom raises many kinds on a damaged file
        kind = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise DicomError(
            kind,
            f"{label}: DICOM file is damaged and cannot be parsed ({type(e).__name__}); re-export it",
        ) from None


def _first_cause(e: BaseException) -> BaseException:
    """A RecursionError or read-limit error in ``e``'s context chain, else ``e``."""
    seen: BaseException | None = e
    for _ in range(32):
        if seen is None:
            break
        if isinstance(seen, RecursionError | _ReadBudgetExceeded | DicomError):
            return seen
        seen = seen.__context__
    return e


def _read_rest(h: _Header, offset: int) -> list[int]:
    """Read the elements of ``h``'s file from ``offset`` (the pixel data and
    whatever follows it) into ``h.ds``; returns their tags (delete them after use).

    This completes the headers-only read without parsing the header a second time. The
    read is bounded like a full read (an element never gets more bytes than the file
    holds) and a value cut short by the end of the file is reported as truncated.
    """
    ds = h.ds
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    added: list[int] = []
    try:
        with (
            _parse_errors(h.label),
            _BoundedReader(h.source, h.size, headers_only=False) as fp,
        ):
            fp.seek(offset)
            for elem in data_element_generator(fp, bool(implicit), bool(little)):  # type: ignore[arg-type]
                ds[elem.tag] = elem
                added.append(int(elem.tag))
        _check_not_truncated(ds, h.label)
    except BaseException:
        _drop(ds, added)
        raise
    return added


def _drop(ds: Dataset, tags: list[int]) -> None:
    """Remove elements :func:`_read_rest` added (and the pixel array pydicom cached)."""
    for tag in tags:
        with contextlib.suppress(KeyError):
            del ds[tag]
    ds._pixel_array = None
    ds._pixel_id = {}


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
            "unexpected",
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


# ------------------------------------------------------------------------ folder scan


@dataclass
class FileHeader:
    """What a folder scan learns from one file's header (raw values: keep in memory only).

    ``annotation`` is ``"SEG"`` / ``"RTSTRUCT"`` for annotation objects (regions of the
    study, read by ``encoders.regions.regions_for_study``; :func:`read_study` sets them
    aside), ``None`` for images and anything else."""

    path: Path
    study_uid: str
    patient_id: str
    study_date: _dt.date | None
    annotation: str | None = None


def find_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively, sorted, folder links not followed), or
    ``[root]`` for a file. Raises ``DicomError("not_found")`` when ``root`` does not exist."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DicomError("not_found", f"{root}: no such file or folder; check the path")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames))
    return files


def read_file_header(path: Path, index: int = 0) -> FileHeader:
    """Read one file's header (no pixel data): study, patient and date, or DicomError."""
    path = Path(path)
    if not path.is_file():
        raise DicomError("not_a_file", f"{path}: not a regular file (broken link?)")
    h = _read_header(path, index)
    patient_id = _text(_get(h.ds, "PatientID"), 256) or f"NO-PATIENT-ID:{h.study_uid}"
    return FileHeader(
        path, h.study_uid, patient_id, _parse_date(_get(h.ds, "StudyDate")), annotation_kind(h)
    )


def scan_folder(root: Path) -> tuple[dict[str, list[Path]], list[Rejection]]:
    """Walk ``root`` recursively (not following folder links), read headers only, and
    group the files by StudyInstanceUID (never by folder or file name).

    Returns ``({study_uid: sorted paths}, rejections)``; non-DICOM, unreadable, damaged
    files and files without a StudyInstanceUID become :class:`Rejection`s. ``root`` may
    also be a single file. Raises ``DicomError("not_found")`` when ``root`` does not exist.
    A study's annotation objects (SEG, RTSTRUCT) stay in its list, not rejected:
    :func:`read_study` sets them aside and :func:`annotation_files` picks them out for
    ``encoders.regions.regions_for_study``.
    """
    files = find_files(root)
    studies: dict[str, list[Path]] = {}
    rejections: list[Rejection] = []
    for i, path in enumerate(files):
        try:
            h = read_file_header(path, i)
        except DicomError as e:
            rejections.append(Rejection(str(path), str(e)))
            continue
        studies.setdefault(h.study_uid, []).append(path)
    for paths in studies.values():
        paths.sort()
    log.info("scanned %d files: %d studies, %d rejected", len(files), len(studies), len(rejections))
    return studies, rejections


def annotation_files(paths: Sequence[Path]) -> list[Path]:
    """The SEG / RTSTRUCT files among one study's ``paths`` (headers only; unreadable
    files are passed over: :func:`scan_folder` reports them)."""
    out = []
    for i, path in enumerate(paths):
        try:
            if read_file_header(Path(path), i).annotation is not None:
                out.append(Path(path))
        except DicomError:
            continue
    return out


# ----------------------------------------------------------------------- series choice


def _series_name(headers: list[_Header]) -> str:
    num = headers[0].series_number
    return f"series #{num}" if num is not None else "series (no number)"


SECONDARY_CAPTURE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}
"""SOP classes of screen captures and scanned / converted images: never a diagnostic volume."""
ANNOTATION_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
}
"""Annotation objects read by ``encoders.regions`` (regions of interest of a study)."""
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
}
_NON_DIAGNOSTIC_TYPES: dict[str, str] = {
    "MIP": "maximum intensity projection (MIP)",
    "MAX IP": "maximum intensity projection (MIP)",
    "MAXIP": "maximum intensity projection (MIP)",
    "MINIP": "minimum intensity projection (MinIP)",
    "MIN IP": "minimum intensity projection (MinIP)",
    "MNIP": "minimum intensity projection (MinIP)",
    "PROJECTION": "projection image",
    "PROJECTION IMAGE": "projection image",
    "MPR": "multiplanar reformat (MPR)",
    "REFORMATTED": "reformatted image (MPR)",
    "REFORMAT": "reformatted image (MPR)",
    "CURVED": "curved reformat",
    "CPR": "curved reformat",
    "SCREEN SAVE": "screen capture",
    "SCREENSHOT": "screen capture",
    "SCREEN CAPTURE": "screen capture",
}
"""ImageType values that mark a rendering rather than acquired slices (any position)."""
_ENHANCED_PROJECTION = {"MAXIMUM": "maximum intensity projection (MIP)",
                        "MINIMUM": "minimum intensity projection (MinIP)"}  # fmt: skip

_TIER_NAMES = ("ORIGINAL\\PRIMARY", "ORIGINAL\\SECONDARY", "DERIVED")


def _uid_of(ds: Dataset, keyword: str) -> str:
    """A UI element's value, from its raw bytes when pydicom has not converted it yet
    (its UID validation costs more than the rest of a header's look-ups)."""
    tag = _TAGS.get(keyword)
    if tag is None:
        _get(ds, keyword)  # caches the tag
        tag = _TAGS.get(keyword)
    try:
        if tag is None or tag not in ds:
            return ""
        raw = getattr(ds.get_item(tag), "value", None)
    except Exception:
        return ""
    if isinstance(raw, bytes):
        return raw.decode("ascii", "replace").strip("\x00 ")[:64]
    return _text(raw, 64) or ""


def _sop_class(h: _Header) -> str:
    return _uid_of(h.ds, "SOPClassUID")


def annotation_kind(h: _Header) -> str | None:
    """'SEG' / 'RTSTRUCT' when the header is an annotation object ``encoders.regions`` reads."""
    kind = ANNOTATION_SOP_CLASSES.get(_sop_class(h))
    if kind is None and h.modality in ("SEG", "RTSTRUCT"):
        kind = h.modality
    return kind


def _refused_by_name(headers: list[_Header]) -> str | None:
    """Why a series is not a diagnostic image volume at all (by SOP class / ImageType)."""
    for h in headers:
        sop = _sop_class(h)
        if sop in SECONDARY_CAPTURE_SOP_CLASSES:
            return f"screen capture / converted image ({SECONDARY_CAPTURE_SOP_CLASSES[sop]} SOP class)"
        it = h.image_type
        for value in it:
            if value in _NON_DIAGNOSTIC_TYPES:
                return f"{_NON_DIAGNOSTIC_TYPES[value]} (ImageType {value})"
        if len(it) > 3 and it[3] in _ENHANCED_PROJECTION:
            return f"{_ENHANCED_PROJECTION[it[3]]} (ImageType {it[3]})"
    return None


def _not_an_image(headers: list[_Header]) -> str | None:
    kind = annotation_kind(headers[0])
    if kind is not None:
        return f"{kind} annotation, not an image (its regions are read by encoders.regions)"
    sop = _sop_class(headers[0])
    for prefix, what in _NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            return f"{what}, not an image"
    return None


def _tier(headers: list[_Header]) -> int:
    """0 ORIGINAL\\PRIMARY (or no ImageType), 1 ORIGINAL\\SECONDARY, 2 DERIVED (the worst file)."""
    worst = 0
    for h in headers:
        it = h.image_type
        if len(it) > 0 and it[0] == "DERIVED":
            return 2
        if len(it) > 1 and it[1] == "SECONDARY":
            worst = 1
    return worst


def _skip_reason(rule: SeriesRule, headers: list[_Header]) -> str | None:
    h0 = headers[0]
    not_image = _not_an_image(headers)
    if not_image is not None:
        return not_image
    if not rule.allow_non_diagnostic:
        refused = _refused_by_name(headers)
        if refused is not None:
            return refused
    allowed = tuple(m.upper() for m in rule.modalities)
    if "*" not in allowed and h0.modality not in allowed:
        return f"modality {h0.modality or '?'} not in {'/'.join(allowed)}"
    if not rule.allow_burned_in and any(h.burned_in for h in headers):
        return _BURNED_IN_NOTE
    types = set().union(*(h.image_type for h in headers))
    if not rule.allow_localizer and types & {"LOCALIZER", "SCOUT"}:
        return "localizer/scout"
    if not rule.allow_derived and _tier(headers) == 2 and _orientation_of(h0) != "axial":
        return f"derived {_orientation_of(h0)} image (only axial DERIVED series are used)"
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

    def key(headers: list[_Header]) -> tuple[int, int, float, int]:
        thick = [h.thickness for h in headers if h.thickness is not None]
        num = headers[0].series_number
        return (
            0 if rule.allow_derived else _tier(headers),
            -sum(h.n_frames for h in headers),
            max(thick) if thick else math.inf,
            num if num is not None else 1 << 30,
        )

    qualifying.sort(key=key)
    return qualifying, skipped


def _tier_note(chosen: list[_Header], candidates: list[list[_Header]], rule: SeriesRule) -> str:
    """What ``series_reason`` says about the chosen series' ImageType when not primary."""
    tier = _tier(chosen)
    if tier == 0:
        return ""
    name = _TIER_NAMES[tier]
    what = (
        "images created after the examination, e.g. re-sent or re-archived"
        if tier == 1
        else "images derived from the acquired ones, e.g. re-formatted or lossy re-encoded"
    )
    if rule.allow_derived:
        return f"{name} ({what}), admitted as equal by the series rule"
    better = [c for c in candidates if _tier(c) < tier]
    why = (
        f"the {_TIER_NAMES[min(_tier(c) for c in better)]} series could not be read"
        if better
        else f"no {' or '.join(_TIER_NAMES[:tier])} series qualifies"
    )
    return f"{name} ({what}), used because {why}"


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


def _frame_stack_key(ds: Dataset, frame: int) -> tuple[str, str, str]:
    """(StackID, TemporalPositionIndex, echo time) of one frame of an enhanced object."""
    stack = _text(_fg_value(ds, frame, "FrameContentSequence", "StackID"), 16) or ""
    temporal = _text(_fg_value(ds, frame, "FrameContentSequence", "TemporalPositionIndex"), 16)
    echo = _text(_fg_value(ds, frame, "MREchoSequence", "EffectiveEchoTime"), 16)
    return stack, temporal or "", echo or ""


def _frames_to_keep(h: _Header, notes: list[str]) -> list[int]:
    """Frame indices of one stack of a multi-frame file.

    An enhanced CT / MR object may hold several stacks, temporal positions (phases) or
    echoes in one file (per-frame FrameContentSequence / MREchoSequence). One volume is
    one of them: the stack with the most frames (ties: the lowest key), said in the notes.
    """
    if h.n_frames == 1 or _get(h.ds, "PerFrameFunctionalGroupsSequence") is None:
        return list(range(h.n_frames))
    groups: dict[tuple[str, str, str], list[int]] = {}
    for f in range(h.n_frames):
        groups.setdefault(_frame_stack_key(h.ds, f), []).append(f)
    if len(groups) == 1:
        return list(range(h.n_frames))
    key = min(groups, key=lambda k: (-len(groups[k]), _natural(k)))
    what = ", ".join(
        f"{name} {value}"
        for name, value in zip(("stack", "temporal position", "echo time"), key, strict=True)
        if value
    )
    notes.append(
        f"multi-frame holds {len(groups)} stacks/phases/echoes; kept {what or 'the first'} "
        f"({len(groups[key])} of {h.n_frames} frames)"
    )
    return groups[key]


def _natural(key: tuple[str, ...]) -> tuple[tuple[float, str], ...]:
    """Sort key that orders numeric strings by value ("2" < "10")."""
    out = []
    for k in key:
        f = _float(k)
        out.append((f if f is not None else math.inf, k))
    return tuple(out)


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
    for f in _frames_to_keep(h, notes):
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
                f"(slope={_numeric_text(raw_slope)!r}, intercept={_numeric_text(raw_intercept)!r}); "
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
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # patient mm of voxel (0, 0, 0)
    direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION  # rows: z, y, x axes
    positions: tuple[float, ...] = ()  # one per group, along direction[0], increasing


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
        _check_regular(where, unique * (-1.0 if descending else 1.0), gaps, dz)
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
    n_rows, n_cols = next(iter(rows))
    axis_z = -normal if descending else normal
    axis_y = -col_cos if flips[0] else col_cos
    axis_x = -row_cos if flips[1] else row_cos
    origin = np.asarray(frames[0].position, dtype=np.float64).copy()
    if flips[0]:  # voxel row 0 is the source's last row
        origin += ((n_rows or 1) - 1) * float(ps[0]) * col_cos
    if flips[1]:
        origin += ((n_cols or 1) - 1) * float(ps[1]) * row_cos
    return _Geometry(
        frames=frames,
        groups=groups,
        spacing=(dz, float(ps[0]), float(ps[1])),
        flips=(flips[0], flips[1]),
        notes=notes,
        origin=_vec3(origin),
        direction=(_vec3(axis_z), _vec3(axis_y), _vec3(axis_x)),
        positions=tuple(float(axis_z @ frames[g[0]].position) for g in groups),
    )


def _vec3(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _check_regular(where: str, positions: np.ndarray, gaps: np.ndarray, dz: float) -> None:
    """Refuse a stack whose slice positions (mm, sorted) are not one regular grid.

    Gaps that are whole multiples (2x, 3x, ...) of the regular step while every other
    gap is one step are missing slices: refused ``missing_slices``, naming where the gap
    is (positions along the slice normal, mm; never an identifier). Anything else
    irregular (several stacks, variable spacing) is ``inconsistent_geometry``.
    """
    if gaps.max() <= 1.5 * dz and gaps.min() >= 0.5 * dz:
        return
    ratio = gaps / dz
    whole = np.abs(ratio - np.rint(ratio)) <= 0.1 * np.maximum(1.0, np.rint(ratio))
    at = np.flatnonzero(np.rint(ratio) >= 2)
    # Three or more wide steps in a row are a zone of coarser spacing, not lost slices.
    runs = np.split(at, np.flatnonzero(np.diff(at) != 1) + 1) if at.size else []
    zone = max((len(r) for r in runs), default=0) >= 3
    if gaps.min() >= 0.5 * dz and bool(np.all(whole)) and not zone:
        holes = [
            f"{positions[i]:.1f} to {positions[i + 1]:.1f} mm "
            f"({int(np.rint(ratio[i])) - 1} slice{'s' if np.rint(ratio[i]) > 2 else ''})"
            for i in at[:5]
        ]
        more = f" and {len(at) - 5} more gaps" if len(at) > 5 else ""
        missing = int(np.sum(np.rint(ratio[at]) - 1))
        raise DicomError(
            "missing_slices",
            f"{where}: {missing} slice{'s are' if missing != 1 else ' is'} missing from a "
            f"regular {dz:.3g} mm stack, between slice positions " + "; ".join(holes) + more
            + " along the slice normal; re-send the complete series",
        )
    raise DicomError(
        "inconsistent_geometry",
        f"{where}: slice spacing is irregular ({gaps.min():.3g}-{gaps.max():.3g} mm, "
        f"median {dz:.3g} mm); the series holds several stacks or "
        + ("changes its spacing part-way" if zone else "variable spacing"),
    )


# ---------------------------------------------------------------------------- pixels


def _check_size(headers: list[_Header]) -> None:
    """Caps on declared sizes and a consistent pixel description, checked on the headers
    before any pixel data is read (so nothing is allocated for an absurd header)."""
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
        _check_pixel_description(h)
        bits = _int(_get(h.ds, "BitsAllocated")) or 16
        spp = min(4, max(1, _int(_get(h.ds, "SamplesPerPixel")) or 1))
        declared = r * c * h.n_frames * max(1, bits // 8) * spp
        if h.size > 2 * declared + MAX_EXTRA_FILE_BYTES:
            raise DicomError(
                "too_large",
                f"{h.label}: file holds {h.size} bytes but its declared image needs about "
                f"{declared}; it carries unexpected data, refusing it",
            )


COLOUR_PHOTOMETRIC: dict[str, int] = {
    "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_RCT": 3, "YBR_ICT": 3,
    "YBR_PARTIAL_420": 3, "PALETTE COLOR": 1,
}  # fmt: skip
"""Colour photometric interpretations read by conversion to grey, with their
SamplesPerPixel. The grey value is the luminance (ITU-R BT.601 weights 0.299, 0.587,
0.114) of the RGB pixel: pydicom turns YBR into RGB while decoding and a palette is
applied with ``pydicom.pixels.apply_color_lut``. Colour CT and PET are refused: their
values are a rendering, not HU or activity, so no grey conversion can give them back;
other modalities (MR, and any admitted by the SeriesRule) are normalised by percentiles
anyway, so luminance serves them."""
_QUANTITATIVE = {"CT": "Hounsfield units", "PT": "activity concentrations"}
_LUMA = (0.299, 0.587, 0.114)


def _check_pixel_description(h: _Header) -> None:
    """Samples, photometric interpretation and bit depths must describe a greyscale
    image or a colour one of :data:`COLOUR_PHOTOMETRIC` (not CT / PET)."""
    ds, label = h.ds, h.label
    spp = _int(_get(ds, "SamplesPerPixel"))
    photometric = _code(_get(ds, "PhotometricInterpretation"))
    bits = _int(_get(ds, "BitsAllocated"))
    stored = _int(_get(ds, "BitsStored"))
    if spp is None and not photometric:
        raise DicomError(
            "missing_tag",
            f"{label}: SamplesPerPixel and PhotometricInterpretation missing; not an image",
        )
    spp = 1 if spp is None else spp
    mono = photometric in ("MONOCHROME1", "MONOCHROME2")
    if mono and spp != 1:
        raise DicomError(
            "inconsistent_header",
            f"{label}: {photometric} with SamplesPerPixel {spp} (must be 1); the header "
            "contradicts itself, re-export the file",
        )
    if not mono:
        expected = COLOUR_PHOTOMETRIC.get(photometric)
        if expected is None:
            raise DicomError(
                "unsupported",
                f"{label}: PhotometricInterpretation {photometric or '?'} with {spp} samples "
                "per pixel is not supported (greyscale MONOCHROME1/2 is; RGB, YBR_* and "
                "PALETTE COLOR are converted to grey)",
            )
        if spp != expected:
            raise DicomError(
                "inconsistent_header",
                f"{label}: {photometric} with SamplesPerPixel {spp} (must be {expected}); the "
                "header contradicts itself, re-export the file",
            )
        if h.modality in _QUANTITATIVE:
            raise DicomError(
                "unsupported",
                f"{label}: {h.modality} image stored as {photometric}: colour values are a "
                f"rendering, not {_QUANTITATIVE[h.modality]}; use the original greyscale series",
            )
    if bits is None:
        raise DicomError("missing_tag", f"{label}: BitsAllocated missing; not an image")
    if bits not in (8, 16, 32):
        raise DicomError("unsupported", f"{label}: BitsAllocated {bits} is not supported")
    if stored is not None and not 1 <= stored <= bits:
        raise DicomError(
            "inconsistent_header",
            f"{label}: BitsStored {stored} does not fit BitsAllocated {bits}; re-export the file",
        )


def _decode(h: _Header) -> tuple[np.ndarray, float | None]:
    with _guard(h.label), _quiet():
        return _decode_unguarded(h)


def read_pixels(source: Path | bytes) -> np.ndarray:
    """One file's stored pixel values ``(frames, rows, cols)`` (colour images: their
    grey luminance, see :data:`COLOUR_PHOTOMETRIC`), with every check of
    :func:`read_study` on the way (header first, sizes before allocation, pixel
    description, transfer syntax, decoder) but no geometry or rescale. Raises
    :class:`DicomError` only; for tests, tools and codec checks."""
    src = _normalise_source(source, 0)
    h = _read_header(src, 0, need_study=False)
    _check_size([h])
    arr = _decode(h)[0]
    return arr if arr.flags.writeable else arr.copy()


def _decode_unguarded(h: _Header) -> tuple[np.ndarray, float | None]:
    """One file's ``(frames, rows, cols)`` stored values and PixelPaddingValue.

    The header parsed by :func:`_read_header` is completed with the pixel data element
    (:func:`_read_rest`), so each file is parsed once; a deflated file is read again in
    full. The pixel elements are dropped from the header afterwards (bounded memory).
    """
    if h.pixel_offset is None:
        return _decode_dataset(h, _dcmread(h.source, h.label, headers_only=False)[0])
    added = _read_rest(h, h.pixel_offset)
    try:
        return _decode_dataset(h, h.ds)
    finally:
        _drop(h.ds, added)


def _decode_dataset(h: _Header, ds: Dataset) -> tuple[np.ndarray, float | None]:
    label = h.label
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
    photometric = _code(_get(ds, "PhotometricInterpretation"))
    if rows is None or cols is None or bits is None:
        raise DicomError("missing_tag", f"{label}: Rows, Columns or BitsAllocated missing")
    if (rows, cols, n_frames) != (
        _int(_get(h.ds, "Rows")),
        _int(_get(h.ds, "Columns")),
        h.n_frames,
    ):
        raise DicomError("corrupt", f"{label}: header changed between reads; re-run")
    mono = photometric in ("MONOCHROME1", "MONOCHROME2")
    if (spp != 1 or not mono) and COLOUR_PHOTOMETRIC.get(photometric) != spp:
        raise DicomError(
            "unsupported",
            f"{label}: {photometric or '?'} with {spp} samples per pixel; greyscale "
            "(MONOCHROME1/2) and RGB / YBR / PALETTE COLOR images are supported",
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
            f"{label}: TransferSyntaxUID {re.sub(r'[^0-9.]', '', str(tsyntax))[:64]!r} is not a "
            "known transfer syntax; "
            "re-export the file",
        )
    encapsulated = bool(getattr(ds["PixelData"], "is_undefined_length", False))
    if tsyntax.is_compressed != encapsulated:
        raise DicomError(
            "transfer_syntax_mismatch",
            f"{label}: TransferSyntaxUID says {tsyntax.name} but the pixel data is "
            + ("encapsulated (compressed)" if encapsulated else "native (uncompressed)")
            + "; the transfer syntax lies about the encoding, re-export the file",
        )
    if not tsyntax.is_compressed:
        # YBR_FULL_422 stores two samples per pixel (chroma shared by pixel pairs).
        samples = 2 if photometric == "YBR_FULL_422" else spp
        expected = rows * cols * n_frames * samples * bits // 8
        present = len(ds.PixelData)
        if present < expected:
            raise DicomError(
                "truncated",
                f"{label}: declares {rows}x{cols}x{n_frames} {bits}-bit pixels ({expected} bytes) "
                f"but holds {present}; the file is truncated or the header is wrong",
            )
    else:
        _require_decoder(tsyntax, label)
    fast = _native_view(ds, tsyntax, photometric, bits, spp, rows * cols * n_frames)
    try:
        with _quiet():
            arr = fast if fast is not None else ds.pixel_array
    except Exception as e:
        raise DicomError(
            "corrupt",
            f"{label}: pixel data cannot be decoded ({type(e).__name__}); the file is damaged, re-export it",
        ) from None
    arr = np.asarray(arr)
    if not mono:
        arr = _to_grey(arr, ds, photometric, label)
    if arr.size != n_frames * rows * cols:
        raise DicomError(
            "corrupt",
            f"{label}: decoded {arr.size} pixels, header declares {n_frames}x{rows}x{cols}; "
            "the file is damaged, re-export it",
        )
    arr = arr.reshape(n_frames, rows, cols)
    padding = _float(_get(ds, "PixelPaddingValue"))
    return arr, padding


_NATIVE_LE = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian})


def _native_view(
    ds: Dataset, tsyntax: pydicom.uid.UID, photometric: str, bits: int, spp: int, count: int
) -> np.ndarray | None:
    """The pixel values as a read-only view of the PixelData bytes, for the common case
    where that is exactly what pydicom would decode: native little endian, greyscale,
    BitsStored equal to BitsAllocated (no sign extension or masking to do). None
    otherwise (then pydicom decodes). Saves pydicom's per-frame copy and option checks
    (~0.15 ms per 512 x 512 slice); the length was checked against the header before."""
    if tsyntax not in _NATIVE_LE or spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    representation = _int(_get(ds, "PixelRepresentation"))
    if _int(_get(ds, "BitsStored")) != bits or representation not in (0, 1):
        return None
    data = _get(ds, "PixelData")
    if not isinstance(data, bytes):
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=count)


def _to_grey(arr: np.ndarray, ds: Dataset, photometric: str, label: str) -> np.ndarray:
    """A decoded colour image as grey luminance, in the integer type it was stored in.

    ``arr`` is what pydicom decoded: RGB samples last (YBR already converted to RGB) or,
    for PALETTE COLOR, palette indices (the palette is applied first).
    """
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DicomError(
                "missing_tag",
                f"{label}: PALETTE COLOR without a usable palette ({type(e).__name__} "
                "applying the Red/Green/Blue Palette Color Lookup Tables); re-export the file",
            ) from None
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise DicomError(
            "corrupt",
            f"{label}: {photometric} decoded to shape {arr.shape}, not RGB samples; "
            "the file is damaged, re-export it",
        )
    work = np.dtype(np.float64 if arr.dtype.itemsize > 2 else np.float32)
    weights = np.asarray(_LUMA, dtype=work)
    grey: np.ndarray = np.tensordot(arr.astype(work, copy=False), weights, axes=([-1], [0]))
    info = np.iinfo(arr.dtype) if arr.dtype.kind in "iu" else None
    if info is None:
        return grey.astype(np.float32)
    return np.clip(np.rint(grey), info.min, info.max).astype(arr.dtype)


def _require_decoder(tsyntax: pydicom.uid.UID, label: str) -> None:
    """Raise ``missing_codec`` naming the packages when no decoder plugin can run."""
    try:
        decoder = pydicom.pixels.get_decoder(tsyntax)
    except Exception:
        raise DicomError(
            "missing_codec",
            f"{label}: pydicom has no decoder for transfer syntax {tsyntax.name}; "
            "decompress the file first (e.g. gdcmconv --raw or dcmdjpeg)",
        ) from None
    if decoder.is_available:
        return
    missing = "; ".join(str(m) for m in getattr(decoder, "missing_dependencies", []))
    raise DicomError(
        "missing_codec",
        f"{label}: no decoder installed for transfer syntax {tsyntax.name}"
        + (f" ({missing[:200]})" if missing else "")
        + "; install one of those packages (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
        "pylibjpeg-openjpeg) or decompress the file first (gdcmconv --raw)",
    )


def _load_series(headers: list[_Header], notes: list[str]) -> tuple[np.ndarray, _Geometry]:
    _check_size(headers)
    # the float32 volume and (twice, for the decoder's buffers) the largest decoded file,
    # charged to the request's decode budget before anything is allocated
    sizes = [
        (_int(_get(h.ds, "Rows")) or 0) * (_int(_get(h.ds, "Columns")) or 0) * h.n_frames
        * max(1, (_int(_get(h.ds, "BitsAllocated")) or 16) // 8)
        * min(4, max(1, _int(_get(h.ds, "SamplesPerPixel")) or 1))
        for h in headers
    ]
    voxels = sum((_int(_get(h.ds, "Rows")) or 0) * (_int(_get(h.ds, "Columns")) or 0) * h.n_frames for h in headers)
    budget.charge(4 * voxels + 2 * max(sizes, default=0), "the decoded series")
    with _guard(headers[0].label):
        geo = _geometry(headers, notes)
    rows = _int(_get(headers[0].ds, "Rows")) or 0
    cols = _int(_get(headers[0].ds, "Columns")) or 0
    photometric = _code(_get(headers[0].ds, "PhotometricInterpretation"))
    if photometric in COLOUR_PHOTOMETRIC:
        notes.append(f"{photometric} converted to grey (BT.601 luminance)")
    n = len(geo.frames)
    volume = np.empty((n, rows, cols), dtype=np.float32)
    slot = {(id(fr.header), fr.frame): i for i, fr in enumerate(geo.frames)}
    is_ct = headers[0].modality == "CT"
    for h in headers:
        stored, padding = _decode(h)
        for f in range(h.n_frames):
            i = slot.get((id(h), f), -1)
            if i < 0:  # a frame of another stack / phase of a multi-frame file
                continue
            fr = geo.frames[i]
            values = volume[i]  # rescaled in place: no per-slice temporaries
            # One slice at a time while it is in cache: convert and rescale in one pass
            # (slope 1: int -> float32 + intercept), then padding and the CT air floor.
            # Flipped to the canonical orientation on the way in (no whole-volume copy).
            src = stored[f][:: -1 if geo.flips[0] else 1, :: -1 if geo.flips[1] else 1]
            if fr.slope == 1.0:
                np.add(src, np.float32(fr.intercept), out=values, dtype=np.float32)
            else:
                np.multiply(src, np.float32(fr.slope), out=values, dtype=np.float32)
                if fr.intercept != 0.0:
                    values += np.float32(fr.intercept)
            if padding is not None:
                values[src == padding] = CT_AIR_HU if is_ct else 0.0
            if is_ct:
                # Below air is padding / outside the reconstruction circle (-2000, -3024).
                np.maximum(values, np.float32(CT_AIR_HU), out=values)
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
    return volume, geo


# ------------------------------------------------------------------------ intensities


def _parse_time(value: Any) -> _dt.time | None:
    """A DICOM TM value ('HHMMSS.ffffff', also the old 'HH:MM:SS') as a time, or None."""
    s = (_text(value, 32) or "").replace(":", "")
    if len(s) < 4 or not s[:4].isdigit():
        return None
    try:
        hh, mm = int(s[:2]), int(s[2:4])
        ss = float(s[4:]) if len(s) > 4 else 0.0
        if not math.isfinite(ss):
            return None
        return _dt.time(hh, mm, int(ss), round((ss - int(ss)) * 1e6) % 1_000_000)
    except ValueError:
        return None


def _parse_datetime(value: Any) -> _dt.datetime | None:
    """A DICOM DT value ('YYYYMMDDHHMMSS.ffffff', offset ignored) as a naive datetime."""
    s = _text(value, 32) or ""
    s = re.split(r"[+-]", s, maxsplit=1)[0]
    day = _parse_date(s[:8])
    if day is None:
        return None
    clock = _parse_time(s[8:]) if len(s) > 8 else _dt.time(0, 0)
    return None if clock is None else _dt.datetime.combine(day, clock)


def _pet_suv_factor(ds: Dataset) -> tuple[float | None, str]:
    """The factor from the stored activity concentration (Bq/ml) to SUVbw, or None and why.

    SUVbw = C [Bq/ml] x body weight [g] / injected dose [Bq], with the dose decayed to
    the time the image values refer to: the series start for DecayCorrection START, the
    administration for ADMIN. Needs Units BQML (GML means SUVbw already), PatientWeight,
    RadionuclideTotalDose and, for START, RadionuclideHalfLife and the injection and
    series times. Values (weight, dose, times) never appear in the returned note.
    """
    units = (_text(_get(ds, "Units"), 16) or "").upper()
    if units == "GML":
        return 1.0, "PET values are SUVbw already (Units GML)"
    if units != "BQML":
        return None, f"Units is {units or 'missing'}, not BQML"
    correction = (_text(_get(ds, "DecayCorrection"), 16) or "").upper()
    if correction not in ("START", "ADMIN"):
        return None, f"DecayCorrection is {correction or 'missing'}, not START or ADMIN"
    weight = _float(_get(ds, "PatientWeight"))
    if weight is None or not 1.0 <= weight <= 500.0:
        return None, "PatientWeight is missing or implausible"
    seq = _get(ds, "RadiopharmaceuticalInformationSequence")
    item = seq[0] if seq is not None and len(seq) > 0 else Dataset()
    dose = _float(_get(item, "RadionuclideTotalDose"))
    if dose is None or dose <= 0:
        return None, "RadionuclideTotalDose is missing or not positive"
    decay = 1.0
    if correction == "START":
        half_life = _float(_get(item, "RadionuclideHalfLife"))
        if half_life is None or half_life <= 0:
            return None, "RadionuclideHalfLife is missing or not positive"
        injected = _parse_datetime(_get(item, "RadiopharmaceuticalStartDateTime"))
        day = _parse_date(_get(ds, "SeriesDate")) or _parse_date(_get(ds, "StudyDate"))
        dated = injected is not None
        if injected is None:
            clock = _parse_time(_get(item, "RadiopharmaceuticalStartTime"))
            if clock is None:
                return None, "the injection time is missing"
            injected = _dt.datetime.combine(day or _dt.date(2000, 1, 1), clock)
            dated = day is not None
        series_clock = _parse_time(_get(ds, "SeriesTime")) or _parse_time(
            _get(ds, "AcquisitionTime")
        )
        if series_clock is None:
            return None, "SeriesTime / AcquisitionTime is missing"
        started = _dt.datetime.combine(day or injected.date(), series_clock)
        delay = (started - injected).total_seconds()
        if delay < 0 and not dated:
            delay += 86400.0  # times only: the scan started after midnight
        if not 0.0 <= delay <= 86400.0:
            return None, "the injection and series times are inconsistent"
        decay = 0.5 ** (delay / half_life)
    return weight * 1000.0 / (dose * decay), f"PET values converted to SUVbw (decay corrected to {correction})"


INTENSITY_HU = "HU"
INTENSITY_SUV = "SUVbw_x100"
INTENSITY_PERCENTILE = "percentile_norm"
SUV_SCALE = 100.0
"""Stored value per unit of SUV (int16 store: 0.01 SUV steps, up to SUV 327)."""
NORM_PERCENTILES = (1.0, 99.0)
"""Robust normalisation: these foreground percentiles map to 0 and NORM_SCALE."""
NORM_SCALE = 1000.0
NORM_MAX = 4000.0
"""Normalised values are clipped to [0, NORM_MAX]."""


def _intensity_unit(study: Study) -> str:
    """How :func:`preprocess` scales ``study``: HU (CT), SUV x 100 (PET) or percentiles."""
    if study.units == "HU" or (not study.units and study.modality == "CT"):
        return INTENSITY_HU
    if study.units == "SUVbw":
        return INTENSITY_SUV
    return INTENSITY_PERCENTILE


def _robust_normalise(volume: np.ndarray) -> np.ndarray:
    """Map the 1st / 99th percentile of the foreground to 0 / 1000 (clipped to [0, 4000]).

    Foreground: voxels above 5 % of the volume's 99.5th percentile (MR / PET background
    is near zero). Percentiles come from a strided sample of at most ~2 M voxels, so
    the cost is bounded and the result deterministic.
    """
    flat = volume.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step]
    top = float(np.percentile(sample, 99.5))
    fg = sample[sample > 0.05 * top] if top > 0 else sample
    if fg.size < 16:
        fg = sample
    lo, hi = (float(v) for v in np.percentile(fg, NORM_PERCENTILES))
    if not hi > lo:
        hi = lo + 1.0
    out = (volume - np.float32(lo)) * np.float32(NORM_SCALE / (hi - lo))
    return np.clip(out, 0.0, NORM_MAX, out=out)


# ------------------------------------------------------------------------- read_study


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


def read_study(
    sources: Sequence[Path | bytes], *, series_rule: SeriesRule = DEFAULT_SERIES_RULE
) -> Study:
    """Decode one study from its files (paths, or raw bytes e.g. from a gRPC request).

    All sources must share one StudyInstanceUID; they are grouped by SeriesInstanceUID and
    one series is chosen by ``series_rule`` (ImageType tiers and refusals: see
    :class:`SeriesRule`; SEG / RTSTRUCT objects are set aside, see ``encoders.regions``).
    Sources sharing one SOPInstanceUID are copies of one instance: a damaged copy beside
    an intact one is left out and listed in ``Study.ignored_files``. Slices are sorted
    along the slice normal (``cross(row, col)`` of ImageOrientationPatient) by
    ``normal . ImagePositionPatient``, never by InstanceNumber; z spacing is the median
    gap. Identical duplicate slices are dropped; a gap of whole missing slices raises
    ``DicomError("missing_slices")`` naming the positions (mm); differing slices at one
    position, mixed orientations / sizes / pixel spacings or other irregular gaps raise
    ``DicomError("inconsistent_geometry")``. The study's geometry (origin, direction,
    slice positions) is set for :mod:`encoders.geometry`.

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


_SALVAGE_BYTES = 64 << 10
"""Bytes of a damaged file read to recover its SOPInstanceUID (group 0008 comes first)."""


def _salvage_sop_uid(source: Path | bytes) -> str | None:
    """The SOPInstanceUID of a file whose header cannot be read in full (e.g. cut short),
    from a lenient parse of its first bytes only (bounded: 64 KiB), or None."""
    try:
        if isinstance(source, bytes):
            head = source[:_SALVAGE_BYTES]
        else:
            with open(source, "rb") as fh:
                head = fh.read(_SALVAGE_BYTES)
        with _quiet():
            ds = pydicom.dcmread(io.BytesIO(head), force=True, specific_tags=["SOPInstanceUID"])
        uid = _text(_get(ds, "SOPInstanceUID"), 64)
    except Exception:
        return None
    return uid if uid and _UID_RE.match(uid) else None


def _is_intact(h: _Header) -> DicomError | None:
    """None when the file's pixel data reads in full, else the error it raises."""
    try:
        _check_size([h])
        _decode(h)
    except DicomError as e:
        return e
    return None


def _read_headers(items: list[Path | bytes]) -> tuple[list[_Header], list[Rejection]]:
    """Every source's header, without the damaged copies of duplicated instances.

    Sources sharing one SOPInstanceUID (re-sends, re-archived copies) are one instance:
    the intact copies are kept (identical ones are dropped later as duplicate slices) and
    the damaged ones, including copies whose header cannot be read at all, are returned as
    rejections. Any other unreadable file raises its DicomError, as before.
    """
    headers: list[_Header] = []
    failed: list[tuple[int, DicomError]] = []
    for i, src in enumerate(items):
        try:
            headers.append(_read_header(src, i))
        except DicomError as e:
            failed.append((i, e))
    by_uid: dict[str, list[_Header]] = {}
    for h in headers:
        uid = _uid_of(h.ds, "SOPInstanceUID")
        if uid and _not_an_image([h]) is None:
            by_uid.setdefault(uid, []).append(h)
    ignored: list[Rejection] = []
    for i, err in failed:
        salvaged = _salvage_sop_uid(items[i]) if err.reason == "truncated" else None
        copies = by_uid.get(salvaged or "", [])
        if not copies or not any(_is_intact(c) is None for c in copies):
            raise err
        ignored.append(
            Rejection(
                _label(items[i], i), f"damaged copy of an instance also present intact: {err}"
            )
        )
    dropped: set[int] = set()
    for copies in by_uid.values():
        if len(copies) < 2:
            continue
        errors = [_is_intact(c) for c in copies]
        if all(problem is not None for problem in errors):
            continue  # no intact copy: the series read reports the damage
        for c, problem in zip(copies, errors, strict=True):
            if problem is not None:
                dropped.add(c.index)
                ignored.append(
                    Rejection(
                        c.label, f"damaged copy of an instance also present intact: {problem}"
                    )
                )
    return [h for h in headers if h.index not in dropped], ignored


def _read_study(items: list[Path | bytes], series_rule: SeriesRule) -> Study:
    headers, ignored = _read_headers(items)
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
    if not candidates and any(_BURNED_IN_NOTE in note for note in skipped):
        raise DicomError(
            "burned_in_annotation",
            f"{headers[0].label}: BurnedInAnnotation is YES (text burned into the pixels may "
            "identify the patient) and no other series qualifies ("
            + "; ".join(skipped)
            + "); scrub the pixels and clear the flag, or allow it explicitly "
            "(--allow-burned-in) if the text is known to be harmless",
        )
    if not candidates and all(_not_an_image(hs) is not None for hs in series.values()):
        raise DicomError(
            "not_image",
            f"{headers[0].label}: the files hold no image series, only "
            + "; ".join(sorted({str(_not_an_image(hs)) for hs in series.values()}))
            + "; pass them with the study's images",
        )
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
        + f", {_orientation_of(h0)}; best of {len(candidates)} qualifying"
    ]
    tier_note = _tier_note(chosen, candidates, series_rule)
    if tier_note:
        parts.append(tier_note)
    for bad, err in failures:
        parts.append(f"{_series_name(bad)} skipped: unreadable ({err.reason})")
    if skipped:
        parts.append(f"{len(skipped)} other skipped: " + "; ".join(skipped))
    parts.extend(notes)
    if ignored:
        parts.append(
            f"ignored {len(ignored)} damaged duplicate cop{'ies' if len(ignored) != 1 else 'y'} "
            "of instances present intact: " + ", ".join(r.path for r in ignored[:5])
        )

    patient_id = _text(_get(ds, "PatientID"), 256)
    if not patient_id:
        # Never merge unrelated studies under one empty id: each becomes its own patient.
        patient_id = f"NO-PATIENT-ID:{h0.study_uid}"
        parts.append("no PatientID: the study is treated as its own patient")
    units = {"CT": "HU", "MR": "MR_raw"}.get(h0.modality, "raw")
    if h0.modality == "PT":
        factor, why = _pet_suv_factor(ds)
        if factor is not None:
            volume *= np.float32(factor)
            units = "SUVbw"
            parts.append(why)
        else:
            units = "PT_raw"
            parts.append(
                f"PET without SUV ({why}): intensities are normalised by robust percentiles "
                "instead, not comparable with SUV studies"
            )
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
        units=units,
        origin=geo.origin,
        direction=geo.direction,
        slice_positions=geo.positions,
        slice_uids=tuple(
            _text(_get(geo.frames[g[0]].header.ds, "SOPInstanceUID"), 64) or ""
            for g in geo.groups
        ),
        in_plane_flips=geo.flips,
        frame_of_reference_uid=_text(_get(ds, "FrameOfReferenceUID"), 64) or "",
        ignored_files=ignored,
    )
    study.acquisition["intensity"] = _intensity_unit(study)
    log.debug("read study: %d slices, %d series considered", n_slices, len(series))
    return study


# ------------------------------------------------------------------------- preprocess


def block_mean(volume: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Average non-overlapping blocks (anti-aliased integer downsampling), centred.

    Sums strided views axis by axis, z first (whole slices: contiguous, and each step
    shrinks what the next one reads): about 2.5x faster than a reshape + multi-axis
    ``mean`` on a 512 x 512 CT, same values to float32 rounding.
    """
    slices = []
    for n, f in zip(volume.shape, factors, strict=True):
        m = (n // f) * f
        start = (n - m) // 2
        slices.append(slice(start, start + m))
    v = volume[tuple(slices)]
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        index: list[slice] = [slice(None)] * v.ndim
        index[axis] = slice(0, None, f)
        acc = np.array(v[tuple(index)], dtype=np.float32)
        for k in range(1, f):
            index[axis] = slice(k, None, f)
            acc += v[tuple(index)]
        v = acc
    if v is volume:
        return np.array(v, dtype=np.float32)
    n = math.prod(factors)
    if n > 1:
        v *= np.float32(1.0 / n)
    return v


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
    """Normalise intensities per modality and resample ``study.volume`` to ``spec.shape``:
    with ``spec.fit == "extent"`` (the default) the whole study on its context grid
    (:func:`encoders.grid.context_volume`); with the legacy ``"crop"`` resampled to
    ``spec.spacing_mm`` and centre-cropped / padded to ``spec.shape``.

    Intensities (``study.acquisition["intensity"]`` names the unit that is stored):

    * ``HU`` — CT: Hounsfield units as read; padding ``spec.pad_value_hu``.
    * ``SUVbw_x100`` — PET with the tags SUV needs: SUV (body weight) x
      :data:`SUV_SCALE`; padding 0.
    * ``percentile_norm`` — MR, and PET without them (the stated fallback): the 1st and
      99th percentile of the foreground map to 0 and :data:`NORM_SCALE` (1000), clipped
      to [0, :data:`NORM_MAX`], so scanners' arbitrary MR scales line up; padding 0.

    Downsampling first averages whole blocks (anti-aliasing, and fast on large volumes),
    then linear interpolation (``scipy.ndimage.zoom``, order 1) covers the remaining
    factor. Returns ``(D, H, W) int16`` (rounded, clipped to the int16 range).
    """
    if spec.fit == "extent":  # the whole-study context grid (encoders.grid)
        from encoders.grid import context_volume

        return context_volume(study, spec)[0]
    from encoders.grid import normalised_volume

    volume, pad = normalised_volume(study, spec)
    spacing = tuple(float(s) for s in study.spacing)
    target = tuple(float(s) for s in spec.spacing_mm)

    factors = tuple(
        max(1, min(n, int(t / s + 1e-6)))
        for n, s, t in zip(volume.shape, spacing, target, strict=True)
    )
    if any(f > 1 for f in factors):
        volume = block_mean(volume, factors)
        spacing = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    zoom = tuple(s / t for s, t in zip(spacing, target, strict=True))
    if any(abs(z - 1.0) > 1e-3 for z in zoom):
        out_shape = tuple(max(1, round(n * z)) for n, z in zip(volume.shape, zoom, strict=True))
        zoom = tuple(o / n for o, n in zip(out_shape, volume.shape, strict=True))
        volume = ndimage.zoom(volume, zoom, order=1, mode="nearest", grid_mode=True)
    d, h, w = (int(s) for s in spec.shape)
    out = _crop_or_pad(volume, (d, h, w), pad)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def box_to_input_grid(
    box: Sequence[float],
    shape: Sequence[int],
    spacing: Sequence[float],
    spec: InputSpec,
) -> tuple[float, float, float, float, float, float]:
    """Map a box given on a study's own voxel grid to :func:`preprocess`'s output grid.

    ``box`` is ``(z0, y0, x0, z1, y1, x1)``, half-open voxel indices of ``Study.volume``
    (``shape``, ``spacing`` in mm): z counts slices in ascending position along the slice
    normal (the order :func:`read_study` sorts them in), y rows and x columns of the
    slice image. The result is the same box on the ``spec.shape`` grid, following
    :func:`preprocess` step by step (centred block averaging, ``grid_mode`` zoom, centred
    crop or pad); it may reach outside the grid when the region was cropped away.
    """
    b = [float(v) for v in box]
    if len(b) != 6 or not all(math.isfinite(v) for v in b):
        raise DicomError("bad_region", f"a region box is 6 numbers (z0, y0, x0, z1, y1, x1), got {list(box)!r}")
    if any(hi <= lo for lo, hi in zip(b[:3], b[3:], strict=True)):
        raise DicomError("bad_region", f"region box {b!r} is empty: each upper bound must exceed the lower one")
    if any(hi <= 0 or lo >= n for lo, hi, n in zip(b[:3], b[3:], shape, strict=True)):
        raise DicomError("bad_region", f"region box {b!r} lies outside the study's voxel grid {tuple(shape)}")
    if spec.fit == "extent":
        from encoders.grid import context_grid

        grid = context_grid(shape, spacing, spec)
        lo_v = grid.to_voxel([lo * float(s) for lo, s in zip(b[:3], spacing, strict=True)])
        hi_v = grid.to_voxel([hi * float(s) for hi, s in zip(b[3:], spacing, strict=True)])
        # to_voxel maps centres; box edges sit half a voxel further out
        return (lo_v[0] + 0.5, lo_v[1] + 0.5, lo_v[2] + 0.5,
                hi_v[0] + 0.5, hi_v[1] + 0.5, hi_v[2] + 0.5)
    lo_out: list[float] = []
    hi_out: list[float] = []
    for lo, hi, n, s, t, size in zip(b[:3], b[3:], shape, spacing, spec.spacing_mm, spec.shape, strict=True):
        n, s, t = int(n), float(s), float(t)
        f = max(1, min(n, int(t / s + 1e-6)))
        m = (n // f) * f
        start = (n - m) // 2
        # edges (not centres) of voxels map linearly: block averaging, then zoom
        lo, hi = (lo - start) / f, (hi - start) / f
        n1, s1 = n // f, s * f
        z = s1 / t
        if abs(z - 1.0) > 1e-3:
            n2 = max(1, round(n1 * z))
            lo, hi = lo * n2 / n1, hi * n2 / n1
        else:
            n2 = n1
        offset = -((n2 - size) // 2) if n2 >= size else (size - n2) // 2
        lo_out.append(lo + offset)
        hi_out.append(hi + offset)
    return (lo_out[0], lo_out[1], lo_out[2], hi_out[0], hi_out[1], hi_out[2])
