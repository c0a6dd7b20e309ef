"""encoders.dicom: folder scan, series choice, geometry, HU, rejections, preprocessing."""

from __future__ import annotations

import csv
import io
import logging
import random
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from encoders.dicom import (
    DEFAULT_SERIES_RULE,
    Rejection,
    SeriesRule,
    Study,
    preprocess,
    read_study,
    scan_folder,
)
from encoders.errors import DicomError
from encoders.spec import InputSpec
from encoders.synth import SCANNERS, synth_cohort

SCANNER = {s.key: s for s in SCANNERS}
IDENTIFYING = ("Synthetic", "SYN-", "Faketown", "Fake^", "ACC", "CTSTATION", "SN-")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth_cohort(out, patients=5, seed=3)  # 5 patients: every scanner once
    return out


@pytest.fixture(scope="module")
def truth(cohort: Path) -> dict[str, dict[str, str]]:
    with open(cohort / "truth.csv") as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


def _patient_files(cohort: Path, scanner: str, truth: dict) -> list[Path]:
    pid = next(p for p, r in truth.items() if r["scanner"] == scanner)
    return sorted((cohort / "dicom" / f"{int(pid[4:]):05d}").rglob("*.dcm"))


def _axial_files(files: list[Path]) -> list[Path]:
    return [f for f in files if f.parent.name == "2"]


def _reference_volume(files: list[Path]) -> np.ndarray:
    """Independent reference: sort by z of ImagePositionPatient, apply rescale."""
    dss = [pydicom.dcmread(f) for f in files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]
    ).astype(np.float32)
    return np.maximum(vol, -1024.0)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    ds = pydicom.dcmread(src)
    edit(ds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _copy_series(files: list[Path], dst: Path, edit=None) -> list[Path]:
    out = []
    for i, f in enumerate(files):
        target = dst / f"f{i:03d}.dcm"
        if edit is None:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
        else:
            _rewrite(f, target, edit)
        out.append(target)
    return out


def _reason(sources, **kw) -> str:
    with pytest.raises(DicomError) as info:
        read_study(sources, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return info.value.reason


# --------------------------------------------------------------------------- scan


def test_scan_folder_groups_by_study_uid(cohort: Path, tmp_path: Path) -> None:
    studies, rejections = scan_folder(cohort)
    assert len(studies) == 5
    assert {Path(r.path).name for r in rejections} == {"outcomes.csv", "truth.csv"}
    assert all(isinstance(r, Rejection) and "not a DICOM" in r.reason for r in rejections)
    for uid, paths in studies.items():
        assert len({p.parts[-3] for p in paths}) == 1  # one patient folder per study
        assert pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID == uid

    # Folder and file names do not matter: mix two studies in one flat folder.
    flat = tmp_path / "flat"
    flat.mkdir()
    some = [p for paths in list(studies.values())[:2] for p in paths]
    random.Random(0).shuffle(some)
    for i, p in enumerate(some):
        shutil.copy(p, flat / f"img{i}")
    (flat / "notes.txt").write_text("hello\n")
    (flat / "empty.dcm").write_bytes(b"")
    (flat / "sub").mkdir()
    shutil.copy(some[0], flat / "sub" / "again")
    studies2, rejections2 = scan_folder(flat)
    assert {u: len(v) for u, v in studies2.items()} == {
        u: len(studies[u]) + (u == _uid(some[0])) for u in list(studies)[:2]
    }
    reasons = {Path(r.path).name: r.reason for r in rejections2}
    assert set(reasons) == {"notes.txt", "empty.dcm"}
    assert "empty" in reasons["empty.dcm"]


def _uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def test_scan_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DicomError) as info:
        scan_folder(tmp_path / "nope")
    assert info.value.reason == "not_found"


# --------------------------------------------------------------------- read_study


def test_read_study_sorted_hu_and_spacing(cohort: Path, truth: dict) -> None:
    studies, _ = scan_folder(cohort)
    seen_localizer = False
    for paths in studies.values():
        study = read_study(paths)
        sc = SCANNER[truth[study.patient_id]["scanner"]]
        axial = _axial_files(paths)
        seen_localizer |= len(axial) < len(paths)
        assert study.modality == "CT"
        assert study.volume.dtype == np.float32
        assert study.volume.shape == (len(axial), sc.rows, sc.rows)
        assert study.spacing == pytest.approx(
            (sc.thickness_mm, sc.fov_mm / sc.rows, sc.fov_mm / sc.rows), rel=1e-4
        )
        np.testing.assert_array_equal(study.volume, _reference_volume(axial))
        assert study.volume.min() >= -1024
        assert 0.2 < (study.volume < -700).mean() < 0.9  # air and lungs
        assert (study.volume > 300).any() and (study.volume > -300).mean() > 0.1  # bone, body
        assert study.study_date is not None
        assert study.acquisition["manufacturer"] == sc.manufacturer
        assert study.acquisition["kernel"] == sc.kernel
        assert float(study.acquisition["slice_thickness"]) == sc.thickness_mm
        for value in study.acquisition.values():
            assert not any(s in value for s in IDENTIFYING), value
        assert "series #2" in study.series_reason
        if len(axial) < len(paths):
            assert "localizer" in study.series_reason
    assert seen_localizer


def test_same_volume_when_shuffled_and_renamed(cohort: Path, truth: dict, tmp_path: Path) -> None:
    files = _patient_files(cohort, "borealis_aurora128", truth)  # random InstanceNumbers
    ref = read_study(files)
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    copies = _copy_series(shuffled, tmp_path / "x")
    again = read_study(list(reversed(copies)))
    np.testing.assert_array_equal(ref.volume, again.volume)
    assert ref.spacing == again.spacing
    assert ref.study_uid == again.study_uid


def test_bytes_input(cohort: Path, truth: dict) -> None:
    files = _patient_files(cohort, "cygnus_orion16", truth)
    ref = read_study(files)
    got = read_study([f.read_bytes() for f in files])
    np.testing.assert_array_equal(ref.volume, got.volume)
    assert got.acquisition == ref.acquisition
    with pytest.raises(DicomError) as info:
        read_study([files[0].read_bytes(), b"not dicom at all"])
    assert info.value.reason == "not_dicom"
    assert "<bytes #1>" in str(info.value)


def test_padding_value_becomes_air(cohort: Path, truth: dict) -> None:
    files = _axial_files(_patient_files(cohort, "cygnus_orion16", truth))
    assert pydicom.dcmread(files[0]).PixelPaddingValue == -2000
    vol = read_study(files).volume
    assert vol.min() >= -1024
    assert vol[:, 0, 0].max() == -1024  # corner lies outside the reconstruction circle


def _to_unsigned(ds: Dataset) -> None:
    hu = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
    ds.PixelRepresentation = 0
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept = "-1024"
    if "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()


def _to_signed(ds: Dataset) -> None:
    hu = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
    ds.PixelRepresentation = 1
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleIntercept = "0"
    ds.PixelData = hu.astype(np.int16).tobytes()


@pytest.mark.parametrize(
    ("scanner", "convert"),
    [("acme_lumen64", _to_unsigned), ("draco_vega40", _to_signed)],
)
def test_signed_and_unsigned_storage_same_hu(
    cohort: Path, truth: dict, tmp_path: Path, scanner: str, convert
) -> None:
    files = _axial_files(_patient_files(cohort, scanner, truth))
    assert bool(pydicom.dcmread(files[0]).PixelRepresentation) == SCANNER[scanner].signed
    ref = read_study(files)
    other = read_study(_copy_series(files, tmp_path / "conv", convert))
    assert other.volume.shape == ref.volume.shape
    assert np.abs(other.volume - ref.volume).max() <= 1.0


def test_canonical_orientation(cohort: Path, truth: dict, tmp_path: Path) -> None:
    """A series stored rotated by 180 degrees in-plane reads back the same."""
    files = _axial_files(_patient_files(cohort, "eridani_sirius256", truth))
    ref = read_study(files)
    ps = ref.spacing[1]
    n = ref.volume.shape[1]

    def rotate(ds: Dataset) -> None:
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [x0 + (n - 1) * ps, y0 + (n - 1) * ps, z]
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, ::-1]).tobytes()

    got = read_study(_copy_series(files, tmp_path / "rot", rotate))
    np.testing.assert_allclose(got.volume, ref.volume, atol=0)
    assert "flipped" in got.series_reason


def test_series_rule(cohort: Path, truth: dict, tmp_path: Path) -> None:
    studies, _ = scan_folder(cohort)
    with_scout = next(p for p in studies.values() if len(_axial_files(p)) < len(p))
    scout = [p for p in with_scout if p.parent.name == "1"]
    assert _reason(scout) == "no_usable_series"
    assert _reason(scout, series_rule=SeriesRule(min_slices=1)) == "no_usable_series"
    # min_slices and localizer both relaxed: the scout is read.
    study = read_study(scout, series_rule=SeriesRule(min_slices=1, allow_localizer=True))
    assert study.volume.shape[0] == 1

    axial = _axial_files(with_scout)
    derived = _copy_series(
        axial, tmp_path / "d", lambda d: setattr(d, "ImageType", ["DERIVED", "SECONDARY", "AXIAL"])
    )
    # A DERIVED axial series alone is used as the fallback, and the reason says so.
    study = read_study(derived)
    assert study.volume.shape[0] == len(axial)
    assert "DERIVED" in study.series_reason and "no ORIGINAL" in study.series_reason
    assert read_study(derived, series_rule=SeriesRule(allow_derived=True)).volume.shape[0] == len(
        axial
    )
    # A DERIVED coronal one is a reformat: refused unless the rule allows derived images.
    def coronal_derived(d: Dataset) -> None:
        d.ImageType = ["DERIVED", "SECONDARY", "CORONAL"]
        d.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    coronal = _copy_series(axial, tmp_path / "c", coronal_derived)
    assert _reason(coronal) == "no_usable_series"
    thick = SeriesRule(max_slice_thickness_mm=1.0)
    assert _reason(axial, series_rule=thick) == "no_usable_series"
    assert _reason(axial, series_rule=SeriesRule(modalities=("MR",))) == "no_usable_series"
    assert DEFAULT_SERIES_RULE.min_slices == 3


def test_most_slices_wins_and_broken_series_falls_back(
    cohort: Path, truth: dict, tmp_path: Path
) -> None:
    files = _axial_files(_patient_files(cohort, "acme_lumen64", truth))
    files.sort(key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    half = files[: len(files) // 2]  # a contiguous half

    def other_series(num):
        def edit(ds: Dataset) -> None:
            ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["s", str(num)])
            ds.SeriesNumber = num
            ds.SOPInstanceUID = pydicom.uid.generate_uid(
                entropy_srcs=["i", str(num), str(ds.InstanceNumber)]
            )

        return edit

    small = _copy_series(half, tmp_path / "small", other_series(7))
    study = read_study(files + small)
    assert study.volume.shape[0] == len(files)
    assert "series #2" in study.series_reason

    # The biggest series is broken (burned-in text): the next one is used, and said so.
    burned = _copy_series(files, tmp_path / "b", lambda d: setattr(d, "BurnedInAnnotation", "YES"))
    study = read_study(burned + small)
    assert study.volume.shape[0] == len(small)
    assert "burned_in_annotation" in study.series_reason


# ---------------------------------------------------------------------- rejections


@pytest.fixture()
def series(cohort: Path, truth: dict) -> list[Path]:
    return _axial_files(_patient_files(cohort, "draco_vega40", truth))


def test_rejects_non_dicom_and_empty(series: list[Path], tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("this is not DICOM\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert _reason([text]) == "not_dicom"
    assert _reason([empty]) == "not_dicom"
    assert _reason([*series, text]) == "not_dicom"
    with pytest.raises(DicomError, match=r"a\.txt"):
        read_study([text])
    assert _reason([]) == "no_files"


def test_rejects_truncated(series: list[Path], tmp_path: Path) -> None:
    data = series[0].read_bytes()
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(data[:-500])
    assert _reason([cut_pixels, *series[1:]]) == "truncated"
    at = data.index(b"1 Nowhere Road")
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[: at + 5])
    assert _reason([cut_header, *series[1:]]) == "truncated"
    _, rejections = scan_folder(tmp_path)
    assert [Path(r.path).name for r in rejections] == ["cut_header.dcm"]


def test_rejects_missing_pixel_data(series: list[Path], tmp_path: Path) -> None:
    def drop(ds: Dataset) -> None:
        del ds.PixelData

    files = _copy_series(series[:1], tmp_path / "np", drop) + series[1:]
    assert _reason(files) == "no_pixel_data"


def test_rejects_bad_rescale(series: list[Path], tmp_path: Path) -> None:
    zero = _copy_series(series, tmp_path / "z", lambda d: setattr(d, "RescaleSlope", "0"))
    assert _reason(zero) == "bad_rescale"
    # A non-numeric DS value cannot be set through pydicom; patch the bytes instead.
    raw = bytearray(series[0].read_bytes())
    at = raw.index(b"\x28\x00\x53\x10DS")
    length = struct.unpack("<H", raw[at + 6 : at + 8])[0]
    raw[at + 8 : at + 8 + length] = b"x".ljust(length)
    bad = tmp_path / "bad_slope.dcm"
    bad.write_bytes(bytes(raw))
    assert _reason([bad, *series[1:]]) == "bad_rescale"


def test_rejects_absurd_sizes(series: list[Path], tmp_path: Path) -> None:
    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535

    def bigger(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 1000

    files = _copy_series(series, tmp_path / "h", huge)
    assert _reason(files) == "too_large"
    files = _copy_series(series, tmp_path / "b", bigger)
    assert _reason(files) == "truncated"  # declares more pixels than it holds


def test_rejects_burned_in_annotation(series: list[Path], tmp_path: Path) -> None:
    edit = lambda d: setattr(d, "BurnedInAnnotation", "YES")  # noqa: E731
    files = _copy_series(series[:1], tmp_path / "bia", edit) + series[1:]
    assert _reason(files) == "burned_in_annotation"


def test_rejects_inconsistent_geometry(series: list[Path], tmp_path: Path) -> None:
    tilted = _copy_series(
        series[:1],
        tmp_path / "o",
        lambda d: setattr(d, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]),
    )
    assert _reason(tilted + series[1:]) == "inconsistent_geometry"

    def smaller(ds: Dataset) -> None:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:-2, :-2]).tobytes()
        ds.Rows -= 2
        ds.Columns -= 2

    small = _copy_series(series[:1], tmp_path / "s", smaller)
    assert _reason(small + series[1:]) == "inconsistent_geometry"

    # A missing slice in the middle leaves a gap: refused naming where (in mm).
    ordered = sorted(series, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    assert _reason(ordered[:5] + ordered[6:]) == "missing_slices"
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in ordered[4:7]]
    with pytest.raises(DicomError, match=rf"between slice positions {z[0]:.1f} to {z[2]:.1f} mm"):
        read_study(ordered[:5] + ordered[6:])
    # Irregular spacing that is not a whole number of missing slices stays a geometry error.
    def shifted(ds: Dataset) -> None:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[2] -= 0.3 * (z[1] - z[0])  # gaps of 1.7 and 1.3 slices around it
        ds.ImagePositionPatient = ipp

    moved = _copy_series(ordered[6:7], tmp_path / "mv", shifted)
    assert _reason(ordered[:5] + moved + ordered[7:]) == "inconsistent_geometry"

    # Two different images at one position (e.g. two phases in one series).
    def other_sop(ds: Dataset) -> None:
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["dup"])
        ds.PixelData = (ds.pixel_array + 100).astype(ds.pixel_array.dtype).tobytes()

    dup = _copy_series(series[:1], tmp_path / "dup", other_sop)
    assert _reason(series + dup) == "inconsistent_geometry"


def test_identical_duplicates_dropped(series: list[Path]) -> None:
    ref = read_study(series)
    study = read_study(series + series[:2])
    np.testing.assert_array_equal(study.volume, ref.volume)
    assert "dropped 2 duplicate slices" in study.series_reason


def test_rejects_mixed_studies(cohort: Path, truth: dict) -> None:
    a = _patient_files(cohort, "acme_lumen64", truth)
    b = _patient_files(cohort, "draco_vega40", truth)
    assert _reason(a + b) == "mixed_studies"


# ---------------------------------------------------------------------- multi-frame


def _multiframe(files: list[Path], out: Path, *, per_frame: bool) -> Path:
    dss = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    ds = dss[0]
    ds.NumberOfFrames = len(dss)
    ds.PixelData = b"".join(d.PixelData for d in dss)
    if per_frame:
        items = []
        for d in dss:
            pos = Dataset()
            pos.ImagePositionPatient = d.ImagePositionPatient
            item = Dataset()
            item.PlanePositionSequence = [pos]
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = items
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("per_frame", [True, False])
def test_multiframe(series: list[Path], tmp_path: Path, per_frame: bool) -> None:
    ref = read_study(series)
    mf = _multiframe(series, tmp_path / "mf.dcm", per_frame=per_frame)
    got = read_study([mf])
    np.testing.assert_array_equal(got.volume, ref.volume)
    assert got.spacing == pytest.approx(ref.spacing)


# ------------------------------------------------------------------------- others


def test_pydicom_ct_small_reads() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert _reason([path]) == "no_usable_series"  # one slice < min_slices
    study = read_study([Path(path)], series_rule=SeriesRule(min_slices=1))
    assert study.volume.shape == (1, 128, 128)
    assert study.spacing[1:] == pytest.approx((0.661468, 0.661468))
    assert study.acquisition["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert set(study.acquisition) <= {
        "manufacturer", "model", "software", "kernel", "kvp", "exposure", "slice_thickness",
        "pixel_spacing", "rows", "columns", "field_strength", "sequence", "protocol",
        "recon_diameter", "modality", "intensity",
    }  # fmt: skip
    assert study.acquisition["intensity"] == "HU"
    assert -1024 <= study.volume.min() < study.volume.max() < 3000
    out = preprocess(study, InputSpec())
    assert out.shape == InputSpec().shape and out.dtype == np.int16


def _study(volume: np.ndarray, spacing: tuple[float, float, float]) -> Study:
    return Study(
        study_uid="1.2",
        patient_id="p",
        series_uid="1.2.3",
        modality="CT",
        volume=volume.astype(np.float32),
        spacing=spacing,
    )


def test_preprocess_shapes_and_values(cohort: Path, truth: dict) -> None:
    # the legacy centre-crop grid (tests/encoders/test_grid.py covers the whole-study one)
    spec = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(16, 64, 64), fit="crop")
    # Larger than the target: 1 mm voxels over 120 x 300 x 300 mm are cropped.
    big = np.full((120, 300, 300), 40.0, np.float32)
    out = preprocess(_study(big, (1.0, 1.0, 1.0)), spec)
    assert out.shape == spec.shape and out.dtype == np.int16
    assert (out == 40).all()
    # Smaller than the target: padded with pad_value_hu around a centred block.
    small = np.full((2, 8, 8), 100.0, np.float32)
    out = preprocess(_study(small, (4.0, 4.0, 4.0)), spec)
    assert out.shape == spec.shape
    assert out[8, 32, 32] == 100 and out[0, 0, 0] == -1024
    assert (out == 100).sum() == 2 * 8 * 8
    # Values beyond int16 are clipped.
    hot = np.full((16, 64, 64), 1e6, np.float32)
    assert preprocess(_study(hot, (4.0, 4.0, 4.0)), spec).max() == 32767
    # Anisotropic real study: physical extent preserved.
    files = _patient_files(cohort, "borealis_aurora128", truth)
    study = read_study(files)
    out = preprocess(study, InputSpec(spacing_mm=(5.0, 2.34375, 2.34375), shape=(20, 128, 128),
                                      fit="crop"))
    np.testing.assert_allclose(out, np.rint(study.volume), atol=1)
    out = preprocess(study, spec)
    assert out.shape == spec.shape and out.min() >= -1024 and out.max() < 3000
    assert (out < -700).mean() > 0.1  # lungs/air survive resampling


def test_damaged_files_only_raise_dicom_error(series: list[Path], tmp_path: Path) -> None:
    """Random byte damage and truncation: a result or a DicomError, never anything else."""
    data = series[0].read_bytes()
    header_end = len(data) - len(pydicom.dcmread(series[0]).PixelData)
    rng = random.Random(0)
    rule = SeriesRule(min_slices=1)
    for trial in range(150):
        d = bytearray(data)
        for _ in range(rng.choice([1, 3, 20])):
            d[rng.randrange(header_end + 8)] = rng.randrange(256)
        if trial % 4 == 0:
            d = d[: rng.randrange(len(d))]
        try:
            read_study([bytes(d)], series_rule=rule)
        except DicomError as e:
            assert "<bytes #0>" in str(e)
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(d))
    scan_folder(tmp_path)  # never raises


def test_pydicom_warnings_do_not_leak_values(
    series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom warns quoting element values (possibly patient data); reads stay silent."""
    datas = []
    for f in series:
        raw = f.read_bytes()
        uid = pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID.encode()
        datas.append(raw.replace(uid, uid[:-6] + b"SECRET"))
    with pytest.warns(UserWarning, match="SECRET"):  # pydicom on its own does warn
        _ = pydicom.dcmread(io.BytesIO(datas[0])).SeriesInstanceUID
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = read_study(datas)
    assert study.volume.shape[0] == len(series)
    assert not [w for w in caught if "SECRET" in str(w.message)]
    assert "SECRET" not in caplog.text


def test_compressed_series_reads_the_same(series: list[Path], tmp_path: Path) -> None:
    ref = read_study(series)

    def rle(ds: Dataset) -> None:
        ds.compress(pydicom.uid.RLELossless)

    got = read_study(_copy_series(series, tmp_path / "rle", rle))
    np.testing.assert_array_equal(got.volume, ref.volume)


@pytest.mark.parametrize(
    "name",
    ["MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"],
)
def test_pydicom_mr_files_read_raw(name: str) -> None:
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    rule = SeriesRule(min_slices=1, allow_derived=True)  # MR_small is DERIVED\SECONDARY
    study = read_study([get_testdata_file(name)], series_rule=rule)
    assert study.modality == "MR"
    np.testing.assert_array_equal(study.volume[0], ref.astype(np.float32))  # no HU clipping


def test_missing_patient_id_is_per_study(series: list[Path], tmp_path: Path) -> None:
    def drop(ds: Dataset) -> None:
        del ds.PatientID

    study = read_study(_copy_series(series, tmp_path / "nopid", drop))
    assert study.patient_id == f"NO-PATIENT-ID:{study.study_uid}"
    assert "no PatientID" in study.series_reason
