"""Withdrawn patients: hidden at once (tombstones), removed physically at compaction/rebuild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.build import compact_index
from indexing.errors import StoreError, UnknownStudyError
from indexing.query import search_similar
from indexing.snapshot import build_snapshot, load_snapshot
from indexing.store import CohortStore, StudyRecord
from indexing.tombstones import TOMBSTONE_FILE, TombstoneWatch, add_tombstones, read_tombstones

SHAPE = (2, 4, 4)


def record(i: int, patient: int) -> StudyRecord:
    return StudyRecord(
        patient_id=f"P-{patient:016x}",
        study_uid=f"S-{i:024x}",
        volume=np.full(SHAPE, i, dtype=np.int16),
        spec={"shape": list(SHAPE)},
        site="north",
    )


def test_tombstone_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / TOMBSTONE_FILE
    watch = TombstoneWatch(path)
    assert watch.current() == (None, frozenset())
    assert add_tombstones(path, ["P-a", "P-b", "P-a"]) == 2
    assert add_tombstones(path, ["P-b"]) == 0
    assert read_tombstones(path) == {"P-a", "P-b"}
    sig, ids = watch.current()
    assert ids == {"P-a", "P-b"} and sig is not None
    assert watch.current()[0] == sig  # unchanged file: cached
    add_tombstones(path, ["P-c"])
    assert watch.current()[1] == {"P-a", "P-b", "P-c"}
    with pytest.raises(StoreError, match="empty"):
        add_tombstones(path, [""])


def test_store_hides_then_compacts(tmp_path: Path) -> None:
    store = CohortStore(tmp_path / "s", create=True)
    store.add_studies([record(0, 0), record(1, 1), record(2, 1)])
    store.add_studies([record(3, 2)])
    store.set_outcomes(pa.table({"patient_id": ["P-0000000000000001", "P-0000000000000002"], "time": [3.0, 4.0]}))
    version = store.store_version()
    assert store.delete_patients(["P-0000000000000001"]) == 1
    assert store.store_version() != version
    # hidden from every read at once
    assert store.study_uids() == {record(0, 0).study_uid, record(3, 2).study_uid}
    assert store.cohort_table().num_rows == 2
    uids, vols = store.load_volumes()
    assert uids == [record(0, 0).study_uid, record(3, 2).study_uid]
    assert vols[:, 0, 0, 0].tolist() == [0, 3]
    assert store.outcomes().column("patient_id").to_pylist() == ["P-0000000000000002"]
    assert [u for b, _ in store.iter_volumes(batch_size=1) for u in b] == uids
    # a re-ingest cannot bring the patient back
    assert store.add_studies([record(1, 1), record(9, 1)]) == 0
    # but the bytes are still on disk until compaction
    raw = b"".join(p.read_bytes() for p in (store.root / "studies").glob("part-*.parquet"))
    assert b"P-0000000000000001" in raw
    report = store.compact()
    assert report == {"studies_removed": 2, "outcomes_removed": 1, "parts_rewritten": 1}
    raw = b"".join(p.read_bytes() for p in (store.root / "studies").glob("part-*.parquet"))
    assert b"P-0000000000000001" not in raw
    raw = b"".join(p.read_bytes() for p in store.root.glob("outcomes*.parquet"))  # named by sha256
    assert b"P-0000000000000001" not in raw
    assert store.study_uids() == set(uids) and store.load_volumes()[0] == uids
    assert store.compact()["studies_removed"] == 0
    store.delete_patients(["P-0000000000000000", "P-0000000000000002"])
    store.compact()
    assert list((store.root / "studies").glob("part-*.parquet")) == []
    with pytest.raises(StoreError, match="no studies"):
        store.load_volumes()


N, D = 300, 16


def cohort() -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    meta = pa.table(
        {
            "patient_id": [f"P-{i // 3:016x}" for i in range(N)],  # three studies each
            "study_uid": [f"S-{i:024x}" for i in range(N)],
            "site": ["north" if i % 2 else "south" for i in range(N)],
            "time": [float(i) for i in range(N)],
            "event": [bool(i % 2) for i in range(N)],
        }
    )
    return x, meta


@pytest.mark.parametrize("kind", ["Flat", "HNSW16", "IVF8,Flat"])
def test_served_snapshot_drops_deleted_rows_on_the_next_call(tmp_path: Path, kind: str) -> None:
    x, meta = cohort()
    build_snapshot(tmp_path, x, meta, model_version="m", kind=kind)
    snap = load_snapshot(tmp_path, device="cpu")
    q = x[:3] / np.linalg.norm(x[:3], axis=1, keepdims=True)
    _, rows = snap.search(q, 5)
    assert {0, 1, 2} <= set(rows[:, 0].tolist())  # each finds itself first
    add_tombstones(tmp_path / TOMBSTONE_FILE, ["P-0000000000000000"])  # rows 0, 1, 2
    _, rows = snap.search(q, N)  # the same loaded snapshot, no reload
    assert not ({0, 1, 2} & set(rows.ravel().tolist()))
    assert (rows >= 0).sum(axis=1).tolist() == [N - 3] * 3
    _, rows = snap.search(q, 5, where="site = 'north'")
    assert not ({0, 1, 2} & set(rows.ravel().tolist()))
    with pytest.raises(UnknownStudyError):
        snap.row_of_study("S-" + "0" * 24)
    assert snap.rows_of_patient("P-0000000000000000") == []
    assert snap.deleted_rows() == {0, 1, 2}
    results = search_similar(snap, q, 10)
    assert all(nb.patient_id != "P-0000000000000000" for r in results for nb in r.neighbors)


def test_rebuild_and_compaction_remove_rows(tmp_path: Path) -> None:
    x, meta = cohort()
    old = build_snapshot(tmp_path, x, meta, model_version="m", extra_manifest={"time_unit": "days"})
    assert compact_index(tmp_path) is None  # nothing deleted yet
    add_tombstones(tmp_path / TOMBSTONE_FILE, ["P-0000000000000001", "P-0000000000000002"])
    new = compact_index(tmp_path)
    assert new is not None and new != old
    snap = load_snapshot(tmp_path, device="cpu")
    assert snap.version == new and snap.num_studies == N - 6
    assert snap.manifest["deleted_patients_dropped"] == 6
    assert snap.manifest["time_unit"] == "days"  # extra manifest entries survive
    pids = set(snap.metadata.column("patient_id").to_pylist())
    assert "P-0000000000000001" not in pids and "P-0000000000000002" not in pids
    raw = (tmp_path / "versions" / new / "metadata.parquet").read_bytes()
    assert b"P-0000000000000001" not in raw
    # the vectors of the others are unchanged (no re-embedding)
    row = snap.row_of_study(f"S-{10:024x}")
    np.testing.assert_allclose(snap.vector(row), x[10] / np.linalg.norm(x[10]), atol=1e-6)
    # a plain rebuild from embeddings also leaves them out
    build_snapshot(tmp_path, x, meta, model_version="m")
    assert load_snapshot(tmp_path, device="cpu").num_studies == N - 6
