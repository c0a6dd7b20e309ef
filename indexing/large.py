"""IVF-PQ indexes for 10^7-10^8 vectors: trained on a sample, filled in chunks, in shards.

:func:`indexing.snapshot.build_snapshot` holds every vector in memory; this path never
does. The quantizers are trained once on a sample (``train_sample``, e.g. 100k rows
drawn from the embedding Parquet files), then the vectors stream through in chunks
(from any iterator: Parquet batches, a memory map, a generator) and are added to one
shard at a time, so memory stays at one shard's codes plus one chunk.

Layout of a large-index folder ``LARGE_DIR/`` (the shard coordinator serves it)::

    LARGE_DIR/manifest.json               kind, dimension, n, metric "cosine", trained_on,
                                          shards [{name, start, stop, files: {name: sha256}}]
    LARGE_DIR/trained.faiss               the empty trained index (shared by the shards)
    LARGE_DIR/shard-00000/index.faiss     IVF-PQ of global ids start..stop-1
    LARGE_DIR/shard-00000/vectors.npy     (stop - start, d) float16 L2-normalised vectors,
                                          row j = id start + j, for exact re-ranking
                                          (memory-mapped; only the candidates are read)

Every shard uses the same coarse quantizer and codebooks, so their scores compare and
top-k lists merge exactly. The folder is written as ``.tmp-LARGE_DIR`` and renamed into
place once complete. Memory per vector when serving: the PQ code (``PQm``: m bytes) plus
an 8-byte id in RAM, and ``2 d`` bytes of re-ranking vector on disk (benchmarks/RESULTS.md,
``bench_large_index.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexing.errors import DimensionError, SnapshotError
from indexing.store import fsync_dir

MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
INDEX = "index.faiss"
VECTORS = "vectors.npy"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def train_large(sample: np.ndarray, kind: str, *, seed: int = 0) -> faiss.Index:
    """An empty IVF-PQ (or any trainable factory ``kind``) trained on ``sample`` ``(m, d)``."""
    sample = _normalise(sample)
    try:
        index = faiss.index_factory(sample.shape[1], kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise SnapshotError(f"faiss does not understand index kind {kind!r}: {exc}") from exc
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    index.train(sample)
    return index


def build_large(
    chunks: Iterable[np.ndarray],
    out_dir: Path | str,
    *,
    train_sample: np.ndarray,
    kind: str = "IVF4096,PQ32",
    shard_size: int = 10_000_000,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Build a sharded large index in ``out_dir`` (which must not exist); returns its manifest.

    ``chunks`` yields ``(b, d)`` float vectors in id order (normalised here);
    ``train_sample`` ``(m, d)`` trains the quantizers (m of 30-256 x nlist is plenty).
    ``shard_size``: vectors per shard (one shard's codes are in memory while it fills).
    ``progress(stage, vectors_done)``: stages ``train``, ``add``.
    """
    out = Path(out_dir)
    if out.exists():
        raise SnapshotError(f"{out} exists; give a new folder for the large index")
    if shard_size < 1:
        raise SnapshotError(f"shard_size must be >= 1, got {shard_size}")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if progress is not None:
        progress("train", 0)
    trained = train_large(train_sample, kind)
    d = trained.d
    faiss.write_index(trained, str(tmp / TRAINED))
    shards: list[dict[str, Any]] = []
    state: dict[str, Any] = {"index": None, "vectors": None, "start": 0, "fill": 0}

    def close_shard() -> None:
        if state["index"] is None:
            return
        name = f"shard-{len(shards):05d}"
        folder = tmp / name
        faiss.write_index(state["index"], str(folder / INDEX))
        state["vectors"].flush()
        stop = state["start"] + state["fill"]
        if state["fill"] < shard_size:  # the last shard: cut the file to its rows
            rows = np.array(state["vectors"][: state["fill"]])
            del state["vectors"]
            np.save(folder / VECTORS, rows)
        else:
            del state["vectors"]
        files = {f: _sha256(folder / f) for f in (INDEX, VECTORS)}
        shards.append({"name": name, "start": state["start"], "stop": stop, "files": files})
        state.update(index=None, vectors=None, start=stop, fill=0)

    total = 0
    for chunk in chunks:
        x = _normalise(chunk)
        if x.ndim != 2 or x.shape[1] != d:
            raise DimensionError(f"a chunk has shape {x.shape}; expected (b, {d})")
        pos = 0
        while pos < len(x):
            if state["index"] is None:
                folder = tmp / f"shard-{len(shards):05d}"
                folder.mkdir()
                state["index"] = faiss.clone_index(trained)
                state["vectors"] = np.lib.format.open_memmap(
                    folder / VECTORS, mode="w+", dtype=np.float16, shape=(shard_size, d)
                )
            take = min(len(x) - pos, shard_size - state["fill"])
            part = x[pos : pos + take]
            ids = np.arange(state["start"] + state["fill"], state["start"] + state["fill"] + take)
            state["index"].add_with_ids(part, ids.astype(np.int64))
            state["vectors"][state["fill"] : state["fill"] + take] = part.astype(np.float16)
            state["fill"] += take
            pos += take
            if state["fill"] == shard_size:
                close_shard()
        total += len(x)
        if progress is not None:
            progress("add", total)
    close_shard()
    if total == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DimensionError("no vectors to index")
    manifest = {
        "format": 1,
        "kind": kind,
        "dimension": d,
        "metric": "cosine",
        "num_vectors": total,
        "trained_on": len(train_sample),
        "faiss_version": faiss.__version__,
        "trained": _sha256(tmp / TRAINED),
        "shards": shards,
    }
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return manifest


class LargeIndex:
    """A large index folder opened for search (shards in memory, re-ranking vectors
    memory-mapped). ``search`` merges the shards' top-k exactly."""

    def __init__(self, path: Path | str, *, verify: bool = False) -> None:
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{self.path} is not a large index folder: {exc}") from None
        self.shards: list[tuple[int, faiss.Index, np.ndarray]] = []
        for s in self.manifest["shards"]:
            folder = self.path / s["name"]
            if verify:
                for name, digest in s["files"].items():
                    if _sha256(folder / name) != digest:
                        raise SnapshotError(f"{folder / name} fails its checksum; rebuild it")
            index = faiss.read_index(str(folder / INDEX))
            vectors = np.load(folder / VECTORS, mmap_mode="r")
            self.shards.append((int(s["start"]), index, vectors))

    @property
    def num_vectors(self) -> int:
        return int(self.manifest["num_vectors"])

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int = 32, rerank: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (q, k) float32, ids (q, k) int64)``, best first; ids are global.

        ``rerank`` > 1 fetches ``k * rerank`` candidates per shard and re-scores them
        exactly with the stored float16 vectors; 0 or 1 returns the PQ scores."""
        q = _normalise(queries)
        fetch = k * rerank if rerank > 1 else k
        all_scores, all_ids = [], []
        for start, index, vectors in self.shards:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = nprobe
            scores, ids = index.search(q, fetch)
            if rerank > 1:
                scores = np.full(ids.shape, -np.inf, dtype=np.float32)
                for i in range(len(q)):
                    ok = ids[i] >= 0
                    rows = np.asarray(vectors[ids[i][ok] - start], dtype=np.float32)
                    scores[i, ok] = rows @ q[i]
            all_scores.append(scores)
            all_ids.append(ids)
        scores = np.concatenate(all_scores, axis=1)
        ids = np.concatenate(all_ids, axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
