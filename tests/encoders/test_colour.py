"""Colour images: RGB / YBR / PALETTE COLOR are read as grey luminance, except CT and
PET (whose colour values are a rendering, not HU / activity), which are refused by name."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_series
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_color_lut

from encoders.dicom import COLOUR_PHOTOMETRIC, SeriesRule, read_pixels, read_study
from encoders.errors import DicomError

LUMA = np.array([0.299, 0.587, 0.114])


def _reference_grey(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    rgb = ds.pixel_array  # pydicom converts YBR to RGB
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(rgb, ds)
    return np.rint(rgb.astype(np.float64) @ LUMA)


def _colour_files() -> list[str]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in get_testdata_files():
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            except Exception:
                continue
            if str(ds.get("PhotometricInterpretation", "")) in COLOUR_PHOTOMETRIC:
                out.append(f)
    return out


def test_every_bundled_colour_file_decodes_to_luminance() -> None:
    files = _colour_files()
    assert len(files) >= 30  # 33 with pydicom 3.0: RGB, YBR_FULL(_422), YBR_RCT, palette
    kinds = set()
    for f in files:
        got = read_pixels(Path(f))
        ref = _reference_grey(f)
        assert got.ndim == 3 and got.size == ref.size, f
        # float32 vs float64 rounding may differ by one grey level at .5 boundaries.
        assert np.abs(got.reshape(ref.shape).astype(np.float64) - ref).max() <= 1.0, f
        kinds.add(str(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation))
    assert {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "PALETTE COLOR"} <= kinds


def test_palette_is_applied_before_luminance() -> None:
    path = get_testdata_file("examples_palette.dcm")
    indices = pydicom.dcmread(path).pixel_array
    got = read_pixels(Path(path))[0]
    assert got.dtype == np.uint16  # the palette's 16-bit entries, not the 8-bit indices
    assert not np.array_equal(got, indices)
    assert np.abs(got.astype(np.float64) - _reference_grey(path)).max() <= 1.0


def _rgb_edit(rgb: np.ndarray, photometric: str = "RGB"):  # type: ignore[no-untyped-def]
    def edit(ds: pydicom.Dataset, k: int) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = photometric
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.PixelData = rgb[k].tobytes()

    return edit


def test_colour_mr_series_reads_as_grey(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    paths = write_series(tmp_path / "mr", np.zeros((4, 16, 16)), modality="MR", edit=_rgb_edit(rgb))
    study = read_study(paths)
    assert "RGB converted to grey" in study.series_reason
    assert study.acquisition["intensity"] == "percentile_norm"
    expected = np.rint(rgb.astype(np.float64) @ LUMA)
    assert np.abs(study.volume - expected).max() <= 1.0


@pytest.mark.parametrize(("modality", "what"), [("CT", "Hounsfield"), ("PT", "activity")])
def test_colour_ct_and_pet_refused_by_name(tmp_path: Path, modality: str, what: str) -> None:
    rgb = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    paths = write_series(
        tmp_path / modality, np.zeros((3, 8, 8)), modality=modality, edit=_rgb_edit(rgb)
    )
    with pytest.raises(DicomError) as err:
        read_study(paths, series_rule=SeriesRule(min_slices=1))
    assert err.value.reason == "unsupported"
    assert f"{modality} image stored as RGB" in str(err.value) and what in str(err.value)


def test_unknown_photometric_and_mismatched_samples(tmp_path: Path) -> None:
    rgb = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    odd = write_series(
        tmp_path / "cmyk", np.zeros((3, 8, 8)), modality="MR", edit=_rgb_edit(rgb, "CMYK")
    )
    with pytest.raises(DicomError, match="PhotometricInterpretation CMYK") as err:
        read_pixels(odd[0])
    assert err.value.reason == "unsupported"

    def one_sample(ds: pydicom.Dataset, k: int) -> None:
        _rgb_edit(rgb)(ds, k)
        ds.SamplesPerPixel = 1

    bad = write_series(tmp_path / "spp", np.zeros((3, 8, 8)), modality="MR", edit=one_sample)
    with pytest.raises(DicomError, match="RGB with SamplesPerPixel 1") as err:
        read_pixels(bad[0])
    assert err.value.reason == "inconsistent_header"
