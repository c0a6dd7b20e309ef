"""The CLI's index and cohort maintenance: list, rollback, prune, delete, outcomes, compact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from encoders.deid import Pseudonymizer
from indexing.snapshot import build_snapshot, current_version, list_versions, load_snapshot
from indexing.store import CohortStore, StudyRecord
from indexing.tombstones import TOMBSTONE_FILE, read_tombstones
from service.cli import app

SECRET = "cli-index-test-secret-0123456789"
runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), env={"COHORTSIM_SITE_SECRET": SECRET})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, " ".join(res.stderr.split())  # rich wraps long lines


@pytest.fixture
def cohort(tmp_path: Path) -> dict[str, Path]:
    """A store of 6 studies (raw ids raw0..raw5) and an index built from its cohort table."""
    pseudo = Pseudonymizer(SECRET.encode())
    store = CohortStore(tmp_path / "store", create=True)
    store.add_studies(
        [
            StudyRecord(
                patient_id=pseudo.patient(f"raw{i}"),
                study_uid=pseudo.study(f"1.2.{i}"),
                volume=np.zeros((2, 4, 4), dtype=np.int16),
                spec={"shape": [2, 4, 4]},
                site="north",
            )
            for i in range(6)
        ]
    )
    table = store.cohort_table()
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    build_snapshot(tmp_path / "index", x, table, model_version="m")
    return {"root": tmp_path, "store": tmp_path / "store", "index": tmp_path / "index"}


def test_list_rollback_prune(cohort: dict[str, Path]) -> None:
    index = cohort["index"]
    x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    table = CohortStore(cohort["store"]).cohort_table()
    versions = [current_version(index)] + [
        build_snapshot(index, x, table, model_version=f"m{i}") for i in range(2)
    ]
    code, out, _ = cli("index", "list", str(index))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith(f"* {versions[-1]}") and "Flat" in lines[-1]
    code, out, _ = cli("index", "list", str(index), "--json")
    rows = json.loads(out)
    assert [r["version"] for r in rows] == versions and rows[-1]["current"] is True
    code, _, err = cli("index", "rollback", str(index), versions[0])
    assert code == 0 and current_version(index) == versions[0]
    code, _, err = cli("index", "rollback", str(index), "v-none")
    assert code == 2 and err.startswith("cohortsim: error:") and "not found" in err
    code, _, err = cli("index", "prune", str(index), "--keep", "1")
    assert code == 0 and "removed 1" in err
    assert list_versions(index) == [versions[0], versions[2]]  # served + newest


def test_delete_by_raw_id_and_pseudonym(cohort: dict[str, Path]) -> None:
    pseudo = Pseudonymizer(SECRET.encode())
    index, store = cohort["index"], cohort["store"]
    code, out, err = cli(
        "delete", "--patient", "raw1", "--patient", pseudo.patient("raw2"),
        "--store", str(store), "--index", str(index),
    )
    assert code == 0, err
    gone = {pseudo.patient("raw1"), pseudo.patient("raw2")}
    assert set(out.split()) == gone and "raw1" not in out + err  # raw ids are never echoed
    assert read_tombstones(index / TOMBSTONE_FILE) == gone
    assert CohortStore(store).deleted_patients() == gone
    snap = load_snapshot(index, device="cpu")
    _, rows = snap.search(np.asarray(snap.vectors[:1]), 6)
    pids = {snap.metadata.column("patient_id")[int(r)].as_py() for r in rows[0] if r >= 0}
    assert not pids & gone and len(pids) == 4
    # physically removed by compaction
    code, _, err = cli("compact", "--store", str(store), "--index", str(index))
    assert code == 0, err
    assert "2 studies" in err and "published compacted version" in err
    assert load_snapshot(index, device="cpu").num_studies == 4
    code, _, err = cli("delete", "--patient", "x")
    assert code == 2 and "--store and/or --index" in err
    code, _, err = cli("delete", "--patient", "x", "--index", str(store))
    assert code == 2 and "not an index folder" in err


def test_outcomes_update_publishes_a_new_version(cohort: dict[str, Path]) -> None:
    index, store = cohort["index"], cohort["store"]
    before = current_version(index)
    csv = cohort["root"] / "outcomes.csv"
    csv.write_text("patient_id,time,event,stage\nraw3,17.5,1,III\n")
    code, _, err = cli("outcomes", str(csv), "--store", str(store), "--index", str(index))
    assert code == 0, err
    after = load_snapshot(index, device="cpu")
    assert after.version != before and after.manifest["derived_from"] == before
    pid = Pseudonymizer(SECRET.encode()).patient("raw3")
    row = after.metadata.column("patient_id").to_pylist().index(pid)
    assert after.metadata.column("time")[row].as_py() == 17.5
    assert dict(after.metadata.column("labels")[row].as_py()) == {"stage": "III"}


def test_build_from_embeddings_fp16_and_keep(cohort: dict[str, Path]) -> None:
    root = cohort["root"]
    n, d = 40, 8
    x = np.random.default_rng(3).normal(size=(n, d)).astype(np.float32)
    emb = pa.table(
        {
            "patient_id": [f"P-{i:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "embedding": pa.array(x.tolist(), pa.list_(pa.float32())),
        }
    )
    pq.write_table(emb, root / "emb.parquet")
    out = root / "idx"
    for _ in range(3):
        code, _, err = cli(
            "index", "build", "--embeddings", str(root / "emb.parquet"), "--out", str(out),
            "--fp16", "--keep", "2",
        )
        assert code == 0, err
    assert len(list_versions(out)) == 2 and "pruned 1" in err
    assert "NO_PROGNOSTIC_SKILL" in err and "FEW_OUTCOMES" in err  # 40 studies, no outcomes
    snap = load_snapshot(out, device="cpu")
    assert snap.manifest["index_kind"] == "SQfp16" and snap.vectors.dtype == np.float16
    code, _, err = cli("index", "build", "--embeddings", str(root / "emb.parquet"), "--out", str(out),
                       "--kind", "IVF4,PQ8", "--fp16")
    assert code == 2 and "no fp16 variant" in err
