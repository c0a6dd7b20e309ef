"""The whole-study grid: context fitted to any extent, exact voxel <-> mm, patches."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.dicom import Study, preprocess
from encoders.errors import DicomError
from encoders.grid import box_centre_mm, context_grid, context_volume, cut_patch, study_input
from encoders.spec import DEFAULT_SPEC, InputSpec

SPEC = InputSpec(shape=(16, 32, 32), patch_shape=(8, 16, 16), proposals=0)


def _study(shape: tuple[int, int, int], spacing: tuple[float, float, float],
           blob_mm: tuple[float, float, float] | None = None) -> Study:
    v = np.full(shape, -1000.0, dtype=np.float32)
    if blob_mm is not None:  # a 6 mm cube of +100 HU centred at blob_mm (study mm)
        z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)],
                              indexing="ij")
        near = (abs(z - blob_mm[0]) < 3) & (abs(y - blob_mm[1]) < 3) & (abs(x - blob_mm[2]) < 3)
        v[near] = 100.0
    study = Study("1.2", "p", "1.2.3", "CT", v, spacing, acquisition={}, units="HU")
    study.acquisition["intensity"] = "HU"
    return study


@pytest.mark.parametrize(("shape", "spacing"), [
    ((40, 512, 512), (2.5, 0.7, 0.7)),    # 100 mm, 358 mm FOV
    ((400, 512, 512), (5.0, 0.98, 0.98)),  # 2 m whole body, 500 mm FOV
    ((200, 1024, 1024), (0.5, 0.49, 0.49)),  # thin slices, 1024^2
])
def test_context_grid_covers_any_extent_never_cropped(shape, spacing) -> None:  # type: ignore[no-untyped-def]
    g = context_grid(shape, spacing, DEFAULT_SPEC)
    assert g.shape == DEFAULT_SPEC.shape
    for a in range(3):
        ext = shape[a] * spacing[a]
        assert g.origin_mm[a] <= 1e-9
        assert g.origin_mm[a] + g.shape[a] * g.spacing_mm[a] >= ext - 1e-6
        assert g.spacing_mm[a] >= DEFAULT_SPEC.spacing_mm[a] - 1e-9
    assert g.spacing_mm[1] == g.spacing_mm[2]  # one in-plane spacing: no distortion
    np.testing.assert_allclose(g.to_voxel(g.to_mm((3.0, 7.5, 1.0))), (3.0, 7.5, 1.0))


def test_context_puts_a_lesion_where_the_grid_says() -> None:
    blob = (61.0, 40.0, 150.0)
    study = _study((50, 120, 160), (2.5, 1.25, 1.25), blob)
    vol, grid = context_volume(study, SPEC)
    assert vol.shape == SPEC.shape and vol.dtype == np.int16
    peak = np.unravel_index(int(np.argmax(vol)), vol.shape)
    # the brightest context voxel is within one context voxel of the lesion centre
    np.testing.assert_allclose(grid.to_mm(peak), blob, atol=max(grid.spacing_mm) * 1.01)
    np.testing.assert_array_equal(preprocess(study, SPEC), vol)


def test_patch_is_centred_on_its_region_at_patch_resolution() -> None:
    blob = (33.0, 70.0, 41.0)
    study = _study((40, 100, 100), (1.5, 0.8, 0.8), blob)
    p = cut_patch(study.volume, study.spacing, blob, SPEC)
    assert p.shape == SPEC.patch_shape
    c = np.array(np.nonzero(p > 0)).mean(axis=1)
    centre = (np.array(SPEC.patch_shape) - 1) / 2
    np.testing.assert_allclose(c, centre, atol=1.0)
    far = cut_patch(study.volume, study.spacing, (-500.0, 0.0, 0.0), SPEC)
    assert (far == SPEC.pad_value_hu).all()  # outside the study: padding


def test_study_input_reader_regions_and_bounds() -> None:
    blob = (30.0, 50.0, 50.0)
    study = _study((40, 80, 80), (1.5, 1.25, 1.25), blob)
    box = (17, 37, 37, 23, 43, 43)  # voxels around the blob
    assert box_centre_mm(box, study.volume.shape, study.spacing) == pytest.approx(blob, abs=1.0)
    spec = InputSpec(shape=(16, 32, 32), patch_shape=(8, 16, 16), proposals=0, max_patches=2)
    regions = [box, box, box]
    si = study_input(study, spec, regions=regions)
    assert si.patches.shape == (2, 8, 16, 16) and si.dropped_regions == 1
    assert [p.source for p in si.patch_info] == ["reader", "reader"]
    assert si.primary() == 0
    with pytest.raises(DicomError) as err:
        study_input(study, spec, regions=[(0, 0, 0, 1, 1, 200)[:5]])
    assert err.value.reason == "bad_region"
    none = study_input(study, spec)  # no regions, no proposals: one centre patch
    assert [p.source for p in none.patch_info] == ["centre"]


def test_legacy_spec_round_trips_and_default_is_bounded() -> None:
    legacy = InputSpec.from_dict({"spacing_mm": [2, 2, 2], "shape": [32, 128, 128],
                                  "windows": [[40, 400]]})
    assert legacy.fit == "crop" and not legacy.has_patches
    assert "fit" not in legacy.to_dict()  # what such cards and stores hold
    assert InputSpec.from_dict(DEFAULT_SPEC.to_dict()) == DEFAULT_SPEC
    assert DEFAULT_SPEC.max_study_bytes() <= 4 * 2**20
