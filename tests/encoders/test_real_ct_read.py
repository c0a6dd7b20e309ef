"""The reader on a real chest CT (LIDC-IDRI-0001, ../shared/data next to the repository):
volume, HU against plain pydicom, geometry, series choice, the four radiologists' reads,
and the archive variants real PACS hold (ORIGINAL\\SECONDARY, a damaged re-sent copy, a
missing slice). Skips, saying where the data comes from, where the archive is absent."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from encoders.dicom import Study, read_study
from encoders.errors import DicomError
from encoders.geometry import patient_to_voxel, voxel_to_patient
from encoders.regions import regions_from_lidc_xml

ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "lidc-idri-0001.tar.xz"
NODULE_PIXEL = (316, 367)  # (x = column, y = row) in the source images, from the data README
NODULE_Z_MM = -115.0  # a slice through the nodule (marked on -125 ... -105 mm)


@pytest.fixture(scope="session")
def lidc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(
            f"real CT archive not found at {ARCHIVE}: LIDC-IDRI-0001 (TCIA, CC BY 3.0), see "
            "../shared/data/README.md"
        )
    out = tmp_path_factory.mktemp("lidc")
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="session")
def lidc_files(lidc_dir: Path) -> list[Path]:
    files = sorted(lidc_dir.rglob("*.dcm"))
    assert len(files) == 133
    return files


@pytest.fixture(scope="session")
def lidc_xml(lidc_dir: Path) -> Path:
    (xml,) = lidc_dir.rglob("*.xml")
    return xml


@pytest.fixture(scope="session")
def study(lidc_files: list[Path]) -> Study:
    return read_study(lidc_files)


@pytest.fixture(scope="session")
def by_z(lidc_files: list[Path]) -> list[Path]:
    """The files sorted by ImagePositionPatient z (independently of the reader)."""
    z = {f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in lidc_files}
    return sorted(lidc_files, key=z.__getitem__)


def test_reads_the_whole_chest(study: Study) -> None:
    assert study.volume.shape == (133, 512, 512)
    assert study.modality == "CT" and study.units == "HU"
    np.testing.assert_allclose(study.spacing, (2.5, 0.703125, 0.703125), atol=1e-6)
    assert study.acquisition["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert study.series_reason.startswith("series #3000566: CT, 133 slices, 2.5 mm, axial")
    assert "SECONDARY" not in study.series_reason and "DERIVED" not in study.series_reason
    assert study.ignored_files == []


def test_hu_identical_to_plain_pydicom(study: Study, by_z: list[Path]) -> None:
    for k, f in enumerate(by_z):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            hu[ds.pixel_array == padding] = -1024.0
        np.testing.assert_allclose(study.volume[k], np.maximum(hu, -1024.0), atol=1e-3, err_msg=f"slice {k}")


def test_geometry_and_nodule_round_trip(study: Study, by_z: list[Path]) -> None:
    assert study.slice_positions[0] == pytest.approx(-340.0)
    assert study.slice_positions[-1] == pytest.approx(-10.0)
    np.testing.assert_allclose(np.diff(study.slice_positions), 2.5, atol=1e-3)
    np.testing.assert_allclose(study.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-9)
    first = pydicom.dcmread(by_z[0], stop_before_pixels=True)
    np.testing.assert_allclose(study.origin, [float(v) for v in first.ImagePositionPatient], atol=1e-4)
    # The nodule pixel, placed in patient mm from its own slice's header, is the voxel
    # that holds that slice's value there, and maps back to the same point.
    k = int(np.argmin([abs(p - NODULE_Z_MM) for p in study.slice_positions]))
    ds = pydicom.dcmread(by_z[k])
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(NODULE_Z_MM)
    col, row = NODULE_PIXEL
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    point = np.asarray(ds.ImagePositionPatient, float) + col * dx * iop[:3] + row * dy * iop[3:]
    voxel = patient_to_voxel(study, point)
    np.testing.assert_allclose(voxel, (k, row, col), atol=1e-6)
    np.testing.assert_allclose(voxel_to_patient(study, voxel), point, atol=1e-6)
    hu = float(ds.pixel_array[row, col]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert study.volume[k, row, col] == pytest.approx(hu)
    assert hu > -300.0  # solid tissue: the nodule, not lung air


def test_four_readers_boxes_contain_the_nodule(study: Study, lidc_xml: Path) -> None:
    regions = regions_from_lidc_xml(lidc_xml, study)
    k = int(np.argmin([abs(p - NODULE_Z_MM) for p in study.slice_positions]))
    centre = (k, NODULE_PIXEL[1], NODULE_PIXEL[0])
    holding = [
        r
        for r in regions
        if all(r.box[a] <= centre[a] < r.box[a + 3] for a in range(3))
    ]
    assert len(holding) == 4
    assert len({r.reader for r in holding}) == 4  # one box per reader
    assert len({r.lesion for r in holding}) == 1  # one lesion, four reads of it
    for r in holding:
        z0, y0, x0, z1, y1, x1 = r.box
        assert 5 <= z1 - z0 <= 10  # -125 ... -105 mm at 2.5 mm: 7-9 slices
        assert 35 <= y1 - y0 <= 60 and 35 <= x1 - x0 <= 50  # ~30 mm across at 0.7 mm
    # The small (< 3 mm) nodules three readers marked are their own lesions.
    others = [r for r in regions if r.lesion != holding[0].lesion]
    assert {r.box[3] - r.box[0] for r in others} == {1}


def _rewritten(files: list[Path], edit) -> list[bytes]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        edit(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_original_secondary_variant_is_used_and_said_so(study: Study, lidc_files: list[Path]) -> None:
    def secondary(ds: pydicom.Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "SECONDARY", "AXIAL"]

    got = read_study(_rewritten(lidc_files, secondary))
    np.testing.assert_allclose(got.volume, study.volume, atol=1e-3)
    assert "ORIGINAL\\SECONDARY" in got.series_reason
    assert "no ORIGINAL\\PRIMARY series qualifies" in got.series_reason


def test_truncated_duplicate_beside_the_intact_instance(
    study: Study, by_z: list[Path], tmp_path: Path
) -> None:
    data = by_z[60].read_bytes()
    cut = tmp_path / "resent.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    got = read_study([*by_z, cut])
    np.testing.assert_allclose(got.volume, study.volume, atol=1e-3)
    assert [r.path for r in got.ignored_files] == [str(cut)]
    assert "truncated" in got.ignored_files[0].reason
    assert "ignored 1 damaged duplicate copy" in got.series_reason


def test_missing_middle_slice_is_refused_naming_the_gap(by_z: list[Path]) -> None:
    with pytest.raises(DicomError) as info:
        read_study(by_z[:66] + by_z[67:])
    assert info.value.reason == "missing_slices"
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in by_z[65:68]]
    assert f"between slice positions {z[0]:.1f} to {z[2]:.1f} mm (1 slice)" in str(info.value)
