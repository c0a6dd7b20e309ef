"""The listener's fast path: Part 10 headers packed without pydicom's encoder, the study
UID read from the first elements, and pynetdicom's reactors with event-driven waits."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from . import pacs_peers as pp

pynetdicom = pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")

from service.pacs.listener import ListenerConfig, StoreListener  # noqa: E402
from service.pacs.part10 import meta_header, study_uid_of  # noqa: E402


def _encoded(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw


def _dataset(study: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientID = "P"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.Rows = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    return ds


@pytest.mark.parametrize("sop_uid", ["1.2.3.4.5", "1.2.3.4.56"])  # odd and even lengths
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
def test_meta_header_is_what_pydicom_writes(sop_uid: str, syntax: str) -> None:
    from pynetdicom.dsutils import encode_file_meta

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
    want = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert meta_header("1.2.840.10008.5.1.4.1.1.2", sop_uid, syntax) == want


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_study_uid_is_read_in_every_transfer_syntax(syntax: str, tmp_path: Path) -> None:
    ds = _dataset("1.2.3.77")
    raw = _encoded(ds, syntax)
    assert study_uid_of(raw, syntax) == "1.2.3.77"
    # the header + data set is a file pydicom reads back whole
    if syntax != DeflatedExplicitVRLittleEndian:
        path = tmp_path / "x.dcm"
        path.write_bytes(meta_header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax) + raw)
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == "1.2.3.77" and back.PixelData == ds.PixelData
    del ds.StudyInstanceUID
    with pytest.raises(KeyError):
        study_uid_of(_encoded(ds, syntax), syntax)


@pytest.mark.parametrize("quick", [True, False], ids=["event-driven", "stock"])
def test_every_association_is_released_and_every_instance_kept(
    quick: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Several storescu associations in a row: each ends as released (never taken for a
    broken one, however fast the connection closes after the reply) and every instance is
    spooled as the very file that was sent (data set bytes unchanged)."""
    pp.need_dcmtk()
    uid, files = pp.ct_study(tmp_path / "study", seed=3, patient="P-3", n=4)
    lst = StoreListener(
        ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=1e9, poll_s=3600, quick_reactor=quick),
        ingest=lambda folder: None,
    )
    lst.start()
    try:
        with caplog.at_level(logging.WARNING, logger="service.pacs.listener"):
            for _ in range(5):
                assert pp.storescu(lst.port, files).returncode == 0
    finally:
        lst.stop()
    assert lst.received == 5 * len(files)
    assert not [r for r in caplog.records if "without a release" in r.getMessage()]
    folders = [p for p in lst.incoming.iterdir() if p.is_dir()]
    assert len(folders) == 1 and not list(folders[0].glob(".open-*"))  # released: no marker
    spooled = sorted(folders[0].glob("*.dcm"))
    assert len(spooled) == len(files)
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for path in spooled:
        got = pydicom.dcmread(path)
        assert got.StudyInstanceUID == uid
        assert got.PixelData == sent[got.SOPInstanceUID].PixelData
