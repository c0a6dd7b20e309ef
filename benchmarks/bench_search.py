"""In-process FAISS search vs gRPC SearchSimilar(embedding), one client, one query at a time.

Prints latency percentiles of both and their ratio, measured in the same run on the same
random vectors. Nothing is asserted.

    python benchmarks/bench_search.py                 # 100k x 256 (the reference size)
    python benchmarks/bench_search.py --preset small  # 10k x 64, a quick look
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

PRESETS = {"small": (10_000, 64), "ref": (100_000, 256)}


def make_metadata(n: int, rng: np.random.Generator) -> pa.Table:
    sites = np.array(["north", "south", "east"])
    return pa.table(
        {
            "patient_id": [f"P-{i:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "site": sites[rng.integers(0, 3, n)].tolist(),
            "modality": ["CT"] * n,
            "manufacturer": ["ACME"] * n,
            "model": ["Scan 1"] * n,
            "kernel": ["B30f"] * n,
            "kvp": ["120"] * n,
            "slice_thickness": ["3"] * n,
            "pixel_spacing": ["0.7"] * n,
            "time": rng.exponential(24.0, n).round(1),
            "event": rng.random(n) < 0.6,
            "labels": pa.array([[("grade", "G2")]] * n, pa.map_(pa.string(), pa.string())),
            "values": pa.array([[]] * n, pa.map_(pa.string(), pa.float64())),
        }
    )


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--preset", choices=sorted(PRESETS), default="ref")
    g.add_argument("--n", type=int, help="number of vectors (overrides the preset)")
    g.add_argument("--dim", type=int, help="dimension (overrides the preset)")
    r = ap.add_argument_group("run")
    r.add_argument("--queries", type=int, default=300)
    r.add_argument("--warmup", type=int, default=20)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, d = PRESETS[args.preset]
    n, d = args.n or n, args.dim or d

    import faiss

    from indexing.query import search_similar
    from indexing.snapshot import build_snapshot, load_snapshot
    from service.background import BackgroundServer
    from service.client import CohortsimClient

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((args.queries + args.warmup, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, "
          f"faiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}")
    print(f"cohort: {n} x {d} float32, k={args.k}, {args.queries} queries one at a time (+{args.warmup} warm-up)")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_snapshot(Path(tmp), x, make_metadata(n, rng), model_version="bench", kind="Flat")
        print(f"snapshot build: {time.perf_counter() - t0:.1f} s")
        snap = load_snapshot(Path(tmp), device="cpu")

        def timed(fn) -> list[float]:  # type: ignore[no-untyped-def]
            for i in range(args.warmup):
                fn(q[i])
            out = []
            for i in range(args.warmup, args.warmup + args.queries):
                t = time.perf_counter()
                fn(q[i])
                out.append((time.perf_counter() - t) * 1e3)
            return out

        raw = timed(lambda v: snap.search(v[None], args.k))
        full = timed(lambda v: search_similar(snap, v[None], args.k))
        with BackgroundServer(Path(tmp)) as server, CohortsimClient(server.target) as client:
            grpc_ms = timed(lambda v: client.search(embedding=v, k=args.k))
            top_grpc = [nb.study_uid for nb in client.search(embedding=q[0], k=args.k).neighbors]
        top_local = [snap.metadata["study_uid"][int(r)].as_py() for r in snap.search(q[0][None], args.k)[1][0]]
        print(f"same top-{args.k} in-process and over gRPC: {top_grpc == top_local}")

    rows = [("in-process FAISS search (reference)", raw), ("in-process search + prognosis", full), ("gRPC SearchSimilar(embedding)", grpc_ms)]
    ref50 = percentiles(raw)[0]
    print(f"{'path':40s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'p50 / ref':>10s}")
    for name, ms in rows:
        p50, p90, p99 = percentiles(ms)
        print(f"{name:40s} {p50:8.2f} {p90:8.2f} {p99:8.2f} {p50 / ref50:10.2f}")


if __name__ == "__main__":
    main()
