from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import StoreError
from indexing.store import OUTCOME_SCHEMA, STUDY_SCHEMA, CohortStore, StudyRecord

SHAPE = (4, 8, 8)


def record(i: int, *, patient: int | None = None, shape: tuple[int, ...] = SHAPE) -> StudyRecord:
    rng = np.random.default_rng(i)
    return StudyRecord(
        patient_id=f"P-{patient if patient is not None else i:016x}",
        study_uid=f"S-{i:024x}",
        volume=rng.integers(-1024, 3000, size=shape, dtype=np.int16),
        spec={"shape": list(shape)},
        site="site-a",
        modality="CT",
        study_day=0,
        manufacturer="GE" if i % 2 else "SIEMENS",
        model="M1",
        kvp="120",
    )


@pytest.fixture
def store(tmp_path: Path) -> CohortStore:
    return CohortStore(tmp_path / "store", create=True)


def test_missing_store_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="run cohortsim ingest first"):
        CohortStore(tmp_path / "nope")


def test_append_is_idempotent_and_keeps_order(store: CohortStore) -> None:
    assert store.add_studies([record(0), record(1)]) == 2
    assert store.add_studies([record(1), record(2), record(2)]) == 1  # dupes skipped
    assert store.add_studies([record(0)]) == 0
    assert store.study_uids() == {record(i).study_uid for i in range(3)}
    table = store.studies()
    assert table.schema == STUDY_SCHEMA
    assert table.column("study_uid").to_pylist() == [record(i).study_uid for i in range(3)]
    assert len(list((store.root / "studies").glob("part-*.parquet"))) == 2
    narrow = store.studies(columns=["study_uid", "kvp"])
    assert narrow.column_names == ["study_uid", "kvp"]
    # reopening finds the same data
    assert CohortStore(store.root).study_uids() == store.study_uids()


def test_volumes_round_trip(store: CohortStore) -> None:
    recs = [record(i) for i in range(5)]
    store.add_studies(recs[:2])
    store.add_studies(recs[2:])
    uids, vols = store.load_volumes()
    assert uids == [r.study_uid for r in recs]
    assert vols.dtype == np.int16 and vols.shape == (5, *SHAPE)
    for r, v in zip(recs, vols, strict=True):
        np.testing.assert_array_equal(v, r.volume)


def test_spooled_volumes_equal_loaded_ones(store: CohortStore, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [record(i, patient=i % 3) for i in range(7)]
    store.add_studies(recs[:4])
    store.add_studies(recs[4:])
    store.delete_patients([recs[1].patient_id])  # withdrawn: skipped by both
    uids, vols = store.load_volumes()
    s_uids, spooled = store.spool_volumes(tmp_path / "v.npy")
    assert isinstance(spooled, np.memmap) and not spooled.flags.writeable
    assert s_uids == uids and len(uids) == 5
    np.testing.assert_array_equal(spooled, vols)
    del spooled

    import shutil

    class Usage:  # a full disk: refused before anything is written
        free = 100

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(StoreError, match=r"needs 0.0 GiB .* has 0.0 GiB free"):
        store.spool_volumes(tmp_path / "w.npy")
    assert not (tmp_path / "w.npy").exists()


def test_volumes_read_while_the_store_changes_are_refused(
    store: CohortStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_studies([record(i) for i in range(4)])
    real = CohortStore.iter_volumes

    def fewer(self: CohortStore, batch_size: int = 64,
              patches: str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        for uids, vols in real(self, batch_size=1):
            if uids[0] != record(2).study_uid:  # withdrawn after the count was taken
                yield uids, vols

    def more(self: CohortStore, batch_size: int = 64,
             patches: str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
        yield from real(self, batch_size=batch_size)
        yield [record(9).study_uid], record(9).volume[None]  # added meanwhile

    for change in (fewer, more):
        monkeypatch.setattr(CohortStore, "iter_volumes", change)
        with pytest.raises(StoreError, match="changed while its 4 volumes were read"):
            store.load_volumes()
        with pytest.raises(StoreError, match="changed while"):
            store.spool_volumes(tmp_path / f"{change.__name__}.npy")


def test_volumes_of_different_shapes_are_refused(store: CohortStore) -> None:
    store.add_studies([record(0), record(1, shape=(2, 8, 8))])
    with pytest.raises(StoreError, match="different shapes"):
        store.load_volumes()


def test_non_int16_volume_is_refused(store: CohortStore) -> None:
    bad = record(0)
    bad.volume = bad.volume.astype(np.float32)
    with pytest.raises(StoreError, match="int16"):
        store.add_studies([bad])


def outcome_table(rows: list[tuple[str, float | None, bool | None, dict, dict]]) -> pa.Table:
    return pa.table(
        {
            "patient_id": [r[0] for r in rows],
            "time": pa.array([r[1] for r in rows], pa.float64()),
            "event": pa.array([r[2] for r in rows], pa.bool_()),
            "labels": pa.array(
                [list(r[3].items()) for r in rows], OUTCOME_SCHEMA.field("labels").type
            ),
            "values": pa.array(
                [list(r[4].items()) for r in rows], OUTCOME_SCHEMA.field("values").type
            ),
        }
    )


def test_outcome_upsert(store: CohortStore) -> None:
    p = [record(i).patient_id for i in range(3)]
    assert (
        store.set_outcomes(
            outcome_table(
                [(p[0], 10.0, True, {"hist": "a"}, {}), (p[1], 5.0, False, {}, {"size": 2.0})]
            )
        )
        == 2
    )
    assert (
        store.set_outcomes(
            outcome_table([(p[1], 7.5, True, {}, {}), (p[2], None, None, {"hist": "b"}, {})])
        )
        == 2
    )
    out = {r["patient_id"]: r for r in store.outcomes().to_pylist()}
    assert set(out) == set(p)
    assert out[p[0]]["time"] == 10.0 and out[p[0]]["labels"] == [("hist", "a")]
    assert out[p[1]]["time"] == 7.5 and out[p[1]]["event"] is True and out[p[1]]["values"] == []
    assert out[p[2]]["time"] is None
    assert store.outcomes().schema == OUTCOME_SCHEMA


def test_outcomes_fold_extra_columns_and_validate(store: CohortStore) -> None:
    table = pa.table(
        {
            "patient_id": ["P-1", "P-2"],
            "time": [1, 2],
            "event": [1, 0],
            "histology": ["adeno", None],
            "suv": [3.5, None],
        }
    )
    store.set_outcomes(table)
    rows = {r["patient_id"]: r for r in store.outcomes().to_pylist()}
    assert rows["P-1"]["event"] is True and rows["P-2"]["event"] is False
    assert rows["P-1"]["labels"] == [("histology", "adeno")]
    assert rows["P-1"]["values"] == [("suv", 3.5)] and rows["P-2"]["values"] == []
    with pytest.raises(StoreError, match="repeats"):
        store.set_outcomes(pa.table({"patient_id": ["P-1", "P-1"]}))
    with pytest.raises(StoreError, match="time"):
        store.set_outcomes(pa.table({"patient_id": ["P-3"], "time": [-1.0]}))


def test_cohort_table_left_join(store: CohortStore) -> None:
    store.add_studies([record(0), record(1, patient=0), record(2)])  # P-0 has two studies
    pid0, pid2 = record(0).patient_id, record(2).patient_id
    store.set_outcomes(outcome_table([(pid0, 12.0, True, {"hist": "a"}, {"size": 1.5})]))
    table = store.cohort_table()
    assert "volume" not in table.column_names and "volume_shape" not in table.column_names
    assert table.column("study_uid").to_pylist() == [record(i).study_uid for i in range(3)]
    rows = table.to_pylist()
    assert [r["patient_id"] for r in rows] == [pid0, pid0, pid2]
    assert rows[0]["time"] == rows[1]["time"] == 12.0
    assert rows[0]["labels"] == [("hist", "a")]
    assert rows[2]["time"] is None and rows[2]["event"] is None and rows[2]["labels"] is None


def test_writes_are_atomic_and_versioned(store: CohortStore) -> None:
    v0 = store.store_version()
    store.add_studies([record(0)])
    v1 = store.store_version()
    store.set_outcomes(outcome_table([(record(0).patient_id, 1.0, True, {}, {})]))
    v2 = store.store_version()
    assert len({v0, v1, v2}) == 3
    leftovers = [p.name for p in store.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert store.store_version() == v2  # stable while nothing changes


def test_empty_store(store: CohortStore) -> None:
    assert store.study_uids() == set()
    assert store.cohort_table().num_rows == 0
    with pytest.raises(StoreError, match="no studies"):
        store.load_volumes()
