"""encoders.regions: reader boxes from a CSV, the LIDC reader XML, DICOM SEG (highdicom)
and RTSTRUCT (pydicom), all on the sorted volume grid of a read study."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from encoders.dicom import annotation_files, read_file_header, read_study, scan_folder
from encoders.errors import RegionError
from encoders.geometry import voxel_to_patient
from encoders.regions import (
    ReaderRegion,
    check_box,
    regions_for,
    regions_for_study,
    regions_from_csv,
    regions_from_lidc_xml,
)
from tests.encoders.dicom_factory import ct_series

FOR_UID = "1.2.826.0.1.3680043.8.498.1"
N, ROWS = 8, 32


def _patient_module(ds: Dataset, k: int) -> None:
    """What highdicom copies from the source images into a SEG."""
    ds.FrameOfReferenceUID = FOR_UID
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"


def _rotated(ds: Dataset, k: int) -> None:
    """Rows and columns run the other way: the reader flips both in-plane axes."""
    _patient_module(ds, k)
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]


@pytest.fixture(params=["as-stored", "rotated"])
def ct(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[Path], object]:
    edit = _patient_module if request.param == "as-stored" else _rotated
    files = ct_series(tmp_path / "ct", n=N, rows=ROWS, spacing=(2.5, 0.8, 0.8), edit=edit)
    return files, read_study(files)


def _sorted_sources(files: list[Path]) -> list[Dataset]:
    dss = [pydicom.dcmread(f) for f in files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss


def _expected_box(study, z: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]):
    """Source-image (row, column) ranges (half-open) as a volume box, by the flips."""
    fy, fx = study.in_plane_flips
    y0, y1 = (ROWS - rows[1], ROWS - rows[0]) if fy else rows
    x0, x1 = (ROWS - cols[1], ROWS - cols[0]) if fx else cols
    return (z[0], y0, x0, z[1], y1, x1)


# ------------------------------------------------------------------------------ CSV


def test_csv_regions_readers_lesions_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "regions.csv"
    path.write_text(
        "\ufeffPatient_ID,study_instance_uid,reader,z0,y0,x0,z1,y1,x1,lesion\n"
        "PAT-1,,r1,1,2,3,4,5,6,a\n"
        "PAT-1,,r2,1,2,3,5,6,7.0,a\n"
        "\n"
        "PAT-1,1.2.3,r1,0,0,0,1,1,1,\n"
        "PAT-2,,r1,2,2,2,3,3,3,b\n"
    )
    got = regions_from_csv(path)
    assert got == {
        "PAT-1": [ReaderRegion("r1", (1, 2, 3, 4, 5, 6), "a"), ReaderRegion("r2", (1, 2, 3, 5, 6, 7), "a")],
        "1.2.3": [ReaderRegion("r1", (0, 0, 0, 1, 1, 1), "")],
        "PAT-2": [ReaderRegion("r1", (2, 2, 2, 3, 3, 3), "b")],
    }


@pytest.mark.parametrize(
    "body, reason, where",
    [
        ("patient_id,reader,z0,y0,x0,z1,y1\n", "missing_column", "x1"),
        ("reader,z0,y0,x0,z1,y1,x1\nr,0,0,0,1,1,1\n", "missing_column", "patient_id or study_instance_uid"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\nSECRET-ID,r,0,0,0,1,1,x\n", "bad_row", ":2: x1"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\nP,r,0,0,0,1,1,1\nSECRET-ID,r,3,0,0,3,1,1\n", "bad_row", ":3: need 0 <= z0 < z1"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\nSECRET-ID,r,0,0,0,1,1,1.5\n", "bad_row", "whole number"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\nSECRET-ID,,0,0,0,1,1,1\n", "bad_row", "reader is empty"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\n,r,0,0,0,1,1,1\n", "bad_row", "neither patient_id"),
        ("", "bad_csv", "empty"),
        ("patient_id,reader,z0,y0,x0,z1,y1,x1\nP,\"" + "r" * 200_000 + "\",0,0,0,1,1,1\n", "bad_csv", ":2: not valid CSV"),
    ],
)
def test_csv_errors_name_the_line_not_the_patient(tmp_path: Path, body: str, reason: str, where: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(body)
    with pytest.raises(RegionError) as info:
        regions_from_csv(path)
    assert info.value.reason == reason
    assert where in str(info.value) and "SECRET-ID" not in str(info.value)


def test_regions_for_picks_the_study_and_checks_boxes(ct) -> None:
    _, study = ct
    table = {
        study.patient_id: [ReaderRegion("r1", (0, 0, 0, 2, 2, 2))],
        study.study_uid: [ReaderRegion("r2", (1, 1, 1, N, ROWS, ROWS))],
    }
    assert [r.reader for r in regions_for(table, study)] == ["r2"]  # the study's own wins
    assert [r.reader for r in regions_for({study.patient_id: table[study.patient_id]}, study)] == ["r1"]
    assert regions_for({}, study) == []
    with pytest.raises(RegionError, match=r"reader .r3.*z0=1, z1=9") as info:
        regions_for({study.study_uid: [ReaderRegion("r3", (1, 0, 0, N + 1, 2, 2))]}, study)
    assert info.value.reason == "outside_study"
    assert check_box([0, 0, 0, 1, 1, 1], (1, 1, 1)) == (0, 0, 0, 1, 1, 1)


# ----------------------------------------------------------------------- LIDC XML


def _lidc_xml(study_uid: str, readers: list[list[list[tuple[str, float, list[tuple[int, int]]]]]]) -> str:
    """readers -> nodules -> rois (sop uid, z mm, [(x, y)...])."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<LidcReadMessage xmlns="http://www.nih.gov">',
        f"<ResponseHeader><StudyInstanceUID>{study_uid}</StudyInstanceUID></ResponseHeader>",
    ]
    for n, nodules in enumerate(readers):
        parts.append(f"<readingSession><servicingRadiologistID>{1000 + n}</servicingRadiologistID>")
        for k, rois in enumerate(nodules):
            parts.append(f"<unblindedReadNodule><noduleID>N{k}</noduleID>")
            for uid, z, pts in rois:
                parts.append(
                    f"<roi><imageZposition>{z:.6f} </imageZposition><imageSOP_UID>{uid}</imageSOP_UID>"
                    "<inclusion>TRUE</inclusion>"
                )
                parts.extend(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
                parts.append("</roi>")
            parts.append("</unblindedReadNodule>")
        parts.append("<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>0</imageZposition></nonNodule>")
        parts.append("</readingSession>")
    parts.append("</LidcReadMessage>")
    return "\n".join(parts)


def test_lidc_xml_boxes_per_reader_grouped_into_lesions(ct, tmp_path: Path) -> None:
    files, study = ct
    src = _sorted_sources(files)
    uid = [str(d.SOPInstanceUID) for d in src]
    z = [float(d.ImagePositionPatient[2]) for d in src]
    # Reader 1 by SOP UID: slices 2-3, columns 10-14, rows 5-8; and a point far away.
    # Reader 2 by z only (a UID the study lacks): slices 2-4 of the same lesion.
    readers = [
        [[(uid[2], z[2], [(10, 5), (14, 8)]), (uid[3], z[3], [(11, 6)])], [(uid[6], z[6], [(25, 25)])]],
        [[("9.9.9", z[2] + 0.3, [(11, 5), (13, 7)]), ("9.9.9", z[4], [(12, 6)])]],
    ]
    path = tmp_path / "reads.xml"
    path.write_text(_lidc_xml(study.study_uid, readers))
    got = regions_from_lidc_xml(path, study)
    assert got == [
        ReaderRegion("lidc-1000", _expected_box(study, (2, 4), (5, 9), (10, 15)), "L1"),
        ReaderRegion("lidc-1000", _expected_box(study, (6, 7), (25, 26), (25, 26)), "L2"),
        ReaderRegion("lidc-1001", _expected_box(study, (2, 5), (5, 8), (11, 14)), "L1"),
    ]
    # Every box holds the contour's pixel, checked in patient space.
    for r in got:
        z0, y0, x0, z1, y1, x1 = r.box
        assert study.volume[z0:z1, y0:y1, x0:x1].size > 0


def test_lidc_xml_refusals(ct, tmp_path: Path) -> None:
    files, study = ct
    path = tmp_path / "x.xml"
    path.write_text(_lidc_xml("1.2.3.999", []))
    with pytest.raises(RegionError) as info:
        regions_from_lidc_xml(path, study)
    assert info.value.reason == "wrong_study"
    path.write_text(_lidc_xml(study.study_uid, [[[("9.9", 5000.0, [(1, 1)])]]]))
    with pytest.raises(RegionError, match="matches no slice") as info:
        regions_from_lidc_xml(path, study)
    src = _sorted_sources(files)
    path.write_text(_lidc_xml(study.study_uid, [[[(str(src[1].SOPInstanceUID), 0.0, [(ROWS, 1)])]]]))
    with pytest.raises(RegionError, match="outside the 32x32 images"):
        regions_from_lidc_xml(path, study)
    path.write_text("<LidcReadMessage xmlns='http://www.nih.gov'><unclosed>")
    with pytest.raises(RegionError) as info:
        regions_from_lidc_xml(path, study)
    assert info.value.reason == "bad_xml"
    path.write_text("<other/>")
    with pytest.raises(RegionError, match="LidcReadMessage"):
        regions_from_lidc_xml(path, study)


def test_hostile_xml_refused_quickly(ct, tmp_path: Path) -> None:
    _, study = ct
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    laughs = "".join(
        f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10 if i else "lol"}">' for i in range(10)
    )
    bombs = {
        "billion-laughs": f'<?xml version="1.0"?><!DOCTYPE r [{laughs}]><LidcReadMessage xmlns="http://www.nih.gov">&l9;</LidcReadMessage>',
        "external-entity": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]><LidcReadMessage xmlns="http://www.nih.gov">&x;</LidcReadMessage>',
        "dtd": '<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://example.invalid/x.dtd"><LidcReadMessage xmlns="http://www.nih.gov"/>',
    }
    for name, text in bombs.items():
        path = tmp_path / f"{name}.xml"
        path.write_text(text)
        start = time.perf_counter()
        with pytest.raises(RegionError) as info:
            regions_from_lidc_xml(path, study)
        assert info.value.reason == "bad_xml", name
        assert "do not read me" not in str(info.value)
        assert time.perf_counter() - start < 5.0, name  # a hang guard, not a benchmark
    # Deep nesting and a huge file: no recursion blow-up, a size cap before parsing.
    deep = tmp_path / "deep.xml"
    deep.write_text('<LidcReadMessage xmlns="http://www.nih.gov">' + "<a>" * 100_000 + "</a>" * 100_000 + "</LidcReadMessage>")
    assert regions_from_lidc_xml(deep, study) == []
    huge = tmp_path / "huge.xml"
    with open(huge, "wb") as fh:
        fh.truncate(65 << 20)  # sparse: 65 MiB of nothing
    with pytest.raises(RegionError) as info:
        regions_from_lidc_xml(huge, study)
    assert info.value.reason == "too_large"


# ------------------------------------------------------------------------------ SEG


def _seg(sources: list[Dataset], mask: np.ndarray, labels: list[str], creator: str) -> Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(labels)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Reader Lab",
        manufacturer_model_name="Contour",
        software_versions="1",
        device_serial_number="1",
        content_creator_name=creator,
    )


def test_seg_segments_become_boxes(ct, tmp_path: Path) -> None:
    files, study = ct
    src = _sorted_sources(files)
    mask = np.zeros((N, ROWS, ROWS, 2), dtype=bool)
    mask[2:5, 10:14, 20:25, 0] = True
    mask[6, 3, 4, 1] = True
    seg = _seg(src, mask, ["nodule A", "nodule B"], "Reader^Alice")
    got = regions_for_study(study, [seg])
    assert got == [
        ReaderRegion("Reader Alice", _expected_box(study, (2, 5), (10, 14), (20, 25)), "nodule A"),
        ReaderRegion("Reader Alice", _expected_box(study, (6, 7), (3, 4), (4, 5)), "nodule B"),
    ]
    # The same through files, mixed with the images: the SEG is found, the images passed over.
    seg_path = tmp_path / "ct" / "seg.dcm"
    seg.save_as(seg_path)
    assert regions_for_study(study, [*files, seg_path]) == got
    noise = tmp_path / "notes.txt"
    noise.write_text("not DICOM\n")
    assert regions_for_study(study, [noise, seg_path, b"\x00" * 10]) == got  # others passed over
    # scan_folder keeps it with its study; read_study sets it aside; ingest can find it.
    studies, rejections = scan_folder(tmp_path / "ct")
    assert rejections == [] and seg_path in studies[study.study_uid]
    assert annotation_files(studies[study.study_uid]) == [seg_path]
    assert read_file_header(seg_path).annotation == "SEG"
    again = read_study(studies[study.study_uid])
    np.testing.assert_array_equal(again.volume, study.volume)
    assert "SEG annotation, not an image" in again.series_reason


def test_seg_on_jittered_slices_is_placed_frame_by_frame(tmp_path: Path) -> None:
    """Slice positions that jitter by 0.2 mm (the reader accepts them; highdicom's 1 %
    tolerance does not make a volume of them): each frame is placed by its own position."""
    jitter = [0.0, 0.2, -0.2, 0.1, -0.1, 0.2, 0.0, -0.2]

    def edit(ds: Dataset, k: int) -> None:
        _patient_module(ds, k)
        ds.ImagePositionPatient = [-20.0, -20.0, 10.0 + 2.5 * k + jitter[k]]

    files = ct_series(tmp_path / "ct", n=N, rows=ROWS, spacing=(2.5, 0.8, 0.8), edit=edit)
    study = read_study(files)
    mask = np.zeros((N, ROWS, ROWS, 1), dtype=bool)
    mask[2:6, 10:14, 20:25, 0] = True
    seg = _seg(_sorted_sources(files), mask, ["nodule"], "Reader^Bob")
    assert regions_for_study(study, [seg]) == [ReaderRegion("Reader Bob", (2, 10, 20, 6, 14, 25), "nodule")]


def test_seg_reader_never_a_patient_identifier(ct) -> None:
    files, study = ct
    src = _sorted_sources(files)
    mask = np.zeros((N, ROWS, ROWS, 1), dtype=bool)
    mask[1:3, 4:6, 4:6, 0] = True
    seg = _seg(src, mask, ["Doe lesion"], "Doe^Jane")  # the patient's own name
    got = regions_for_study(study, [seg])
    assert got[0].reader == "Reader Lab"  # the Manufacturer fallback
    assert got[0].lesion == "1"  # the label names the patient: its number instead
    other = _seg(src, mask, ["x"], "R^A")
    other.StudyInstanceUID = "1.2.3.4.5"
    assert regions_for_study(study, [other]) == []  # another study's: passed over


# ------------------------------------------------------------------------- RTSTRUCT


def _rtstruct(study_uid: str, rois: list[tuple[str, str, list[np.ndarray]]]) -> Dataset:
    """An RT Structure Set: (name, RTROIInterpretedType, contours (n, 3) mm) per ROI."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PAT-0001"
    ds.PatientName = "Doe^Jane"
    ds.Manufacturer = "Planner Co"
    ds.StructureSetLabel = "RS"
    ref = Dataset()
    ref.FrameOfReferenceUID = FOR_UID
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    ssroi, contours, obs = [], [], []
    for number, (name, kind, polys) in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        item.ReferencedFrameOfReferenceUID = FOR_UID
        ssroi.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        seq = []
        for poly in polys:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(poly)
            c.ContourData = [f"{v:.4f}" for v in poly.reshape(-1)]
            seq.append(c)
        rc.ContourSequence = DicomSequence(seq)
        contours.append(rc)
        o = Dataset()
        o.ObservationNumber = number
        o.ReferencedROINumber = number
        o.RTROIInterpretedType = kind
        obs.append(o)
    ds.StructureSetROISequence = DicomSequence(ssroi)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(obs)
    return ds


def test_rtstruct_contours_in_mm_become_boxes(ct, tmp_path: Path) -> None:
    _, study = ct
    # A square contour around voxels y 10..13, x 20..24 on slices 3 and 4 (volume grid),
    # placed in patient mm through the study's geometry.
    polys = []
    for z in (3, 4):
        corners = np.array([[z, 10, 20], [z, 10, 24], [z, 13, 24], [z, 13, 20]], dtype=float)
        polys.append(voxel_to_patient(study, corners))
    body = [voxel_to_patient(study, np.array([[z, 0, 0], [z, ROWS - 1, ROWS - 1]], float)) for z in range(N)]
    rt = _rtstruct(study.study_uid, [("GTV lesion", "GTV", polys), ("BODY", "EXTERNAL", body)])
    path = tmp_path / "rs.dcm"
    rt.save_as(path, enforce_file_format=True)
    got = regions_for_study(study, [path])
    assert got == [ReaderRegion("Planner Co", (3, 10, 20, 5, 14, 25), "GTV lesion")]
    assert read_file_header(path).annotation == "RTSTRUCT"


def test_bad_annotation_skipped_or_raised(ct) -> None:
    _, study = ct
    far = [np.array([[5000.0, 5000.0, 5000.0], [5001.0, 5001.0, 5000.0], [5001.0, 5000.0, 5000.0]])]
    bad = _rtstruct(study.study_uid, [("lesion", "GTV", far)])
    near = voxel_to_patient(study, np.array([[1, 1, 1], [1, 2, 2]], float))
    good = _rtstruct(study.study_uid, [("lesion", "", [near])])
    with pytest.raises(RegionError) as info:
        regions_for_study(study, [bad, good])
    assert info.value.reason == "outside_study"
    skipped: list[tuple[str, str]] = []
    got = regions_for_study(study, [bad, good], skipped=skipped)
    assert got == [ReaderRegion("Planner Co", (1, 1, 1, 2, 3, 3), "lesion")]
    assert len(skipped) == 1 and "outside" in skipped[0][1]
    moved = _rtstruct(study.study_uid, [("lesion", "GTV", [near])])
    moved.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.77"
    with pytest.raises(RegionError) as info:
        regions_for_study(study, [moved])
    assert info.value.reason == "wrong_frame_of_reference"
