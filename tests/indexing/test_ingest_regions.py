"""Reader regions at ingest: each becomes a stored detail patch, kept per reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from encoders.deid import Pseudonymizer
from encoders.regions import ReaderRegion
from encoders.synth import synth_cohort
from indexing.ingest import ingest_folder
from indexing.store import CohortStore


def test_reader_regions_become_patches_and_bad_ones_are_reported(tmp_path: Path) -> None:
    info = synth_cohort(tmp_path / "synth", patients=2, seed=4)
    with open(info.truth_csv, newline="") as fh:
        truth = list(csv.DictReader(fh))
    t = truth[0]
    c = [int(float(t[k])) for k in ("lesion_slice", "lesion_row", "lesion_col")]
    box = (c[0] - 2, c[1] - 3, c[2] - 3, c[0] + 3, c[1] + 4, c[2] + 4)
    shifted = (box[0], box[1] + 2, box[2], box[3], box[4] + 2, box[5])
    regions = {t["patient_id"]: [ReaderRegion("r1", box), ReaderRegion("r2", shifted),
                                 ReaderRegion("r3", (0, 0, 5000, 4, 4, 5004))]}
    store = CohortStore(tmp_path / "store", create=True)
    pseudo = Pseudonymizer(b"k" * 32)
    report = ingest_folder(info.dicom_dir, store, pseudonymizer=pseudo, workers=1,
                           regions=regions)
    assert report.studies_ingested == 2
    assert report.regions_stored == 2 and report.regions_dropped == 0
    assert [r["reader"] for r in report.regions_rejected] == ["r3"]
    assert "outside the study" in report.regions_rejected[0]["message"]
    table = store.patch_table().to_pylist()
    by_reader = [[p["reader"] for p in json.loads(row["patch_info"]) if p["source"] == "reader"]
                 for row in table]
    assert sorted(by_reader) == [[], ["r1", "r2"]]  # the other patient has proposals only
    assert all(any(p["source"] == "proposal" for p in json.loads(row["patch_info"]))
               for row in table)
    # no raw id is stored anywhere: keys are pseudonyms, the regions' keys stay in memory
    raw = {r["patient_id"] for r in truth}
    for row in store.studies(columns=["patient_id", "patch_info", "grid"]).to_pylist():
        assert not any(r in json.dumps(row) for r in raw)
    # the reader patch holds the lesion at its centre: denser than aerated lung (about
    # -850 HU here; ground glass is -600..-400) and than the patch around it
    uids, patches = store.load_volumes(patches="readers")
    k = next(i for i, row in enumerate(table) if "r1" in row["patch_info"])
    p = patches[[u for u in uids].index(table[k]["study_uid"])]
    d, h, w = p.shape
    core = p[d // 2 - 1 : d // 2 + 1, h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].mean()
    assert core > -700 and core > np.median(p) + 100
