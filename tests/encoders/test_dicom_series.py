"""encoders.dicom: series and instances as real archives have them — ImageType tiers
(ORIGINAL\\PRIMARY > ORIGINAL\\SECONDARY > DERIVED axial), non-diagnostic series refused
by name, damaged duplicate instances, missing slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from encoders.dicom import SeriesRule, read_study
from encoders.errors import DicomError
from tests.encoders.dicom_factory import ct_series, phantom_hu, write_series


def _series(folder: Path, n: int, *, study_uid: str, number: int, image_type: list[str], edit=None):
    def set_type(ds: Dataset, k: int) -> None:
        ds.ImageType = image_type
        ds.SeriesNumber = number
        if edit is not None:
            edit(ds, k)

    return write_series(folder, phantom_hu(n, 16, seed=number), study_uid=study_uid, edit=set_type)


def _refusal(files: list[Path], **kw) -> DicomError:
    with pytest.raises(DicomError) as info:
        read_study(files, **kw)
    assert "\n" not in str(info.value)
    return info.value


STUDY = generate_uid(entropy_srcs=["series-tests"])


def test_original_secondary_used_when_alone_and_said_so(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", 5, study_uid=STUDY, number=2, image_type=["ORIGINAL", "SECONDARY", "AXIAL"])
    study = read_study(files)
    assert study.volume.shape[0] == 5
    assert "ORIGINAL\\SECONDARY" in study.series_reason
    assert "no ORIGINAL\\PRIMARY series qualifies" in study.series_reason


def test_primary_preferred_over_secondary_and_derived(tmp_path: Path) -> None:
    primary = _series(tmp_path / "p", 4, study_uid=STUDY, number=5, image_type=["ORIGINAL", "PRIMARY", "AXIAL"])
    secondary = _series(tmp_path / "s", 6, study_uid=STUDY, number=2, image_type=["ORIGINAL", "SECONDARY", "AXIAL"])
    derived = _series(tmp_path / "d", 8, study_uid=STUDY, number=3, image_type=["DERIVED", "SECONDARY", "AXIAL"])
    study = read_study(primary + secondary + derived)
    assert study.volume.shape[0] == 4 and "series #5" in study.series_reason
    assert "SECONDARY" not in study.series_reason.split(";")[1]  # no fallback note
    # Without the primary, the ORIGINAL\SECONDARY one wins over the bigger DERIVED one.
    study = read_study(secondary + derived)
    assert study.volume.shape[0] == 6 and "ORIGINAL\\SECONDARY" in study.series_reason
    # allow_derived: all compete on slices alone (the old rule), said so.
    study = read_study(secondary + derived, series_rule=SeriesRule(allow_derived=True))
    assert study.volume.shape[0] == 8 and "admitted as equal" in study.series_reason


def test_fallback_when_the_primary_cannot_be_read(tmp_path: Path) -> None:
    primary = _series(tmp_path / "p", 5, study_uid=STUDY, number=5, image_type=["ORIGINAL", "PRIMARY", "AXIAL"])
    secondary = _series(tmp_path / "s", 5, study_uid=STUDY, number=2, image_type=["ORIGINAL", "SECONDARY", "AXIAL"])
    broken = primary[2].read_bytes()
    primary[2].write_bytes(broken[:-300])  # truncated, and no other copy of it
    study = read_study(primary + secondary)
    assert "series #2" in study.series_reason
    assert "ORIGINAL\\PRIMARY series could not be read" in study.series_reason
    assert "series #5 skipped: unreadable (truncated)" in study.series_reason


@pytest.mark.parametrize(
    "image_type, sop_class, named",
    [
        (["DERIVED", "SECONDARY", "AXIAL", "MIP"], None, "maximum intensity projection"),
        (["DERIVED", "SECONDARY", "MINIP"], None, "minimum intensity projection"),
        (["DERIVED", "SECONDARY", "REFORMATTED"], None, "reformatted image (MPR)"),
        (["DERIVED", "SECONDARY", "MPR"], None, "multiplanar reformat"),
        (["DERIVED", "PRIMARY", "PROJECTION IMAGE"], None, "projection image"),
        (["DERIVED", "PRIMARY", "VOLUME", "MAXIMUM"], None, "maximum intensity projection"),
        (["DERIVED", "SECONDARY", "SCREEN SAVE"], None, "screen capture"),
        (["ORIGINAL", "PRIMARY", "AXIAL"], "1.2.840.10008.5.1.4.1.1.7", "Secondary Capture SOP class"),
        (["DERIVED", "SECONDARY"], "1.2.840.10008.5.1.4.1.1.7.3", "Grayscale Word Secondary Capture"),
    ],
)
def test_non_diagnostic_series_refused_by_name(
    tmp_path: Path, image_type: list[str], sop_class: str | None, named: str
) -> None:
    def edit(ds: Dataset, k: int) -> None:
        if sop_class is not None:
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class

    files = _series(tmp_path / "x", 5, study_uid=STUDY, number=4, image_type=image_type, edit=edit)
    err = _refusal(files)
    assert err.reason == "no_usable_series"
    assert named in str(err)
    # Beside a diagnostic series it is skipped, and the reason names it.
    good = _series(tmp_path / "g", 3, study_uid=STUDY, number=1, image_type=["ORIGINAL", "PRIMARY", "AXIAL"])
    study = read_study(files + good)
    assert study.volume.shape[0] == 3 and named in study.series_reason
    # Only an explicit rule reads such a series.
    rule = SeriesRule(allow_non_diagnostic=True, allow_derived=True)
    assert read_study(files, series_rule=rule).volume.shape[0] == 5


def test_annotation_only_is_not_an_image(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", n=3, rows=16)
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.PixelData
    rt = tmp_path / "rt.dcm"
    ds.save_as(rt, enforce_file_format=True)
    assert _refusal([rt]).reason == "not_image"
    study = read_study([*files, rt])  # beside the images: set aside, named
    assert "RTSTRUCT annotation, not an image" in study.series_reason


# ------------------------------------------------------------------ duplicate instances


@pytest.mark.parametrize("cut", ["pixels", "header"])
def test_damaged_duplicate_loses_to_the_intact_copy(tmp_path: Path, cut: str) -> None:
    files = ct_series(tmp_path / "ct", n=6, rows=32)
    ref = read_study(files)
    data = files[3].read_bytes()
    damaged = tmp_path / "resent" / "copy.dcm"
    damaged.parent.mkdir()
    damaged.write_bytes(data[: len(data) // 2] if cut == "pixels" else data[:700])
    for order in ([*files, damaged], [damaged, *files]):
        study = read_study(order)
        np.testing.assert_array_equal(study.volume, ref.volume)
        assert [r.path for r in study.ignored_files] == [str(damaged)]
        assert "truncated" in study.ignored_files[0].reason
        assert "ignored 1 damaged duplicate copy" in study.series_reason
    # Without the intact copy the damage is still fatal and named.
    assert _refusal([*[f for f in files if f != files[3]], damaged]).reason == "truncated"


def test_two_damaged_copies_are_refused(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", n=6, rows=32)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-200])
    again = tmp_path / "again.dcm"
    again.write_bytes(data[:-100])
    assert _refusal([*files, again]).reason == "truncated"


def test_identical_duplicate_instances_are_dropped(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", n=5, rows=16)
    copy = tmp_path / "copy.dcm"
    shutil.copy(files[1], copy)
    study = read_study([*files, copy])
    assert study.volume.shape[0] == 5 and study.ignored_files == []
    assert "dropped 1 duplicate slice" in study.series_reason


def test_missing_slices_named_in_mm(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", n=8, rows=16, spacing=(2.5, 1.0, 1.0))
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    err = _refusal(by_z[:3] + by_z[5:])
    assert err.reason == "missing_slices"
    assert "2 slices are missing from a regular 2.5 mm stack" in str(err)
    assert "between slice positions 15.0 to 22.5 mm (2 slices)" in str(err)
    assert "PAT-0001" not in str(err) and STUDY not in str(err)


def test_a_coarser_zone_is_not_missing_slices(tmp_path: Path) -> None:
    """Steps of 2.5 mm then four of 5 mm: a series that changes spacing, not lost slices."""
    z = [0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 25.0, 30.0, 35.0]

    def place(ds: Dataset, k: int) -> None:
        ds.ImagePositionPatient = [-20.0, -20.0, z[k]]

    files = write_series(tmp_path / "v", phantom_hu(len(z), 16), study_uid=STUDY, edit=place)
    err = _refusal(files)
    assert err.reason == "inconsistent_geometry" and "changes its spacing" in str(err)
