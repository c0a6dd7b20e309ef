"""The whole-study grid and the lesion proposal on a real chest CT (LIDC-IDRI-0001).

The study (133 slices of 512 x 512, 0.703 mm pixels, 2.5 mm slices, z -340..-10 mm) and
its reader XML come from ``../shared/data/lidc-idri-0001.tar.xz`` beside the repository
(see that folder's README); the tests skip, saying so, where it is absent. Four
radiologists marked one nodule near pixel (316, 367), z ~ -116 mm.
"""

from __future__ import annotations

import itertools
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from encoders.dicom import read_study
from encoders.grid import StudyInput, study_input
from encoders.regions import ReaderRegion
from encoders.spec import DEFAULT_SPEC

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lidc-idri-0001.tar.xz"
NS = {"n": "http://www.nih.gov"}


@pytest.fixture(scope="module")
def lidc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CT absent: {ARCHIVE} (LIDC-IDRI-0001 from TCIA, see "
                    "../shared/data/README.md)")
    out = tmp_path_factory.mktemp("lidc")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="module")
def case(lidc: Path) -> dict:
    """The study, its sorted slice z positions (mm, LPS), the reader boxes of the rated
    nodule (>= 3 mm) from the XML and its centre (mean of the readers' contour points) in
    study mm."""
    files = sorted(lidc.rglob("*.dcm"))
    study = read_study(files)
    zs = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                for f in files)
    xml = next(lidc.rglob("*.xml"))
    regions, points = [], []
    for k, session in enumerate(ET.parse(xml).getroot().iter(f"{{{NS['n']}}}readingSession")):
        for nodule in session.findall("n:unblindedReadNodule", NS):
            # nodules >= 3 mm carry ratings; smaller ones are single points without
            if nodule.find("n:characteristics/n:malignancy", NS) is None:
                continue
            zi, ys, xs = [], [], []
            for roi in nodule.findall("n:roi", NS):
                z = float(roi.find("n:imageZposition", NS).text)  # type: ignore[union-attr]
                i = int(np.argmin(np.abs(np.asarray(zs) - z)))
                for e in roi.findall("n:edgeMap", NS):
                    x = int(e.find("n:xCoord", NS).text)  # type: ignore[union-attr]
                    y = int(e.find("n:yCoord", NS).text)  # type: ignore[union-attr]
                    zi.append(i)
                    ys.append(y)
                    xs.append(x)
                    points.append((i, y, x))
            if zi:
                regions.append(ReaderRegion(f"reader{k}", (min(zi), min(ys), min(xs),
                                                            max(zi) + 1, max(ys) + 1, max(xs) + 1)))
    sp = study.spacing
    centre = tuple((float(np.mean([p[a] for p in points])) + 0.5) * sp[a] for a in range(3))
    return {"study": study, "zs": zs, "regions": regions, "nodule_mm": centre}


@pytest.fixture(scope="module")
def proposed(case: dict) -> StudyInput:
    return study_input(case["study"], DEFAULT_SPEC)


def test_whole_chest_is_kept_in_the_context_volume(case: dict, proposed: StudyInput) -> None:
    study, zs, grid = case["study"], case["zs"], proposed.grid
    assert zs[0] == pytest.approx(-340.0) and zs[-1] == pytest.approx(-10.0)
    assert study.volume.shape[0] == len(zs)  # every slice is in the study volume
    lo = grid.origin_mm
    hi = [o + n * s for o, n, s in zip(grid.origin_mm, grid.shape, grid.spacing_mm, strict=True)]
    for a in range(3):  # the context spans the whole study: padded, never cropped
        assert lo[a] <= 1e-6 and hi[a] >= study.volume.shape[a] * study.spacing[a] - 1e-6
    assert proposed.context.shape == DEFAULT_SPEC.shape
    assert grid.spacing_mm[0] >= DEFAULT_SPEC.spacing_mm[0]
    # -340 .. -10 mm (slice centres) lie inside the kept z range
    first_centre_mm = 0.5 * study.spacing[0]
    assert grid.to_voxel([first_centre_mm, 0, 0])[0] >= -0.5
    last_centre_mm = (len(zs) - 0.5) * study.spacing[0]
    assert grid.to_voxel([last_centre_mm, 0, 0])[0] <= grid.shape[0] - 0.5


def test_marked_nodule_is_inside_the_context_and_a_detail_patch(
    case: dict, proposed: StudyInput
) -> None:
    nod = case["nodule_mm"]
    v = proposed.grid.to_voxel(nod)
    assert all(-0.5 <= c <= n - 0.5 for c, n in zip(v, proposed.grid.shape, strict=True))
    # the context voxel there is denser than aerated lung (the nodule is kept)
    idx = tuple(round(c) for c in v)
    assert proposed.context[idx] > -600
    half = [m / 2 for m in DEFAULT_SPEC.patch_mm]
    inside = [i for i, p in enumerate(proposed.patch_info)
              if all(abs(a - b) < h for a, b, h in zip(p.centre_mm, nod, half, strict=True))]
    assert inside, "no detail patch holds the marked nodule"
    patch = proposed.patches[inside[0]]
    assert patch.shape == DEFAULT_SPEC.patch_shape and patch.max() > 0  # soft tissue in it


def test_proposal_top3_finds_the_marked_nodule(case: dict, proposed: StudyInput) -> None:
    props = [p for p in proposed.patch_info if p.source == "proposal"]
    assert len(props) == DEFAULT_SPEC.proposals
    assert [p.rank for p in props] == list(range(len(props)))
    assert all(a.score >= b.score for a, b in itertools.pairwise(props))
    dist = [float(np.linalg.norm(np.subtract(p.centre_mm, case["nodule_mm"]))) for p in props]
    assert min(dist[:3]) <= 10.0, f"distances of the top 3 proposals: {dist[:3]}"


def test_reader_regions_become_patches_centred_on_their_boxes(case: dict) -> None:
    regions = case["regions"]
    assert len(regions) == 4  # four radiologists, one nodule each
    si = study_input(case["study"], DEFAULT_SPEC, regions=regions, proposals=False)
    readers = [p for p in si.patch_info if p.source == "reader"]
    assert [p.reader for p in readers] == [r.reader for r in regions]
    for p in readers:  # each reader's box centre is within a few mm of the consensus
        assert np.linalg.norm(np.subtract(p.centre_mm, case["nodule_mm"])) < 6.0
    assert si.patches.shape == (4, *DEFAULT_SPEC.patch_shape)


def test_stored_bytes_per_study_are_bounded(case: dict, proposed: StudyInput) -> None:
    stored = proposed.context.nbytes + proposed.patches.nbytes
    assert stored <= DEFAULT_SPEC.max_study_bytes() <= 4 * 2**20


def test_real_anatomy_cohort_inserts_lesions_and_reader_boxes(lidc: Path, tmp_path: Path) -> None:
    import csv

    from encoders.dicom import scan_folder
    from encoders.synth_real import synth_background

    # leave out 25 mm either side of the real nodule (~226 mm from the first slice)
    info = synth_background(tmp_path / "real", lidc, patients=2, seed=3,
                            avoid_mm=[(200.0, 252.0)])
    with open(info.truth_csv, newline="") as fh:
        truth = {r["patient_id"]: r for r in csv.DictReader(fh)}
    with open(info.root / "regions.csv", newline="") as fh:
        boxes = list(csv.DictReader(fh))
    assert sorted({b["reader"] for b in boxes}) == ["reader1", "reader2"] and len(boxes) == 4
    groups, rejected = scan_folder(info.dicom_dir)
    assert len(groups) == 2 and not rejected
    for files in groups.values():
        study = read_study(files)
        t = truth[study.patient_id]
        assert study.volume.shape[0] * study.spacing[0] >= 100.0 - study.spacing[0]
        c = [round(float(t[k])) for k in ("lesion_slice", "lesion_row", "lesion_col")]
        core = study.volume[c[0], c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2].mean()
        floor = -700.0 if t["phenotype"].endswith("ground_glass") else -300.0
        assert core > floor, (t["phenotype"], core)
        for b in (b for b in boxes if b["patient_id"] == study.patient_id):
            lo = [int(b[k]) for k in ("z0", "y0", "x0")]
            hi = [int(b[k]) for k in ("z1", "y1", "x1")]
            assert all(a <= v < z for a, v, z in zip(lo, c, hi, strict=True))  # box holds it
