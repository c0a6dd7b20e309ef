"""A received C-STORE data set as a DICOM Part 10 file, without decoding it.

The listener writes each instance as sent: the 128-byte preamble, ``DICM``, the File
Meta Information (PS3.10 7.1) and the data set bytes of the C-STORE request. Encoding
the meta through pydicom (``event.file_meta`` + ``encode_file_meta``) cost about 0.6 ms
an instance, more than the rest of the handler together, because every UID is validated
again; here the seven elements are packed directly (explicit VR little endian, as
PS3.10 requires), byte for byte what pydicom writes (``tests/service/test_pacs_part10.py``).
The study UID is read by parsing the data set only up to (0020,000D).
"""

from __future__ import annotations

import functools
import io
import struct

PREAMBLE = b"\x00" * 128 + b"DICM"
STUDY_INSTANCE_UID = 0x0020000D
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


@functools.cache
def _implementation() -> tuple[bytes, bytes]:
    """(0002,0012) and (0002,0013) as pynetdicom writes them (its implementation UID)."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    version = str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii")
    if len(version) % 2:
        version += b" "
    return (_short(0x0002, 0x0012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID))),
            _short(0x0002, 0x0013, b"SH", version))


def meta_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information of a Part 10 file holding a data set of
    ``sop_class_uid`` / ``sop_instance_uid`` encoded in ``transfer_syntax_uid``."""
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
        _short(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
        _short(0x0002, 0x0010, b"UI", _uid(transfer_syntax_uid)),
        *_implementation(),
    ))
    return PREAMBLE + _short(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def study_uid_of(dataset: bytes, transfer_syntax_uid: str) -> str:
    """The Study Instance UID of an encoded data set (elements up to (0020,000D) parsed);
    raises ``KeyError`` when it has none, and what pydicom raises on a broken stream."""
    from pydicom.filereader import read_dataset

    if transfer_syntax_uid == DEFLATED:  # the stream is compressed as a whole
        import zlib

        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    implicit = transfer_syntax_uid == IMPLICIT_LITTLE
    little = transfer_syntax_uid != EXPLICIT_BIG
    ds = read_dataset(io.BytesIO(dataset), implicit, little,
                      stop_when=lambda tag, vr, length: tag > STUDY_INSTANCE_UID)
    value = ds[STUDY_INSTANCE_UID].value
    if not value:
        raise KeyError("StudyInstanceUID is empty")
    return str(value).strip("\x00 ")


__all__ = ["meta_header", "study_uid_of"]
