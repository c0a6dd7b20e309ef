"""Every file bundled with pydicom is read or refused with a specific reason.

pydicom ships ~190 test files offline (CT, MR, RT objects, secondary captures, broken
files, DICOMDIRs, non-DICOM files, folders). For each one: ``read_study`` with a rule
that admits any modality, and, for files with pixel data, ``read_pixels`` (the decode
path on its own, so every compressed syntax is exercised even where geometry is
missing). Either works, or raises a DicomError whose reason names the problem; a crash
or the last-resort "unexpected" reason fails the test.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from encoders.dicom import SeriesRule, read_pixels, read_study
from encoders.errors import DicomError

ANY = SeriesRule(
    modalities=("*",),
    min_slices=1,
    allow_localizer=True,
    allow_derived=True,
    allow_burned_in=True,
    allow_non_diagnostic=True,
    max_slice_thickness_mm=1e9,
)
SPECIFIC = {
    "not_dicom", "not_image", "truncated", "missing_tag", "no_pixel_data", "unsupported",
    "inconsistent_header", "inconsistent_geometry", "bad_rescale", "too_large",
    "transfer_syntax_mismatch", "missing_codec", "corrupt",
}  # fmt: skip


def _has_pixels(path: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
    except Exception:
        return False
    return "PixelData" in ds


def _outcome(fn, path: Path) -> str:
    try:
        fn(path)
    except DicomError as e:
        msg = str(e)
        assert e.reason in SPECIFIC, f"{path.name}: vague reason {e.reason}: {msg}"
        assert str(path) in msg and "\n" not in msg, msg
        return e.reason
    return "ok"


def test_every_bundled_file_is_read_or_refused_specifically() -> None:
    files = [Path(f) for f in get_testdata_files()]
    assert len(files) >= 150  # offline set (193 with pydicom 3.0)
    studies: collections.Counter[str] = collections.Counter()
    pixels: collections.Counter[str] = collections.Counter()
    for path in files:
        studies[_outcome(lambda p: read_study([p], series_rule=ANY), path)] += 1
        if path.is_file() and _has_pixels(str(path)):
            pixels[_outcome(read_pixels, path)] += 1
    # What pydicom ships today: a real share of it reads, and every undamaged pixel file
    # decodes, colour ones as grey (88 of 95; the rest are broken or 1-bit masks).
    assert studies["ok"] >= 40, studies
    assert sum(pixels.values()) >= 90, pixels
    assert pixels["ok"] >= 85, pixels
    assert set(pixels) <= {"ok", "unsupported", "truncated", "corrupt", "missing_tag"}, pixels


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm", "image_dfl.dcm", "693_J2KI.dcm",
    ],
)  # fmt: skip
def test_compressed_and_odd_syntaxes_decode(name: str) -> None:
    path = pydicom.data.get_testdata_file(name)
    ref = pydicom.dcmread(path).pixel_array
    got = read_pixels(Path(path))
    assert got.reshape(ref.shape).tolist() == ref.tolist()
