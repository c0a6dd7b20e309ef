"""Store format 2: detail patches stored per study, and older stores refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import StoreError, StoreFormatError
from indexing.store import STORE_FORMAT, CohortStore, StudyRecord, primary_patch

SHAPE = (4, 8, 8)
PATCH = (2, 4, 4)


def _record(i: int, *, readers: int = 0) -> StudyRecord:
    rng = np.random.default_rng(i)
    info = [{"source": "reader", "reader": f"r{k}", "rank": 0, "score": 0.0,
             "centre_mm": [1.0, 2.0, 3.0], "lesion": ""} for k in range(readers)]
    info += [{"source": "proposal", "reader": "", "rank": k, "score": 9.0 - k,
              "centre_mm": [4.0, 5.0, float(k)], "lesion": ""} for k in range(2)]
    patches = np.stack([np.full(PATCH, 100 * i + k, dtype=np.int16) for k in range(len(info))])
    return StudyRecord(
        patient_id=f"P-{i:016x}", study_uid=f"S-{i:024x}",
        volume=rng.integers(-1000, 1000, SHAPE).astype(np.int16), spec={"fit": "extent"},
        grid={"spacing_mm": [5.0, 3.0, 3.0]}, patches=patches, patch_info=info,
    )


def test_patches_round_trip_and_primary_choice(tmp_path: Path) -> None:
    store = CohortStore(tmp_path / "s", create=True)
    assert store.store_format() == STORE_FORMAT
    store.add_studies([_record(1, readers=2), _record(2)])
    uids, ctx = store.load_volumes()
    assert ctx.shape == (2, *SHAPE)
    _, by_readers = store.load_volumes(patches="readers")
    _, by_proposals = store.load_volumes(patches="proposals")
    # study 1: patch 0 is the first reader's; proposals start at index 2. Study 2: no reader
    assert by_readers[0].flat[0] == 100 and by_proposals[0].flat[0] == 102
    assert by_readers[1].flat[0] == 200 and by_proposals[1].flat[0] == 200
    spooled_uids, spooled = store.spool_volumes(tmp_path / "p.npy", patches="readers")
    assert spooled_uids == uids
    np.testing.assert_array_equal(spooled, by_readers)
    table = store.patch_table()
    assert table.num_rows == 2 and table["patch_info"][0].as_py().count("reader") >= 2
    with pytest.raises(StoreError, match="patches must be one of"):
        store.load_volumes(patches="best")
    assert primary_patch([{"source": "proposal", "rank": 1}, {"source": "proposal", "rank": 0}],
                         "readers") == 1


def test_studies_without_patches_are_refused_for_patch_reads(tmp_path: Path) -> None:
    store = CohortStore(tmp_path / "s", create=True)
    rec = _record(3)
    rec.patches, rec.patch_info = None, None
    store.add_studies([rec])
    assert store.load_volumes()[1].shape == (1, *SHAPE)
    with pytest.raises(StoreError, match="no detail patches"):
        store.load_volumes(patches="readers")


def test_format_1_store_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    store = CohortStore(tmp_path / "s", create=True)
    store.add_studies([_record(4)])
    store.set_outcomes(pa.table({"patient_id": [f"P-{4:016x}"], "time": [3.0], "event": [True]}))
    (tmp_path / "s" / "FORMAT").unlink()  # as a store written before formats were numbered
    old = CohortStore(tmp_path / "s")
    assert old.store_format() == 1
    for read in (old.load_volumes, lambda: next(old.iter_volumes()),
                 lambda: old.add_studies([_record(5)])):
        with pytest.raises(StoreFormatError) as err:
            read()
        assert "cohortsim ingest" in str(err.value) and err.value.reason == "store_format"
    # what does not need the volumes keeps working: outcomes, deletions
    assert old.outcomes().num_rows == 1
    assert old.delete_patients([f"P-{4:016x}"]) == 1
    (tmp_path / "s" / "FORMAT").write_text("99\n")
    with pytest.raises(StoreFormatError, match="newer"):
        CohortStore(tmp_path / "s").load_volumes()
