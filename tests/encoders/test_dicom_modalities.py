"""MR robust normalisation, PET SUV (with its fallback), enhanced multi-frame CT via the
functional groups, and the acquisition metadata kept for harmonisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import base_dataset, ct_series, phantom_hu, write_series
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from encoders.deid import BASIC_PROFILE_KEYWORDS, RETAINED_WITH_OPTIONS
from encoders.dicom import (
    ACQUISITION_NUMBERS,
    ACQUISITION_TEXT,
    NORM_SCALE,
    SUV_SCALE,
    Study,
    preprocess,
    read_study,
)
from encoders.spec import InputSpec

SPEC = InputSpec(spacing_mm=(2.0, 1.5, 1.5), shape=(6, 32, 32))


def _mr_values(scale: float) -> np.ndarray:
    """A positive MR-like phantom: background ~0, tissue ~[200, 900] x scale."""
    hu = phantom_hu(6, 32, seed=4).astype(np.float64)
    mr = np.where(hu < -900, 5.0, np.interp(hu, [-900, 1000], [200, 900]))
    return np.rint(mr * scale)


def test_mr_percentile_normalisation_is_scale_free(tmp_path: Path) -> None:
    a = read_study(write_series(tmp_path / "a", _mr_values(1.0), modality="MR"))
    b = read_study(write_series(tmp_path / "b", _mr_values(3.7), modality="MR"))
    assert a.modality == "MR" and a.units == "MR_raw"
    assert a.acquisition["intensity"] == "percentile_norm"
    assert b.volume.max() > 3 * a.volume.max()  # raw values keep the scanner's scale
    pa_, pb = preprocess(a, SPEC), preprocess(b, SPEC)
    assert np.abs(pa_.astype(int) - pb.astype(int)).max() <= 2  # normalised: the same
    fg = pa_[pa_ > 0]
    assert pa_.min() >= 0 and np.percentile(fg, 99) == pytest.approx(NORM_SCALE, rel=0.05)
    assert pa_[0, 0, 0] == 0  # background / padding is 0, not -1024


def _pet(
    tmp_path: Path, name: str, activity: np.ndarray, tags: dict, seq: dict
) -> list[Path]:
    def edit(ds: Dataset, k: int) -> None:
        for key, value in tags.items():
            setattr(ds, key, value)
        item = Dataset()
        for key, value in seq.items():
            setattr(item, key, value)
        ds.RadiopharmaceuticalInformationSequence = [item]

    # Activity in Bq/ml stored with a slope of 10 (unsigned).
    return write_series(tmp_path / name, activity, modality="PT", signed=False, slope=10.0, edit=edit)


PET_TAGS = {
    "Units": "BQML",
    "DecayCorrection": "START",
    "PatientWeight": "80",
    "SeriesDate": "20200102",
    "SeriesTime": "110000",
}
PET_SEQ = {
    "RadionuclideTotalDose": "370000000",  # 370 MBq
    "RadionuclideHalfLife": "6586.2",  # F-18
    "RadiopharmaceuticalStartDateTime": "20200102100000",  # 60 min before the series
}


def test_pet_suv_body_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    suv = rng.uniform(0.0, 12.0, (4, 16, 16))
    decay = 0.5 ** (3600.0 / 6586.2)
    activity = suv * 370e6 * decay / 80000.0  # Bq/ml giving that SUV
    study = read_study(_pet(tmp_path, "pet", activity, PET_TAGS, PET_SEQ))
    assert study.units == "SUVbw" and study.acquisition["intensity"] == "SUVbw_x100"
    np.testing.assert_allclose(study.volume, suv, atol=0.01)
    assert "SUVbw" in study.series_reason and "80" not in study.series_reason  # no weight
    out = preprocess(study, InputSpec(spacing_mm=(2.0, 1.5, 1.5), shape=(4, 16, 16)))
    np.testing.assert_allclose(out / SUV_SCALE, suv, atol=0.02)
    # Times only (no RadiopharmaceuticalStartDateTime): the same SUV.
    seq = {k: v for k, v in PET_SEQ.items() if k != "RadiopharmaceuticalStartDateTime"}
    seq["RadiopharmaceuticalStartTime"] = "100000"
    again = read_study(_pet(tmp_path, "pet-tm", activity, PET_TAGS, seq))
    np.testing.assert_allclose(again.volume, suv, atol=0.01)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"PatientWeight": None}, "PatientWeight"),
        ({"Units": "CNTS"}, "Units"),
        ({"DecayCorrection": "NONE"}, "DecayCorrection"),
        ({"SeriesTime": "090000"}, "inconsistent"),  # series before injection
    ],
)
def test_pet_without_suv_tags_falls_back(tmp_path: Path, change: dict, why: str) -> None:
    tags = {k: v for k, v in {**PET_TAGS, **change}.items() if v is not None}
    activity = np.random.default_rng(1).uniform(1000, 20000, (4, 16, 16))
    study = read_study(_pet(tmp_path, "pet", activity, tags, PET_SEQ))
    assert study.units == "PT_raw" and study.acquisition["intensity"] == "percentile_norm"
    assert "PET without SUV" in study.series_reason and why in study.series_reason
    out = preprocess(study, InputSpec(spacing_mm=(2.0, 1.5, 1.5), shape=(4, 16, 16)))
    assert out.min() >= 0 and out.max() <= 4000


def _enhanced_ct(files: list[Path], out: Path, *, phases: int = 1) -> Path:
    """One Enhanced CT object from a single-frame series: positions, orientation, pixel
    measures and rescale in functional groups (per-frame rescale differs), frames
    stored shuffled, optionally repeated as several temporal positions."""
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    ds = base_dataset("CT", study_uid=dss[0].StudyInstanceUID, series_uid=generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = dss[0].Rows, dss[0].Columns
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.ConvolutionKernel = None
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = dss[0].PixelSpacing
    measures.SliceThickness = dss[0].SliceThickness
    shared.PixelMeasuresSequence = [measures]
    orient = Dataset()
    orient.ImageOrientationPatient = dss[0].ImageOrientationPatient
    shared.PlaneOrientationSequence = [orient]
    recon = Dataset()
    recon.ConvolutionKernel = "ENH-B30"
    recon.ReconstructionDiameter = "48"
    shared.CTReconstructionSequence = [recon]
    xray = Dataset()
    xray.KVP = "100"
    shared.CTXRayDetailsSequence = [xray]
    ds.SharedFunctionalGroupsSequence = [shared]
    order = np.random.default_rng(2).permutation(len(dss) * phases)
    frames, pixels = [], []
    for j in order:
        phase, k = divmod(int(j), len(dss))
        src = dss[k]
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = src.ImagePositionPatient
        item.PlanePositionSequence = [pos]
        content = Dataset()
        content.TemporalPositionIndex = phase + 1
        item.FrameContentSequence = [content]
        rescale = Dataset()
        rescale.RescaleSlope = "1"
        rescale.RescaleIntercept = str(-100 * (k % 2))  # per-frame intercepts
        item.PixelValueTransformationSequence = [rescale]
        frames.append(item)
        stored = src.pixel_array.astype(np.int32) + 100 * (k % 2) + 500 * phase
        pixels.append(stored.astype(np.int16).tobytes())
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(pixels)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("phases", [1, 2])
def test_enhanced_multiframe_ct(tmp_path: Path, phases: int) -> None:
    files = ct_series(tmp_path / "src", n=6, rows=32)
    ref = read_study(files)
    got = read_study([_enhanced_ct(files, tmp_path / "enh.dcm", phases=phases)])
    np.testing.assert_array_equal(got.volume, ref.volume)
    assert got.spacing == pytest.approx(ref.spacing)
    assert got.acquisition["kernel"] == "ENH-B30"
    assert got.acquisition["kvp"] == "100" and got.acquisition["recon_diameter"] == "48"
    if phases > 1:
        assert "temporal position 1" in got.series_reason


def test_acquisition_metadata(tmp_path: Path) -> None:
    def edit(ds: Dataset, k: int) -> None:
        ds.SoftwareVersions = "VB-20.1"
        ds.ConvolutionKernel = "B30f"
        ds.KVP = "120"
        ds.Exposure = "200"
        ds.ReconstructionDiameter = "350"
        ds.ProtocolName = "Thorax Routine"
        ds.DeviceSerialNumber = "SN-998877"
        ds.StationName = "CT-ROOM-3"
        ds.InstitutionName = "Saint Nowhere Hospital"

    study = read_study(ct_series(tmp_path / "s", edit=edit))
    acq = study.acquisition
    assert acq["software"] == "VB-20.1" and acq["kernel"] == "B30f" and acq["kvp"] == "120"
    assert acq["exposure"] == "200" and acq["recon_diameter"] == "350"
    assert acq["protocol"] == "Thorax Routine" and acq["slice_thickness"] == "2"
    assert not {"SN-998877", "CT-ROOM-3", "Saint Nowhere Hospital"} & set(acq.values())

    def named(ds: Dataset, k: int) -> None:
        ds.PatientName = "Hopkins^Anthony"
        ds.ProtocolName = "HOPKINS thorax redo"

    assert "protocol" not in read_study(ct_series(tmp_path / "n", edit=named)).acquisition


def test_acquisition_keywords_are_not_basic_profile_except_options() -> None:
    used = {kw for _, kw, _ in ACQUISITION_TEXT + ACQUISITION_NUMBERS}
    assert used & BASIC_PROFILE_KEYWORDS <= set(RETAINED_WITH_OPTIONS)


def test_preprocess_pads_by_modality() -> None:
    vol = np.full((2, 8, 8), 500.0, np.float32)
    ct = Study("1", "p", "1.1", "CT", vol, (4.0, 4.0, 4.0))
    assert preprocess(ct, InputSpec())[0, 0, 0] == -1024
    mr = Study("1", "p", "1.1", "MR", vol, (4.0, 4.0, 4.0), units="MR_raw")
    assert preprocess(mr, InputSpec())[0, 0, 0] == 0
