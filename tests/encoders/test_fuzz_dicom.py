"""Fuzzing the DICOM header pass: damaged files are rejected with a reason, never a crash.

Run briefly here (``COHORTSIM_FUZZ_EXAMPLES``, default 40); ``benchmarks/fuzz_security.py``
runs the same targets much longer.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from encoders.dicom import read_file_header, read_study, scan_folder
from encoders.errors import DicomError

EXAMPLES = int(os.environ.get("COHORTSIM_FUZZ_EXAMPLES", "40"))


def _series(n: int = 3) -> list[bytes]:
    """``n`` slices of one CT series (pydicom's CT_small moved along z), as file bytes."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


SERIES = _series()
SEED = SERIES[1]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("COHORTSIM_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """The seed file with bytes flipped in the header region, cut, or with junk inserted."""
    data = bytearray(SEED)
    header_end = min(len(data), 2048)  # preamble, meta group and the first elements
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, header_end - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(max_size=64))
    return bytes(data)


inputs = st.one_of(damaged(), st.binary(max_size=512))


def test_the_seed_series_reads() -> None:
    study = read_study(SERIES)
    assert study.volume.shape[0] == 3


@FUZZ
@given(inputs, st.integers(0, 2))
def test_read_study_raises_only_dicom_error(data: bytes, index: int) -> None:
    files = list(SERIES)
    files[index] = data
    try:
        read_study(files)
    except DicomError as exc:
        assert exc.reason and str(exc)


@FUZZ
@given(st.lists(inputs, min_size=1, max_size=3))
def test_header_pass_rejects_instead_of_crashing(files: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, data in enumerate(files):
            (root / f"{i}.dcm").write_bytes(data)
        groups, rejected = scan_folder(root)
        assert sum(len(v) for v in groups.values()) + len(rejected) == len(files)
        assert all(r.reason for r in rejected)
        for i in range(len(files)):
            with contextlib.suppress(DicomError):
                read_file_header(root / f"{i}.dcm")
