"""Corrupt files are detected by checksum at load, never served.

Every file of a snapshot version (index, id map = metadata, OOD reference, encoder copy,
manifest) and every store Parquet file (study parts, outcomes) is bit-flipped at its first
byte, its last byte and in between, and truncated: loading refuses it with a
``SnapshotError`` / ``StoreError`` naming the file. A server asked to switch to a corrupt
version keeps serving the previous one. ``benchmarks/chaos_storage.py`` flips more offsets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storage_chaos import corruption_offsets, flip_bit, truncate

import indexing.store as store_module
from indexing.durable import sha256_file
from indexing.errors import SnapshotError, StoreError
from indexing.snapshot import (
    MANIFEST_FILE,
    VERSIONS_DIR,
    build_snapshot,
    load_snapshot,
    publish,
)
from indexing.store import CohortStore, StudyRecord
from indexing.versions import manifest_digest

N, D = 40, 8


def _meta(order: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "patient_id": [f"P-{i:04d}" for i in order],
            "study_uid": [f"S-{i:04d}" for i in order],
            "time": [float(i) for i in order],
        }
    )


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("corrupt")
    enc = root / "encoder"
    enc.mkdir()
    (enc / "card.json").write_text(json.dumps({"version": "enc-test"}))
    (enc / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    vecs = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    v1 = build_snapshot(root / "index", vecs, _meta(np.arange(N)), model_version="m", encoder_dir=enc)
    rev = np.arange(N)[::-1]
    v2 = build_snapshot(root / "index", vecs[rev], _meta(rev), model_version="m", encoder_dir=enc)
    return root / "index", v1, v2


def _damages(path: Path) -> list[tuple[str, bytes]]:
    """(label, damaged bytes) for three bit flips and a truncation of ``path``."""
    good = path.read_bytes()
    out = []
    for off in corruption_offsets(len(good), 3):
        flip_bit(path, off, bit=off % 8)
        out.append((f"flip@{off}", path.read_bytes()))
        path.write_bytes(good)
    truncate(path, 0.5)
    out.append(("truncated", path.read_bytes()))
    path.write_bytes(good)
    return out


def test_every_snapshot_file_is_checked(index: tuple[Path, str, str]) -> None:
    index_dir, _v1, v2 = index
    vdir = index_dir / VERSIONS_DIR / v2
    names = [*json.loads((vdir / MANIFEST_FILE).read_text())["files"], MANIFEST_FILE]
    assert {"index.faiss", "metadata.parquet", "ood_reference.npy", "encoder/card.json"} <= set(names)
    tried = 0
    for name in names:
        path = vdir / name
        good = path.read_bytes()
        for label, bad in _damages(path):
            path.write_bytes(bad)
            try:
                with pytest.raises(SnapshotError, match=name.split("/")[-1].replace(".", r"\.")):
                    load_snapshot(index_dir, version=v2, device="cpu")
            except BaseException as exc:
                raise AssertionError(f"{name} {label} was not refused") from exc
            finally:
                path.write_bytes(good)
            tried += 1
    assert tried == 4 * len(names)
    assert load_snapshot(index_dir, version=v2, device="cpu").num_studies == N


def test_server_keeps_the_previous_snapshot(
    index: tuple[Path, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from service.servicer import ServiceState

    index_dir, v1, v2 = index
    publish(index_dir, v1)
    state = ServiceState.load(index_dir, device="cpu")
    assert state.index_version == v1
    path = index_dir / VERSIONS_DIR / v2 / "metadata.parquet"
    good = path.read_bytes()
    try:
        flip_bit(path, len(good) // 2)
        publish(index_dir, v2)  # a broken version becomes CURRENT
        with caplog.at_level(logging.ERROR):
            assert state.refresh() is False
        assert state.index_version == v1  # still serving v1, which still answers
        assert "metadata.parquet" in caplog.text and "still serving" in caplog.text
        q = np.asarray(state.snapshot.vector(0))[None]  # type: ignore[union-attr]
        _sims, rows = state.snapshot.search(q, 3)  # type: ignore[union-attr]
        assert rows[0, 0] == 0
    finally:
        path.write_bytes(good)
        publish(index_dir, v1)
        state.close()


def test_an_id_map_that_does_not_match_its_vectors_is_refused(
    index: tuple[Path, str, str], tmp_path: Path
) -> None:
    import shutil

    index_dir, v1, v2 = index
    work = tmp_path / "index"
    shutil.copytree(index_dir, work)
    vdir = work / VERSIONS_DIR / v2
    # v1's id map (another row order) in v2: the checksum catches it
    shutil.copyfile(work / VERSIONS_DIR / v1 / "metadata.parquet", vdir / "metadata.parquet")
    with pytest.raises(SnapshotError, match=r"metadata\.parquet .*sha256"):
        load_snapshot(work, version=v2, device="cpu")
    # a consistent forgery (checksums recomputed) with shuffled row ids is refused too
    meta = pq.read_table(work / VERSIONS_DIR / v2 / "metadata.parquet")
    meta = meta.set_column(0, "row_id", pa.array(np.roll(np.arange(N), 1)))
    pq.write_table(meta, vdir / "metadata.parquet")
    manifest = json.loads((vdir / MANIFEST_FILE).read_text())
    manifest["files"]["metadata.parquet"] = sha256_file(vdir / "metadata.parquet")
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (vdir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"row_id is not 0\.\.39"):
        load_snapshot(work, version=v2, device="cpu")


def test_every_store_file_is_checked(tmp_path: Path) -> None:
    store = CohortStore(tmp_path / "store", create=True)
    rng = np.random.default_rng(0)
    for batch in range(2):
        store.add_studies(
            [
                StudyRecord(
                    patient_id=f"P-{batch}{i}",
                    study_uid=f"S-{batch}{i}",
                    volume=rng.integers(-1000, 400, size=(2, 8, 8), dtype=np.int16),
                )
                for i in range(3)
            ]
        )
    store.set_outcomes(pa.table({"patient_id": ["P-00", "P-11"], "time": [3.0, 4.0], "grade": ["a", "b"]}))
    files = sorted((tmp_path / "store" / "studies").glob("part-*.parquet"))
    files += sorted((tmp_path / "store").glob("outcomes.*.parquet"))
    assert len(files) == 3
    for path in files:
        good = path.read_bytes()
        for label, bad in _damages(path):
            path.write_bytes(bad)
            store_module._VERIFIED.clear()  # a fresh process: nothing verified yet
            reopened = CohortStore(tmp_path / "store")
            read = reopened.outcomes if path.name.startswith("outcomes") else reopened.studies
            try:
                with pytest.raises(StoreError, match=rf"{path.name[:20]}.*(sha256|checksum)"):
                    read()
            except BaseException as exc:
                raise AssertionError(f"{path.name} {label} was not refused") from exc
            finally:
                path.write_bytes(good)
    store_module._VERIFIED.clear()
    assert len(CohortStore(tmp_path / "store").studies(["study_uid"])) == 6
