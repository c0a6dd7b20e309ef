"""Exact backends (BLAS, torch) against FAISS IndexFlatIP: same rows, same similarities."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from indexing import exact
from indexing.exact import BlasExactIndex, TorchExactIndex, topk_rows
from indexing.snapshot import build_snapshot, load_snapshot


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, faiss.Index]:
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(5000, 48)))
    q = unit(rng.normal(size=(70, 48)))
    index = faiss.IndexFlatIP(48)
    index.add(x)
    return x, q, index


def assert_same_neighbours(
    fs: np.ndarray, fr: np.ndarray, bs: np.ndarray, br: np.ndarray, atol: float = 1e-5
) -> None:
    """Same similarities; same rows except exchanges within float32 near-ties."""
    np.testing.assert_allclose(bs, fs, atol=atol)
    for i in range(fr.shape[0]):
        for j in np.flatnonzero(fr[i] != br[i]):
            near = np.abs(fs[i] - fs[i, j]) <= atol
            assert near.sum() >= 2, f"query {i} rank {j}: {fr[i, j]} vs {br[i, j]} is no tie"
        sure = fs[i] > fs[i, -1] + atol  # above the last (possibly tied) similarity
        assert set(fr[i][sure]) == set(br[i][bs[i] > bs[i, -1] + atol])


def faiss_masked(index: faiss.Index, q: np.ndarray, k: int, mask: np.ndarray):
    bitmap = np.packbits(mask, bitorder="little")
    params = faiss.SearchParameters()
    params.sel = faiss.IDSelectorBitmap(mask.size, faiss.swig_ptr(bitmap))
    return index.search(q, k, params=params)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_topk_rows_matches_sort(k: int) -> None:
    rng = np.random.default_rng(k)
    s = rng.normal(size=(9, 20_011)).astype(np.float32)  # n not a multiple of the group size
    s[:, ::7] = -np.inf
    vals, cols = topk_rows(s, k)
    want = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(cols, want)
    np.testing.assert_array_equal(vals, np.take_along_axis(s, want, axis=1))


def test_topk_rows_pads_masked_and_short() -> None:
    s = np.array([[0.5, -np.inf, 0.2], [-np.inf, -np.inf, -np.inf]], dtype=np.float32)
    vals, cols = topk_rows(s, 5)
    np.testing.assert_array_equal(cols, [[0, 2, -1, -1, -1], [-1, -1, -1, -1, -1]])
    assert np.isneginf(vals[0, 2:]).all() and np.isneginf(vals[1]).all()


@pytest.mark.parametrize("nq", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 10, 257])
def test_blas_congruent_with_faiss(data, nq: int, k: int, monkeypatch) -> None:
    x, q, index = data
    monkeypatch.setattr(exact, "BLOCK_SCORES", 20_000)  # several database blocks
    monkeypatch.setattr(exact, "MIN_BLOCK_ROWS", 700)
    fs, fr = index.search(q[:nq], k)
    bs, br = BlasExactIndex(x).search(q[:nq], k)
    assert_same_neighbours(fs, fr, bs, br)


@pytest.mark.parametrize("share", [0.9, 0.3, 0.02, 0.0])
def test_blas_mask_congruent_with_faiss_selector(data, share: float) -> None:
    x, q, index = data
    mask = np.random.default_rng(1).random(x.shape[0]) < share
    bs, br = BlasExactIndex(x).search(q, 10, allowed=mask)
    if share == 0.0:
        assert (br == -1).all() and np.isneginf(bs).all()
        return
    fs, fr = faiss_masked(index, q, 10, mask)
    np.testing.assert_array_equal(br, fr)
    np.testing.assert_allclose(bs, fs, atol=1e-5)
    assert mask[br].all()


def test_k_beyond_the_allowed_rows_pads(data) -> None:
    x, q, _ = data
    mask = np.zeros(x.shape[0], dtype=bool)
    mask[[3, 99, 4000]] = True
    sims, rows = BlasExactIndex(x).search(q[:2], 5, allowed=mask)
    assert set(rows[0, :3]) == {3, 99, 4000} and (rows[:, 3:] == -1).all()
    assert np.isneginf(sims[:, 3:]).all()


def test_fp16_storage(data) -> None:
    x, q, _ = data
    half = x.astype(np.float16)
    ref = faiss.IndexFlatIP(x.shape[1])
    ref.add(half.astype(np.float32))
    fs, fr = ref.search(q, 10)
    bs, br = BlasExactIndex(half).search(q, 10)
    np.testing.assert_array_equal(br, fr)
    np.testing.assert_allclose(bs, fs, atol=1e-5)


def test_torch_backend_on_cpu_congruent_with_faiss(data) -> None:
    """The torch matmul + top-k engine (the GPU path where faiss-gpu cannot load), on the CPU."""
    x, q, index = data
    t = TorchExactIndex(x, device="cpu")
    fs, fr = index.search(q, 10)
    ts, tr = t.search(q, 10)
    np.testing.assert_array_equal(tr, fr)
    np.testing.assert_allclose(ts, fs, atol=1e-5)
    mask = np.random.default_rng(2).random(x.shape[0]) < 0.2
    fs, fr = faiss_masked(index, q, 10, mask)
    ts, tr = t.search(q, 10, allowed=mask)
    np.testing.assert_array_equal(tr, fr)
    ts, tr = t.search(q[:1], x.shape[0] + 3)
    assert (tr[0, -3:] == -1).all() and np.isneginf(ts[0, -3:]).all()


def _snapshot_dir(tmp_path: Path, x: np.ndarray) -> Path:
    n = x.shape[0]
    meta = pa.table(
        {
            "patient_id": [f"P-{i:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "site": ["a" if i % 3 else "b" for i in range(n)],
        }
    )
    build_snapshot(tmp_path, x, meta, model_version="m")
    return tmp_path


@pytest.mark.parametrize("backend", ["blas", "faiss", "torch"])
def test_snapshot_backends_agree(data, tmp_path: Path, backend: str) -> None:
    x, q, index = data
    root = _snapshot_dir(tmp_path, x)
    snap = load_snapshot(root, device="cpu", exact_backend=backend)
    assert snap.backend.startswith(backend) and snap.gpu is False
    fs, fr = index.search(q, 10)
    ss, sr = snap.search(q, 10)
    np.testing.assert_array_equal(sr, fr)
    np.testing.assert_allclose(ss, fs, atol=1e-5)
    fs, fr = faiss_masked(index, q, 10, snap.filter_mask("site = 'b'"))
    ss, sr = snap.search(q, 10, where="site = 'b'")
    np.testing.assert_array_equal(sr, fr)


def test_default_cpu_backend_is_blas_without_a_second_copy(data, tmp_path: Path) -> None:
    x, _, _ = data
    snap = load_snapshot(_snapshot_dir(tmp_path, x), device="cpu")
    assert snap.backend == "blas"
    # the vectors are a view into the FAISS index's own storage, not a copy
    xb = faiss.downcast_index(snap._cpu_index).get_xb()
    assert snap.vectors.ctypes.data == int(xb)
    assert not snap.vectors.flags.writeable


# --------------------------------------------------------------------------- GPU (skipped without)
@pytest.mark.gpu
def test_gpu_torch_backend_congruent_with_faiss_cpu(data, tmp_path: Path) -> None:
    x, q, index = data
    snap = load_snapshot(_snapshot_dir(tmp_path, x), device="gpu", exact_backend="torch")
    assert snap.gpu and snap.backend == "torch-cuda"
    fs, fr = index.search(q, 10)
    ss, sr = snap.search(q, 10)
    np.testing.assert_array_equal(sr, fr)
    np.testing.assert_allclose(ss, fs, atol=1e-4)
    mask = snap.filter_mask("site = 'b'")
    fs, fr = faiss_masked(index, q, 10, mask)
    ss, sr = snap.search(q, 10, where="site = 'b'")
    np.testing.assert_array_equal(sr, fr)


@pytest.mark.gpu
def test_gpu_auto_backend_congruent_with_cpu(data, tmp_path: Path) -> None:
    """faiss-gpu where it loads, else torch on CUDA: the same neighbours as the CPU."""
    x, q, _ = data
    root = _snapshot_dir(tmp_path, x)
    gpu, cpu = load_snapshot(root, device="gpu"), load_snapshot(root, device="cpu")
    assert gpu.gpu and gpu.backend in ("faiss-gpu", "torch-cuda")
    gs, gr = gpu.search(q, 10)
    cs, cr = cpu.search(q, 10)
    np.testing.assert_array_equal(gr, cr)
    np.testing.assert_allclose(gs, cs, atol=1e-4)
    # filters and tombstones on the GPU stay exact (over-fetch / CPU copy / mask)
    gs, gr = gpu.search(q, 10, where="site = 'b'")
    cs, cr = cpu.search(q, 10, where="site = 'b'")
    np.testing.assert_array_equal(gr, cr)


def test_gpu_routing_is_exact_with_a_stand_in_index(data, tmp_path: Path) -> None:
    """The faiss-gpu routing (GPU indexes ignore ID selectors: over-fetch and post-filter
    when few rows are excluded, the CPU copy otherwise), driven by a CPU stand-in."""
    from indexing.snapshot import Snapshot
    from indexing.tombstones import TOMBSTONE_FILE, add_tombstones

    x, q, index = data
    root = _snapshot_dir(tmp_path, x)
    cpu = load_snapshot(root, device="cpu")
    calls: list[int] = []

    class StandIn:  # answers like a GPU index and records the k it was asked for
        def search(self, queries: np.ndarray, k: int):  # type: ignore[no-untyped-def]
            calls.append(k)
            return index.search(queries, k)

    gpu = Snapshot(cpu.path, cpu.manifest, cpu._cpu_index, cpu.metadata, cpu.vectors,
                   cpu.ood_reference, StandIn())
    assert gpu.backend == "faiss-gpu" and gpu.gpu
    np.testing.assert_array_equal(gpu.search(q, 10)[1], cpu.search(q, 10)[1])
    assert calls == [10]
    add_tombstones(root / TOMBSTONE_FILE, ["P-0000000000000000", "P-0000000000000005"])
    gs, gr = gpu.search(q, 10)
    np.testing.assert_allclose(gs, cpu.search(q, 10)[0], atol=1e-6)
    assert calls[-1] == 12  # over-fetched by the two hidden rows
    np.testing.assert_array_equal(gr, cpu.search(q, 10)[1])
    assert not ({0, 5} & set(gr.ravel().tolist()))
    n_calls = len(calls)
    _, gr = gpu.search(q, 10, where="site = 'b'")  # two thirds excluded: the CPU copy
    assert len(calls) == n_calls
    np.testing.assert_array_equal(gr, cpu.search(q, 10, where="site = 'b'")[1])


@pytest.mark.parametrize("nq", [1, 2, 16, 32, 128])
def test_service_batch_sizes_with_tombstones_and_filter(tmp_path: Path, nq: int) -> None:
    """Snapshot.search (the BLAS path) at the batch sizes a service sends gives FAISS
    Flat's ids and similarities (1e-5), with withdrawn patients and a filter applied."""
    from indexing.tombstones import TOMBSTONE_FILE, add_tombstones

    rng = np.random.default_rng(nq)
    x = unit(rng.normal(size=(6000, 32)))
    q = unit(rng.normal(size=(nq, 32)))
    root = _snapshot_dir(tmp_path, x)
    gone = rng.choice(x.shape[0], 300, replace=False)
    add_tombstones(root / TOMBSTONE_FILE, [f"P-{i:016x}" for i in gone])
    snap = load_snapshot(root, device="cpu")
    assert snap.backend == "blas"
    index = faiss.IndexFlatIP(32)
    index.add(x)
    keep = np.ones(x.shape[0], dtype=bool)
    keep[gone] = False
    for where, mask in (("", keep), ("site = 'b'", keep & (np.arange(x.shape[0]) % 3 == 0))):
        fs, fr = faiss_masked(index, q, 10, mask)
        ss, sr = snap.search(q, 10, where=where)
        np.testing.assert_array_equal(sr, fr)
        np.testing.assert_allclose(ss, fs, atol=1e-5)
        assert mask[sr].all()


def test_faiss_threads_for_is_per_thread_and_restored() -> None:
    import threading

    from indexing.exact import faiss_threads_for

    before = faiss.omp_get_max_threads()
    seen: dict[str, int] = {}

    def other() -> None:
        seen["other"] = faiss.omp_get_max_threads()

    with faiss_threads_for(1):
        seen["inside"] = faiss.omp_get_max_threads()
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["inside"] == 1
    assert seen["other"] == before  # another thread's FAISS calls keep every thread
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(RuntimeError), faiss_threads_for(1):
        raise RuntimeError
    assert faiss.omp_get_max_threads() == before


@pytest.mark.parametrize("share", [0.01, 0.1, 0.3])
@pytest.mark.parametrize("nq", [1, 3, 8])
def test_few_queries_masked_both_paths(data, share: float, nq: int) -> None:
    """Gathered (few rows pass) and full-scan (masked scores) paths give FAISS's answer."""
    x, q, index = data
    mask = np.random.default_rng(3).random(x.shape[0]) < share
    fs, fr = faiss_masked(index, q[:nq], 10, mask)
    bs, br = BlasExactIndex(x).search(q[:nq], 10, allowed=mask)
    np.testing.assert_array_equal(br, fr)
    np.testing.assert_allclose(bs, fs, atol=1e-5)


def test_recall_at_k() -> None:
    from indexing.exact import recall_at_k

    ref = np.array([[1, 2, 3], [4, 5, -1]])
    assert recall_at_k(ref, np.array([[3, 2, 1], [5, 4, 9]])) == 1.0
    assert recall_at_k(ref, np.array([[1, 9, 8, 2], [9, 4, 8, 5]])) == 2 / 5  # first k columns count
    assert recall_at_k(np.full((2, 3), -1), np.zeros((2, 3), int)) == 1.0
