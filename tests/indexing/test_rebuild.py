"""Batch rebuilds: checkpointed shards that resume, outcome updates without re-embedding,
rollback and pruning, fp16 storage and per-query search parameters."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import indexing.build as build
import indexing.snapshot as snapshot
from encoders.model import EncoderCard, create_encoder, save_encoder
from encoders.spec import InputSpec
from indexing.errors import QueryError, SnapshotError, StoreError
from indexing.exact import recall_at_k
from indexing.snapshot import (
    SearchParams,
    build_snapshot,
    current_version,
    fp16_kind,
    is_lossy_kind,
    list_versions,
    load_snapshot,
    prune_versions,
    rollback,
)
from indexing.store import CohortStore, StudyRecord

SPEC = InputSpec(shape=(4, 32, 32))
N_STUDIES = 22


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rebuild")
    store = CohortStore(root / "store", create=True)
    rng = np.random.default_rng(0)
    store.add_studies(
        [
            StudyRecord(
                patient_id=f"P-{i:016x}",
                study_uid=f"S-{i:024x}",
                volume=rng.integers(-1000, 400, size=SPEC.shape, dtype=np.int16),
                spec=SPEC,
                site="north" if i % 2 else "south",
                manufacturer="GE",
            )
            for i in range(N_STUDIES)
        ]
    )
    store.set_outcomes(
        pa.table({"patient_id": [f"P-{i:016x}" for i in range(N_STUDIES)], "time": [1.0] * N_STUDIES})
    )
    encoder = create_encoder("test_resnet", spec=SPEC, embedding_dim=8)
    save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    return {"root": root, "store": root / "store", "model": root / "model"}


class Killed(Exception):
    pass


def test_killed_build_resumes_from_checkpoints(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "index"
    embedded: list[int] = []
    real_embed = build.embed

    def counting_embed(encoder, volumes, **kw):  # type: ignore[no-untyped-def]
        embedded.append(len(volumes))
        return real_embed(encoder, volumes, **kw)

    monkeypatch.setattr(build, "embed", counting_embed)

    def kill_after_12(stage: str, done: int, total: int) -> None:
        if stage == "embed" and done >= 12:
            raise Killed

    with pytest.raises(Killed):
        build.build_from_store(
            setup["store"], setup["model"], index, shard_size=5, batch_size=5, progress=kill_after_12
        )
    assert list_versions(index) == []  # nothing published
    shards = sorted((index / build.BUILD_DIR).rglob("shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-000000.parquet", "shard-000001.parquet"]
    embedded.clear()
    stages: set[str] = set()
    version = build.build_from_store(
        setup["store"],
        setup["model"],
        index,
        shard_size=5,
        batch_size=5,
        progress=lambda s, d, t: stages.add(s),
    )
    assert sum(embedded) == N_STUDIES - 10  # the two finished shards were not embedded again
    assert {"embed", "add", "checksum", "publish"} <= stages
    assert not (index / build.BUILD_DIR).exists()  # checkpoints go once published
    resumed = load_snapshot(index, device="cpu")
    assert resumed.version == version and resumed.num_studies == N_STUDIES
    assert resumed.metadata.column("thumbnail").null_count == 0
    # the same vectors as an uninterrupted build
    fresh = tmp_path / "fresh"
    build.build_from_store(setup["store"], setup["model"], fresh, shard_size=7)
    np.testing.assert_allclose(
        np.asarray(load_snapshot(fresh, device="cpu").vectors), np.asarray(resumed.vectors), atol=1e-5
    )


def test_one_build_at_a_time(tmp_path: Path) -> None:
    with (
        build._job_lock(tmp_path / "job"),
        pytest.raises(StoreError, match="another index build"),
        build._job_lock(tmp_path / "job"),
    ):
        pass


def test_outcome_update_without_reembedding(setup: dict[str, Path], tmp_path: Path) -> None:
    index = tmp_path / "index"
    first = build.build_from_store(setup["store"], setup["model"], index)
    store = CohortStore(setup["store"])
    before = load_snapshot(index, device="cpu")
    store.set_outcomes(pa.table({"patient_id": ["P-0000000000000003"], "time": [42.0], "event": [True]}))
    try:
        second = build.update_outcomes(index, store)
    finally:
        store.set_outcomes(pa.table({"patient_id": ["P-0000000000000003"], "time": [1.0]}))
    after = load_snapshot(index, device="cpu")
    assert after.version == second != first and after.manifest["derived_from"] == first
    row = after.row_of_study(f"S-{3:024x}")
    assert after.metadata.column("time")[row].as_py() == 42.0
    assert after.metadata.column("event")[row].as_py() is True
    np.testing.assert_array_equal(np.asarray(after.vectors), np.asarray(before.vectors))
    a = index / "versions" / first / "index.faiss"
    b = index / "versions" / second / "index.faiss"
    assert os.stat(a).st_ino == os.stat(b).st_ino  # shared, not copied
    assert after.manifest["files"]["index.faiss"] == before.manifest["files"]["index.faiss"]
    assert after.manifest["files"]["metadata.parquet"] != before.manifest["files"]["metadata.parquet"]


def make(n: int = 400, d: int = 16, seed: int = 0) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    x = (centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    meta = pa.table(
        {"patient_id": [f"P-{i:016x}" for i in range(n)], "study_uid": [f"S-{i:024x}" for i in range(n)]}
    )
    return x, meta


def test_rollback_and_prune(tmp_path: Path) -> None:
    x, meta = make()
    versions = [build_snapshot(tmp_path, x, meta, model_version=f"m{i}") for i in range(4)]
    assert list_versions(tmp_path) == versions and current_version(tmp_path) == versions[-1]
    rollback(tmp_path, versions[0])
    assert load_snapshot(tmp_path, device="cpu").model_version == "m0"
    with pytest.raises(SnapshotError, match="not found"):
        rollback(tmp_path, "v0-nope")
    # a corrupt version is never rolled to
    (tmp_path / "versions" / versions[1] / "metadata.parquet").write_bytes(b"junk")
    with pytest.raises(SnapshotError, match="checksum"):
        rollback(tmp_path, versions[1])
    assert current_version(tmp_path) == versions[0]
    stale = tmp_path / "versions" / ".tmp-v1-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    removed = prune_versions(tmp_path, keep=2)
    assert removed == [versions[1]]  # the served one (versions[0]) and the newest two stay
    assert list_versions(tmp_path) == [versions[0], *versions[2:]]
    assert not stale.exists()
    with pytest.raises(SnapshotError, match="keep"):
        prune_versions(tmp_path, keep=0)


def test_kind_helpers() -> None:
    assert fp16_kind("Flat") == "SQfp16"
    assert fp16_kind("IVF64,Flat") == "IVF64,SQfp16"
    assert fp16_kind("HNSW32") == "HNSW32,SQfp16"
    with pytest.raises(SnapshotError, match="fp16"):
        fp16_kind("IVF64,PQ8")
    lossy = {k: is_lossy_kind(k) for k in ("Flat", "SQfp16", "HNSW32", "IVF64,Flat", "IVF64,PQ8",
                                            "HNSW32_SQ8", "SQ8", "OPQ8,IVF64,PQ8", "PCA8,Flat")}
    assert [k for k, v in lossy.items() if v] == ["IVF64,PQ8", "HNSW32_SQ8", "SQ8", "OPQ8,IVF64,PQ8", "PCA8,Flat"]


def test_fp16_storage_halves_the_vectors(tmp_path: Path) -> None:
    x, meta = make()
    build_snapshot(tmp_path / "f32", x, meta, model_version="m")
    build_snapshot(tmp_path / "f16", x, meta, model_version="m", kind="SQfp16")
    f32, f16 = load_snapshot(tmp_path / "f32", device="cpu"), load_snapshot(tmp_path / "f16", device="cpu")
    assert f16.vectors.dtype == np.float16 and f16.backend == "blas"
    assert f16.vectors.nbytes * 2 == f32.vectors.nbytes
    size = {k: (tmp_path / k / "versions").stat() and sum(
        p.stat().st_size for p in (tmp_path / k).rglob("index.faiss")) for k in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]
    q = f32.vectors[:20]
    s32, r32 = f32.search(q, 10)
    s16, r16 = f16.search(q, 10)
    assert np.mean(r32 == r16) > 0.95
    np.testing.assert_allclose(s16, s32, atol=2e-3)


def test_per_query_search_params(tmp_path: Path) -> None:
    x, meta = make(n=2000)
    build_snapshot(tmp_path / "ivf", x, meta, model_version="m", kind="IVF32,Flat")
    build_snapshot(tmp_path / "hnsw", x, meta, model_version="m", kind="HNSW8")
    build_snapshot(tmp_path / "flat", x, meta, model_version="m")
    ivf = load_snapshot(tmp_path / "ivf", device="cpu")
    hnsw = load_snapshot(tmp_path / "hnsw", device="cpu")
    flat = load_snapshot(tmp_path / "flat", device="cpu")
    assert ivf.manifest["search_params"]["nprobe"] >= 1
    assert hnsw.manifest["search_params"]["efSearch"] == snapshot.HNSW_EF_SEARCH
    rng = np.random.default_rng(1)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, ref = flat.search(q, 10)

    low = recall_at_k(ref, ivf.search(q, 10, params=SearchParams(nprobe=1))[1])
    full = recall_at_k(ref, ivf.search(q, 10, params=SearchParams(nprobe=32))[1])
    assert full == 1.0 and low < full
    assert ivf._ivf.nprobe == ivf.manifest["search_params"]["nprobe"]  # the default is untouched
    low = recall_at_k(ref, hnsw.search(q, 10, params=SearchParams(ef_search=1))[1])
    high = recall_at_k(ref, hnsw.search(q, 10, params=SearchParams(ef_search=400))[1])
    assert high >= 0.99 and low < high
    with pytest.raises(QueryError, match="between 1 and 32"):
        ivf.search(q, 10, params=SearchParams(nprobe=33))
    with pytest.raises(QueryError, match="HNSW"):
        ivf.search(q, 10, params=SearchParams(ef_search=10))
    with pytest.raises(QueryError, match="IVF"):
        hnsw.search(q, 10, params=SearchParams(nprobe=3))
    with pytest.raises(QueryError, match="exact"):
        flat.search(q, 10, params=SearchParams(nprobe=3))


def test_pq_is_reranked_with_exact_similarities(tmp_path: Path) -> None:
    x, meta = make(n=3000, d=16)
    build_snapshot(tmp_path, x, meta, model_version="m", kind="IVF16,PQ4x4")
    snap = load_snapshot(tmp_path, device="cpu")
    assert snap.rerank == snapshot.RERANK_FACTOR and snap.manifest["vectors"] == "embeddings.npy"
    q = snap.vectors[:30]
    sims, rows = snap.search(q, 5)
    exact = np.einsum("md,mkd->mk", q, np.asarray(snap.vectors)[rows])
    np.testing.assert_allclose(sims, exact, atol=1e-5)  # true cosine, not PQ estimates
    raw_sims, raw_rows = snap.search(q, 5, params=SearchParams(rerank=0))
    assert not np.allclose(raw_sims, sims, atol=1e-3)  # PQ's own estimates differ
    v = np.asarray(snap.vectors)
    truth = np.argsort(-(q @ v.T), axis=1)[:, :5]
    assert recall_at_k(truth, rows) > recall_at_k(truth, raw_rows)
