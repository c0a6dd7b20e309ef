from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import DimensionError, SnapshotError, UnknownStudyError
from indexing.exact import recall_at_k
from indexing.snapshot import (
    CURRENT_FILE,
    OOD_SAMPLE,
    build_snapshot,
    current_version,
    list_versions,
    load_snapshot,
)

N, D = 500, 32


def make_data(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    meta = pa.table(
        {
            "patient_id": [f"P-{i:04d}" for i in range(n)],
            "study_uid": [f"S-{i:04d}" for i in range(n)],
            "site": ["a"] * n,
        }
    )
    return x, meta


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, str]:
    root = tmp_path_factory.mktemp("flat")
    x, meta = make_data()
    version = build_snapshot(root, x, meta, model_version="enc-test", store_version="abc")
    return root, x, version


def test_build_and_load(flat: tuple[Path, np.ndarray, str]) -> None:
    root, _, version = flat
    snap = load_snapshot(root, device="cpu")
    assert snap.version == version == current_version(root)
    assert (snap.num_studies, snap.dimension, snap.gpu) == (N, D, False)
    info = snap.info()
    assert info["metric"] == "cosine" and info["index_kind"] == "Flat"
    assert info["model_version"] == "enc-test" and info["index_version"] == version
    assert set(info) == {
        "num_studies",
        "dimension",
        "metric",
        "index_kind",
        "model_version",
        "index_version",
        "gpu",
        "created_at",
        "search_backend",
    }
    assert info["search_backend"] == "blas"
    m = snap.manifest
    assert m["store_version"] == "abc" and m["faiss_version"]
    assert {"index.faiss", "metadata.parquet", "ood_reference.npy"} <= set(m["files"])
    # Flat keeps its vectors only inside index.faiss: no second copy on disk or in memory
    assert "embeddings.npy" not in m["files"] and m["vectors"] == "index"
    assert snap.metadata.column("row_id").to_pylist() == list(range(N))
    assert snap.encoder_dir is None
    assert version.startswith("v") and len(version) == len("v20250101000000-abcdef")


def test_flat_equals_brute_force(flat: tuple[Path, np.ndarray, str]) -> None:
    root, x, _ = flat
    snap = load_snapshot(root, device="cpu")
    q = unit(np.random.default_rng(1).normal(size=(20, D)).astype(np.float32))
    sims, rows = snap.search(q, 10)
    exact = q.astype(np.float64) @ unit(x.astype(np.float64)).T
    want = np.argsort(-exact, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(sims, np.take_along_axis(exact, want, axis=1), atol=1e-5)
    assert sims.dtype == np.float32 and rows.dtype == np.int64


def test_k_larger_than_cohort_pads(tmp_path: Path) -> None:
    x, meta = make_data(n=5)
    build_snapshot(tmp_path, x, meta, model_version="m")
    snap = load_snapshot(tmp_path, device="cpu")
    sims, rows = snap.search(unit(x[:1]), 8)
    assert (rows[0, :5] >= 0).all() and (rows[0, 5:] == -1).all()
    assert np.isneginf(sims[0, 5:]).all()


def test_vector_and_row_of_study(flat: tuple[Path, np.ndarray, str]) -> None:
    root, x, _ = flat
    snap = load_snapshot(root, device="cpu")
    row = snap.row_of_study("S-0123")
    assert row == 123
    np.testing.assert_allclose(snap.vector(row), unit(x)[123], atol=1e-6)
    with pytest.raises(UnknownStudyError):
        snap.row_of_study("S-nope")
    with pytest.raises(UnknownStudyError):
        snap.vector(N)


def test_ood_reference(flat: tuple[Path, np.ndarray, str]) -> None:
    root, x, _ = flat
    snap = load_snapshot(root, device="cpu")
    ref = snap.ood_reference
    assert ref.shape == (min(N, OOD_SAMPLE),)
    assert np.all(np.diff(ref) >= 0)
    assert snap.manifest["k_ood"] == 10 and len(snap.manifest["ood_reference"]) == N
    # leave-one-out: member 0's mean similarity to its 10 nearest others
    u = unit(x.astype(np.float64))
    s = u @ u[0]
    s[0] = -np.inf
    mean0 = np.sort(s)[::-1][:10].mean()
    assert np.min(np.abs(ref - mean0)) < 1e-5


def test_checksum_corruption_names_the_file(tmp_path: Path) -> None:
    x, meta = make_data(n=50)
    version = build_snapshot(tmp_path, x, meta, model_version="m")
    path = tmp_path / "versions" / version / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"index\.faiss"):
        load_snapshot(tmp_path, device="cpu")
    path.unlink()
    with pytest.raises(SnapshotError, match=r"index\.faiss.*missing"):
        load_snapshot(tmp_path, device="cpu")


def test_versions_and_current(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="index build"):
        load_snapshot(tmp_path)
    x, meta = make_data(n=60)
    old = build_snapshot(tmp_path, x, meta, model_version="m1")
    new = build_snapshot(tmp_path, x[::-1].copy(), meta, model_version="m2")
    assert list_versions(tmp_path) == sorted([old, new]) == [old, new]
    assert (tmp_path / CURRENT_FILE).read_text().strip() == new
    assert load_snapshot(tmp_path, device="cpu").model_version == "m2"
    snap_old = load_snapshot(tmp_path, version=old, device="cpu")
    assert snap_old.model_version == "m1" and snap_old.version == old
    with pytest.raises(SnapshotError, match="not found"):
        load_snapshot(tmp_path, version="v0-000000")
    hidden = [p.name for p in (tmp_path / "versions").iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_encoder_dir_is_copied_and_checksummed(tmp_path: Path) -> None:
    enc = tmp_path / "model"
    enc.mkdir()
    (enc / "card.json").write_text(json.dumps({"version": "enc-1"}))
    (enc / "model.safetensors").write_bytes(b"\x00" * 64)
    x, meta = make_data(n=30)
    version = build_snapshot(tmp_path / "idx", x, meta, model_version="enc-1", encoder_dir=enc)
    snap = load_snapshot(tmp_path / "idx", device="cpu")
    assert snap.encoder_dir is not None and (snap.encoder_dir / "card.json").exists()
    assert "encoder/model.safetensors" in snap.manifest["files"]
    (tmp_path / "idx" / "versions" / version / "encoder" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(SnapshotError, match=r"encoder/model\.safetensors"):
        load_snapshot(tmp_path / "idx", device="cpu")


@pytest.mark.parametrize("kind", ["HNSW32", "IVF16,Flat"])
def test_approximate_kinds_recall(
    flat: tuple[Path, np.ndarray, str], tmp_path: Path, kind: str
) -> None:
    root, x, _ = flat
    _, meta = make_data()
    build_snapshot(tmp_path, x, meta, model_version="enc-test", kind=kind)
    approx = load_snapshot(tmp_path, device="cpu")
    exact = load_snapshot(root, device="cpu")
    assert approx.info()["index_kind"] == kind
    q = unit(np.random.default_rng(2).normal(size=(50, D)).astype(np.float32))
    _, ref_rows = exact.search(q, 10)
    _, rows = approx.search(q, 10)
    assert recall_at_k(ref_rows, rows) >= 0.9
    np.testing.assert_allclose(approx.vector(7), exact.vector(7))


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    x, meta = make_data(n=20)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(DimensionError, match="NaN"):
        build_snapshot(tmp_path, bad, meta, model_version="m")
    with pytest.raises(DimensionError, match="rows"):
        build_snapshot(tmp_path, x[:10], meta, model_version="m")
    with pytest.raises(SnapshotError, match="study_uid"):
        build_snapshot(tmp_path, x, meta.drop_columns(["study_uid"]), model_version="m")
    with pytest.raises(SnapshotError, match="kind"):
        build_snapshot(tmp_path, x, meta, model_version="m", kind="NotAKind")
    assert list_versions(tmp_path) == []
    snap_dir = tmp_path / "versions"
    assert not snap_dir.exists() or not any(snap_dir.iterdir())


def test_device_cuda_without_gpu(flat: tuple[Path, np.ndarray, str]) -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(SnapshotError, match="GPU"):
        load_snapshot(flat[0], device="cuda")
    assert load_snapshot(flat[0], device="auto").gpu is False


@pytest.mark.gpu
def test_gpu_matches_cpu(flat: tuple[Path, np.ndarray, str]) -> None:
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss was built without GPU support")
    root, _, _ = flat
    gpu, cpu = load_snapshot(root, device="cuda"), load_snapshot(root, device="cpu")
    assert gpu.gpu and not cpu.gpu
    q = unit(np.random.default_rng(3).normal(size=(30, D)).astype(np.float32))
    gs, gr = gpu.search(q, 10)
    cs, cr = cpu.search(q, 10)
    assert recall_at_k(cr, gr) >= 0.99
    np.testing.assert_allclose(gs, cs, atol=1e-4)
