"""indexing.large: an IVF-PQ index trained on a sample, filled in chunks into shards, whose
merged, re-ranked answers match exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexing.errors import DimensionError, SnapshotError
from indexing.large import LargeIndex, build_large

D = 16


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sharded_build_and_search(tmp_path: Path) -> None:
    data = _data(5000, 0)
    chunks = (data[i : i + 700] for i in range(0, len(data), 700))  # chunks cross shards
    manifest = build_large(chunks, tmp_path / "large", train_sample=_data(2000, 1),
                           kind="IVF16,PQ8x4", shard_size=2000)  # fmt: skip
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [
        (0, 2000), (2000, 4000), (4000, 5000)]  # fmt: skip
    assert manifest["num_vectors"] == 5000 and manifest["trained_on"] == 2000
    assert json.loads((tmp_path / "large" / "manifest.json").read_text()) == manifest
    assert not list(tmp_path.glob(".tmp-*"))

    large = LargeIndex(tmp_path / "large", verify=True)
    queries = _data(50, 2)
    exact = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10]
    hits = {}
    for rerank in (0, 16):
        scores, ids = large.search(queries, 10, nprobe=16, rerank=rerank)
        assert ids.shape == (50, 10) and (ids >= 0).all()
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
        hits[rerank] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids, strict=True)])
    assert hits[16] >= 0.9 and hits[16] > hits[0]  # re-ranking with the stored vectors
    _s, ids = large.search(queries, 10, nprobe=16, rerank=16)
    rescored = np.sort((queries[:, None, :] * data[ids]).sum(-1), axis=1)[:, ::-1]
    np.testing.assert_allclose(_s, rescored, atol=2e-3)  # scores are float16-vector exact


def test_refuses_bad_input(tmp_path: Path) -> None:
    sample = _data(500, 1)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match="exists"):
        build_large([_data(10, 0)], tmp_path / "taken", train_sample=sample, kind="IVF4,PQ4x4")
    with pytest.raises(DimensionError, match="expected"):
        build_large([np.ones((5, 8), np.float32)], tmp_path / "d", train_sample=sample,
                    kind="IVF4,PQ4x4")  # fmt: skip
    with pytest.raises(SnapshotError, match="does not understand"):
        build_large([_data(10, 0)], tmp_path / "k", train_sample=sample, kind="IVF4,Nope")
    built = tmp_path / "ok"
    build_large([_data(300, 0)], built, train_sample=sample, kind="IVF4,PQ4x4", shard_size=100)
    index_file = built / "shard-00001" / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SnapshotError, match="checksum"):
        LargeIndex(built, verify=True)
