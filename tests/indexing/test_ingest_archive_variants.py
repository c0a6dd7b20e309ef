"""Ingest of studies as real archives hold them: a SEG beside the images is the readers'
regions, not a rejected file; a damaged re-sent copy of an instance does not lose the
study; an ORIGINAL\\SECONDARY series is ingested with the reason saying so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from encoders.deid import Pseudonymizer
from encoders.dicom import annotation_files, scan_folder
from indexing.ingest import ingest_folder
from indexing.store import CohortStore
from tests.encoders.dicom_factory import ct_series

SECRET = b"0123456789abcdef-archive-variants"


def _patient_module(ds: Dataset, k: int) -> None:
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.7"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"


def test_ingest_keeps_annotations_and_survives_damaged_copies(tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    root = tmp_path / "dicom"
    a = ct_series(root / "a", n=6, rows=32, patient_id="PAT-A", edit=_patient_module)

    def secondary(ds: Dataset, k: int) -> None:
        _patient_module(ds, k)
        ds.ImageType = ["ORIGINAL", "SECONDARY", "AXIAL"]

    ct_series(root / "b", n=6, rows=32, patient_id="PAT-B", edit=secondary)
    sources = sorted((pydicom.dcmread(f) for f in a), key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((6, 32, 32, 1), dtype=bool)
    mask[2:4, 10:14, 10:14, 0] = True
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="nodule",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=90,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Reader Lab",
        manufacturer_model_name="Contour",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(root / "a" / "seg.dcm")
    data = a[2].read_bytes()
    (root / "a" / "resent.dcm").write_bytes(data[: len(data) // 2])

    studies, rejected = scan_folder(root)
    assert rejected == []
    (uid_a,) = [u for u, paths in studies.items() if root / "a" / "seg.dcm" in paths]
    assert annotation_files(studies[uid_a]) == [root / "a" / "seg.dcm"]

    store = CohortStore(tmp_path / "store", create=True)
    report = ingest_folder(root, store, pseudonymizer=Pseudonymizer(SECRET), workers=1)
    assert report.studies_ingested == 2 and report.studies_rejected == []
    assert report.files_rejected == []
    reasons = sorted(s["series_reason"] for s in report.studies)
    assert any("SEG annotation, not an image" in r and "ignored 1 damaged" in r for r in reasons)
    assert any("ORIGINAL\\SECONDARY" in r for r in reasons)
    # the SEG's segment is the study's reader region: stored as a detail patch of its own
    assert report.regions_stored == 1 and report.regions_rejected == []
    info = {
        r["study_uid"]: json.loads(r["patch_info"])
        for r in store.patch_table().to_pylist()
    }
    readers = [p for infos in info.values() for p in infos if p.get("source") == "reader"]
    assert len(readers) == 1
