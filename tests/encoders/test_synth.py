"""encoders.synth: the synthetic CT cohort."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pydicom
import pytest

from encoders.synth import PHENOTYPES, SCANNERS, synth_cohort


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = synth_cohort(tmp_path / "a", patients=3, seed=7)
    b = synth_cohort(tmp_path / "b", patients=3, seed=7)
    c = synth_cohort(tmp_path / "c", patients=3, seed=8)
    da, db, dc = _digest_tree(a.root), _digest_tree(b.root), _digest_tree(c.root)
    assert da == db
    assert da != dc
    assert a.n_files == b.n_files


def test_layout_files_and_csvs(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    info = synth_cohort(tmp_path, patients=6, seed=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]
    files = sorted(info.dicom_dir.rglob("*.dcm"))
    assert len(files) == info.n_files
    assert all(
        re.fullmatch(r"\d{5}/\d+/\d+\.dcm", str(f.relative_to(info.dicom_dir))) for f in files
    )
    assert info.n_patients == 6
    assert set(info.phenotypes) == set(PHENOTYPES)  # 6 patients: every phenotype once

    outcomes = _rows(info.outcomes_csv)
    assert list(outcomes[0]) == ["patient_id", "time", "event", "phenotype", "grade"]
    assert len(outcomes) == 6
    for r in outcomes:
        assert re.fullmatch(r"SYN-\d{5}", r["patient_id"])
        assert float(r["time"]) > 0 and re.fullmatch(r"\d+\.\d", r["time"])
        assert r["event"] in {"0", "1"}
        assert r["phenotype"] in PHENOTYPES
        assert r["grade"] in {"G1", "G2", "G3", "G4"}
    truth = _rows(info.truth_csv)
    assert list(truth[0]) == ["patient_id", "scanner", "phenotype", "lesion_radius_mm",
                              "lesion_slice", "lesion_row", "lesion_col"]
    assert [r["patient_id"] for r in truth] == [r["patient_id"] for r in outcomes]
    assert {r["scanner"] for r in truth} <= {s.key for s in SCANNERS}
    for r in truth:
        small = r["phenotype"].startswith("small")
        assert (float(r["lesion_radius_mm"]) < 12) == small

    # Each patient: one study; an axial series, a localizer for some (2 of 6).
    series_per_patient = {
        p.name: sorted(q.name for q in p.iterdir()) for p in info.dicom_dir.iterdir()
    }
    assert sum(s == ["1", "2"] for s in series_per_patient.values()) == 2
    assert all(s in (["2"], ["1", "2"]) for s in series_per_patient.values())


def test_scanners_present_and_differ(tmp_path: Path) -> None:
    info = synth_cohort(tmp_path, patients=20, seed=0)
    assert len(info.scanners) >= 4
    truth = _rows(info.truth_csv)
    assert len({r["scanner"] for r in truth}) >= 4
    seen = {}
    for pdir in sorted(info.dicom_dir.iterdir()):
        ds = pydicom.dcmread(next((pdir / "2").iterdir()), stop_before_pixels=True)
        seen[ds.Manufacturer] = (
            float(ds.SliceThickness),
            int(ds.Rows),
            int(ds.PixelRepresentation),
            str(ds.ConvolutionKernel),
        )
    assert len(seen) >= 4
    assert len({v[0] for v in seen.values()}) >= 3  # slice thickness varies
    assert len({v[1] for v in seen.values()}) >= 3  # matrix / pixel spacing varies
    assert {v[2] for v in seen.values()} == {0, 1}  # signed and unsigned storage


def test_headers_are_real_ct_and_identifying(tmp_path: Path) -> None:
    info = synth_cohort(tmp_path, patients=4, seed=2)
    outcomes = {r["patient_id"] for r in _rows(info.outcomes_csv)}
    order_matches = []
    for pdir in sorted(info.dicom_dir.iterdir()):
        files = sorted((pdir / "2").iterdir())
        dss = [pydicom.dcmread(f) for f in files]
        ds = dss[0]
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SpacingBetweenSlices) == float(ds.SliceThickness)
        # Deliberately identifying fake values.
        assert str(ds.PatientName).startswith("Synthetic^Patient")
        assert ds.PatientID in outcomes
        assert ds.PatientBirthDate and ds.InstitutionName and ds.AccessionNumber
        assert str(ds.ReferringPhysicianName)
        assert 2015 <= int(ds.StudyDate[:4]) <= 2023
        assert len({d.StudyInstanceUID for d in dss}) == 1
        assert len({d.SOPInstanceUID for d in dss}) == len(dss)
        assert {f"{d.InstanceNumber}.dcm" for d in dss} == {f.name for f in files}
        by_z = sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))
        inst = [int(d.InstanceNumber) for d in by_z]
        order_matches.append(inst == sorted(inst) or inst == sorted(inst, reverse=True))
        nz = len(dss)
        assert nz * float(ds.SliceThickness) == pytest.approx(100, abs=5)
    # 4 patients get 4 different scanners, two of which number slices out of spatial order.
    assert any(order_matches) and not all(order_matches)


def test_truth_gives_each_lesion_centre_in_series_voxels(tmp_path: Path) -> None:
    """Read back in ascending slice order, the voxel truth.csv names is on the lesion: its
    density is the phenotype's (solid / spiculated ~0-60 HU, ground glass -600 to -400),
    not aerated lung (~ -850)."""
    import numpy as np

    from encoders.dicom import read_study, scan_folder

    info = synth_cohort(tmp_path, patients=6, seed=3)
    truth = {r["patient_id"]: r for r in _rows(info.truth_csv)}
    groups, _ = scan_folder(info.dicom_dir)
    assert len(groups) == 6
    for files in groups.values():
        study = read_study(files)
        t = truth[study.patient_id]
        at = tuple(int(np.rint(float(t[k]))) for k in ("lesion_slice", "lesion_row", "lesion_col"))
        # the median of the 3x3x3 voxels around it: robust to scanner noise
        z, y, x = at
        hu = float(np.median(study.volume[max(z - 1, 0) : z + 2, y - 1 : y + 2, x - 1 : x + 2]))
        if t["phenotype"].endswith("ground_glass"):
            assert -700 < hu < -300, (t, hu)
        else:
            assert hu > -250, (t, hu)
