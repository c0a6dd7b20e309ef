"""Large-index build (indexing/large.py): memory per vector and recall@10 with re-ranking.

Synthetic clustered unit vectors (a Gaussian mixture, like embeddings of many similar
studies), generated chunk by chunk from seeds so that no pass holds them all: the
IVF-PQ index is trained on a sample, filled in chunks into shards, then searched with
and without exact re-ranking. The reference, measured in the same run, is exact search
(brute force over every chunk, float32: 4 d bytes a vector), which also gives the ground
truth for recall@10 (the project's ``recall_at_k``, indexing/exact.py).

    nice -n 15 python benchmarks/bench_large_index.py --n 5000000 --shards 2
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from indexing.exact import recall_at_k
from indexing.large import LargeIndex, build_large


def centres(d: int, clusters: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((clusters, d)).astype(np.float32)


def chunk(i: int, size: int, c: np.ndarray, seed: int, spread: float) -> np.ndarray:
    """Chunk ``i`` of the data set: the same every time it is asked for."""
    rng = np.random.default_rng([seed, 1, i])
    x = c[rng.integers(0, len(c), size)] + spread * rng.standard_normal((size, c.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(n: int, size: int, c: np.ndarray, seed: int, spread: float) -> Iterator[np.ndarray]:
    for i, start in enumerate(range(0, n, size)):
        yield chunk(i, min(size, n - start), c, seed, spread)


def exact_topk(queries: np.ndarray, n: int, size: int, c: np.ndarray, seed: int, spread: float, k: int) -> np.ndarray:
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for i, x in enumerate(chunks(n, size, c, seed, spread)):
        s = queries @ x.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + i * size], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--n", type=int, default=1_000_000)
    g.add_argument("--d", type=int, default=128)
    g.add_argument("--clusters", type=int, default=20_000)
    g.add_argument("--spread", type=float, default=0.35, help="noise around a cluster centre")
    g.add_argument("--chunk", type=int, default=250_000)
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("index")
    g.add_argument("--kind", default=None, help="default IVF{4 sqrt n, power of 2},PQ{d/4}")
    g.add_argument("--train", type=int, default=100_000, help="training sample size")
    g.add_argument("--shards", type=int, default=2)
    g.add_argument("--nprobe", type=int, default=32)
    g.add_argument("--queries", type=int, default=500)
    g.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()

    nlist = 1 << round(np.log2(4 * np.sqrt(a.n)))
    kind = a.kind or f"IVF{nlist},PQ{a.d // 4}"
    c = centres(a.d, a.clusters, a.seed)
    sample = chunk(10**9, a.train, c, a.seed, a.spread)  # a draw apart from the data chunks
    queries = chunk(10**9 + 1, a.queries, c, a.seed, a.spread)
    work = Path(tempfile.mkdtemp(dir=a.workdir, prefix="bench-large-"))
    print(f"n={a.n:,} d={a.d} kind={kind} shards={a.shards} train={a.train:,} queries={a.queries}")
    try:
        t = time.perf_counter()
        truth = exact_topk(queries, a.n, a.chunk, c, a.seed, a.spread, 10)
        exact_s = time.perf_counter() - t
        print(f"exact (reference): {exact_s:.1f} s for {a.queries} queries, incl. regenerating the data")
        marks: dict[str, float] = {}
        t = time.perf_counter()

        def progress(stage: str, done: int) -> None:
            marks.setdefault(stage, time.perf_counter() - t)

        shard_size = -(-a.n // a.shards)
        build_large(chunks(a.n, a.chunk, c, a.seed, a.spread), work / "large", train_sample=sample,
                    kind=kind, shard_size=shard_size, progress=progress)
        build_s = time.perf_counter() - t
        train_s = marks.get("add", build_s) - marks.get("train", 0.0)
        print(f"build: {build_s:.1f} s (train {train_s:.1f} s on {a.train:,}), peak RSS {rss_gib():.2f} GiB")
        index_bytes = sum(p.stat().st_size for p in (work / "large").glob("shard-*/index.faiss"))
        vec_bytes = sum(p.stat().st_size for p in (work / "large").glob("shard-*/vectors.npy"))
        flat = 4 * a.d
        print(f"memory per vector: index (RAM) {index_bytes / a.n:.1f} B = {index_bytes / a.n / flat:.3f}x Flat "
              f"float32 ({flat} B); re-ranking vectors (disk, mmap) {vec_bytes / a.n:.1f} B")
        large = LargeIndex(work / "large")
        for rerank in (0, 4, 16):
            t = time.perf_counter()
            _s, ids = large.search(queries, 10, nprobe=a.nprobe, rerank=rerank)
            s = time.perf_counter() - t
            print(f"nprobe {a.nprobe} rerank {rerank:>2}: recall@10 {recall_at_k(truth, ids):.3f}, "
                  f"{s / a.queries * 1e3:.2f} ms a query = {s / exact_s:.4f}x exact")
        print(f"peak RSS {rss_gib():.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
