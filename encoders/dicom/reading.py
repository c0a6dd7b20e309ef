"""Bounded reading of one DICOM file with pydicom.

Per-file caps (header bytes, read calls, inflated size, bytes beyond the pixel data) are
enforced by a reader that counts what pydicom asks for; every pydicom / numpy failure
becomes a :class:`~encoders.errors.DicomError` naming the file (``_guard``), and pydicom's
own log records and warnings, which may quote patient data, are silenced while it reads
(``_quiet``). Read-wide caps across files live in :mod:`encoders.budget`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from encoders import budget
from encoders.dicom.values import _get, _int, _text
from encoders.errors import DicomError

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


_UNDEFINED_LENGTH = 0xFFFFFFFF


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
