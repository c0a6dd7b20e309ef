"""encoders.geometry: Study origin / direction / slice positions and the voxel <-> patient
mapping, checked against each source file's own header (an independent computation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from encoders.dicom import Study, read_study
from encoders.geometry import patient_to_voxel, slice_index_at, voxel_to_patient
from tests.encoders.dicom_factory import ct_series

SPACING = (2.0, 0.8, 0.6)


def _orient(row: tuple[float, ...], col: tuple[float, ...]):
    """An edit that gives every slice the orientation (row, col) and stacks the slices
    along its normal from a fixed corner."""
    r, c = np.asarray(row, float), np.asarray(col, float)
    n = np.cross(r, c)

    def edit(ds: Dataset, k: int) -> None:
        ds.ImageOrientationPatient = [*r, *c]
        ds.ImagePositionPatient = [float(v) for v in np.array([-20.0, 15.0, 30.0]) + k * 2.0 * n]

    return edit


def _check_against_headers(study: Study, files: list[Path]) -> None:
    """Each source pixel, placed in patient space from its own file's header, maps to the
    voxel that holds its value."""
    rows, cols = study.volume.shape[1:]
    for f in files:
        ds = pydicom.dcmread(f)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for r, c in ((0, 0), (3, 17), (rows - 1, cols - 2), (rows // 2, 1)):
            p = ipp + c * dx * iop[:3] + r * dy * iop[3:]
            v = patient_to_voxel(study, p)
            idx = np.rint(v).astype(int)
            np.testing.assert_allclose(v, idx, atol=1e-6)
            assert study.volume[tuple(idx)] == pytest.approx(max(hu[r, c], -1024.0))
            np.testing.assert_allclose(voxel_to_patient(study, idx), p, atol=1e-6)


@pytest.mark.parametrize(
    "row, col, flips",
    [
        ((1, 0, 0), (0, 1, 0), (False, False)),  # axial as stored
        ((-1, 0, 0), (0, -1, 0), (True, True)),  # rotated 180 degrees in-plane
        ((1, 0, 0), (0, -1, 0), (True, False)),  # normal points to the feet
        ((1, 0, 0), (0, 0, -1), (True, False)),  # coronal, rows run to the feet
        ((np.cos(0.3), np.sin(0.3), 0), (-np.sin(0.3), np.cos(0.3), 0), (False, False)),
    ],
    ids=["axial", "rotated", "feet-first-normal", "coronal", "oblique"],
)
def test_geometry_matches_each_file_header(
    tmp_path: Path, row: tuple, col: tuple, flips: tuple[bool, bool]
) -> None:
    files = ct_series(tmp_path, n=5, rows=24, spacing=SPACING, edit=_orient(row, col))
    study = read_study(files, series_rule=_any_orientation())
    assert study.in_plane_flips == flips
    d = np.asarray(study.direction)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)  # orthonormal rows
    assert np.all(np.diff(study.slice_positions) > 0)
    np.testing.assert_allclose(np.diff(study.slice_positions), SPACING[0], atol=1e-6)
    assert len(study.slice_uids) == 5 and len(set(study.slice_uids)) == 5
    _check_against_headers(study, files)


def _any_orientation():
    from encoders.dicom import SeriesRule

    return SeriesRule(prefer_axial=False)


def test_axial_origin_direction_and_slice_lookup(tmp_path: Path) -> None:
    files = ct_series(tmp_path, n=6, rows=16, spacing=SPACING)
    study = read_study(files)
    first = min(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    np.testing.assert_allclose(study.origin, pydicom.dcmread(first).ImagePositionPatient)
    np.testing.assert_allclose(study.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    z0 = study.origin[2]
    assert slice_index_at(study, z0 + 3 * SPACING[0]) == 3
    assert slice_index_at(study, z0 + 3 * SPACING[0] + 0.4) == 3
    assert slice_index_at(study, z0 + 3.5 * SPACING[0] + 0.1) == 4
    assert slice_index_at(study, z0 - 5.0) is None
    assert slice_index_at(study, z0 + 20 * SPACING[0]) is None


def test_round_trip_inside_and_outside_the_volume(tmp_path: Path) -> None:
    files = ct_series(tmp_path, n=5, rows=16, spacing=SPACING, edit=_orient((0, 1, 0), (0, 0, -1)))
    study = read_study(files, series_rule=_any_orientation())
    rng = np.random.default_rng(0)
    zyx = rng.uniform(-3.0, 8.0, size=(50, 3)) * np.array([1.0, 4.0, 4.0])
    back = patient_to_voxel(study, voxel_to_patient(study, zyx))
    np.testing.assert_allclose(back, zyx, atol=1e-9)
    # A voxel step is a spacing step in patient space along the direction rows.
    base = voxel_to_patient(study, (1.0, 2.0, 3.0))
    for axis in range(3):
        step = np.zeros(3)
        step[axis] = 1.0
        moved = voxel_to_patient(study, np.array([1.0, 2.0, 3.0]) + step)
        np.testing.assert_allclose(
            moved - base, SPACING[axis] * np.asarray(study.direction[axis]), atol=1e-9
        )
    with pytest.raises(ValueError, match="end in 3"):
        voxel_to_patient(study, (1.0, 2.0))
