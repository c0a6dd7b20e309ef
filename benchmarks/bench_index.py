"""Index kinds at 100k-1M vectors: build, memory, recall, latency, throughput; and the
exact (Flat) path against FAISS and against the machine's own limits, measured in one run.

Sections (``--sections``, all by default):

* ``limits``: numpy SGEMM rate (at the search's shapes and square) and memory read
  bandwidth (a one-vector SGEMV over the database), the references for the rest.
* ``exact``: exact top-10 search of batches of 1..1024 queries: FAISS ``IndexFlatIP`` as
  shipped, FAISS with its BLAS kernel forced (``distance_compute_blas_threshold``), with
  larger BLAS blocks, the issue's numpy matmul + argpartition, and
  :class:`indexing.exact.BlasExactIndex` (what ``Snapshot.search`` uses for Flat on the
  CPU); each as queries/s, effective GFLOP/s and share of the SGEMM rate, and for small
  batches the bytes streamed per second against the measured bandwidth.
* ``kinds``: for each index kind, through the public API (``build_snapshot``,
  ``load_snapshot``, ``Snapshot.search``): build time, bytes per vector in memory and
  on disk, recall@10 against exact search, single-query latency, batched throughput, and
  recall + latency under a filter passing ~20% / ~2% of rows.

Data: synthetic embedding-like unit vectors (``--data clustered``: 1,000 Gaussian
clusters in a 64-dim latent subspace mapped into d dims, plus isotropic noise carrying
~10% of the energy; queries are fresh draws, not database members), or uniform on the
sphere (``--data random``: the worst case for approximate kinds). Nothing is asserted.

    python benchmarks/bench_index.py --preset smoke     # 20k x 64, a minute
    python benchmarks/bench_index.py --preset quick     # 100k x 256
    python benchmarks/bench_index.py --preset full      # 100k and 1M x 256 and 512 (long)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

PRESETS: dict[str, list[tuple[int, int]]] = {
    "smoke": [(20_000, 64)],
    "quick": [(100_000, 256)],
    "full": [(100_000, 256), (100_000, 512), (1_000_000, 256), (1_000_000, 512)],
}
EXACT_BATCHES = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
K = 10


# --------------------------------------------------------------------------- helpers
def timeit(fn: Callable[[], Any], *, min_time: float = 1.0, min_reps: int = 3, max_reps: int = 200) -> float:
    """Fastest seconds per call after one warm-up call, over >= min_reps and >= min_time.

    The fastest call, not the median: the cores may be shared, and the fastest call is
    the best estimate of what the code itself costs.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def interleaved(fns: dict[str, Callable[[], Any]], *, min_time: float, min_rounds: int = 3) -> dict[str, float]:
    """Fastest seconds per call of each function, timed in alternating rounds so that a
    change in machine load hits every method alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < 100 and (rounds < min_rounds or time.perf_counter() - start < min_time * len(fns)):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds += 1
    return {k: float(np.min(v)) for k, v in times.items()}


_MEMORY_PROBE = """
import json, sys
import numpy as np
from indexing.snapshot import load_snapshot

def rss():
    import os
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# warm the fixed, size-independent costs first: pyarrow's and faiss's thread pools
# (reading any Parquet file starts pyarrow's pools, ~80 MiB of RSS with mimalloc)
import faiss, pyarrow.parquet as pq
from indexing.snapshot import current_version
version = current_version(sys.argv[1])
# kept alive, so that load_snapshot cannot reuse its memory and hide the metadata's cost
warm = pq.read_table(f"{sys.argv[1]}/versions/{version}/metadata.parquet")
faiss.IndexFlatIP(8).search(np.zeros((64, 8), np.float32), 1)
before = rss()
snap = load_snapshot(sys.argv[1], device="cpu")
snap.search(np.asarray(snap.vectors[:1], dtype=np.float32), 10)
loaded = rss()
# the FAISS index alone: a second copy read on top (nothing freed in between to reuse)
again = faiss.read_index(f"{sys.argv[1]}/versions/{version}/index.faiss")
print(json.dumps({"rss": loaded - before, "metadata": snap.metadata.nbytes, "index": rss() - loaded}))
"""


def load_memory(root: Path) -> tuple[int, int, int]:
    """``(RSS growth, metadata bytes, RSS of the FAISS index alone)`` of loading a snapshot +
    one search, in a fresh process (so memory freed by the build cannot hide the cost)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(root)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return int(res["rss"]), int(res["metadata"]), int(res["index"])


def embedding_like(n: int, d: int, rng: np.random.Generator, kind: str, *, chunk: int = 100_000) -> np.ndarray:
    """``(n, d)`` float32 unit vectors (see the module docstring)."""
    out = np.empty((n, d), dtype=np.float32)
    if kind == "random":
        for s in range(0, n, chunk):
            out[s : s + chunk] = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
    else:
        latent = 64
        state = np.random.default_rng(12345)  # the same "embedding space" for data and queries
        mix = state.standard_normal((latent, d)).astype(np.float32) / math.sqrt(latent)
        centres = state.standard_normal((1000, latent)).astype(np.float32)
        spread = state.uniform(0.3, 0.8, 1000).astype(np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            lab = rng.integers(0, 1000, m)
            z = centres[lab] + spread[lab, None] * rng.standard_normal((m, latent), dtype=np.float32)
            v = z @ mix
            v += 0.33 * np.linalg.norm(v, axis=1, keepdims=True) / math.sqrt(d) * rng.standard_normal(
                (m, d), dtype=np.float32
            )
            out[s : s + m] = v
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def metadata(n: int, rng: np.random.Generator) -> pa.Table:
    return pa.table(
        {
            "patient_id": [f"P-{i:016x}" for i in range(n)],
            "study_uid": [f"S-{i:024x}" for i in range(n)],
            "site": np.array(["north", "south", "east"])[rng.integers(0, 3, n)].tolist(),
            "bucket": rng.integers(0, 100, n).astype(np.int32),  # for ~20% / ~2% filters
        }
    )


def default_kinds(n: int, d: int) -> list[str]:
    nlist = 1 << round(math.log2(4 * math.sqrt(n)))  # 100k -> 1024, 1M -> 4096
    return ["Flat", "SQfp16", "HNSW32", f"IVF{nlist},Flat", f"IVF{nlist},PQ{d // 8}"]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections
def section_limits(x: np.ndarray) -> dict[str, float]:
    n, d = x.shape
    q = np.ascontiguousarray(x[:1024])
    block = np.ascontiguousarray(x[: min(n, 16384)])
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    v = x[0].copy()
    secs = interleaved(
        {"sgemm": lambda: q @ block.T, "square": lambda: a @ a, "gemv": lambda: x @ v},
        min_time=2.0,
        min_rounds=5,
    )
    sgemm_search = 2 * q.shape[0] * block.shape[0] * d / secs["sgemm"] / 1e9
    sgemm_square = 2 * 2048**3 / secs["square"] / 1e9
    bandwidth = x.nbytes / secs["gemv"] / 1e9
    print(f"  numpy SGEMM, 1024 queries x {block.shape[0]} rows x d={d}: {sgemm_search:,.0f} GFLOP/s")
    print(f"  numpy SGEMM, 2048^3: {sgemm_square:,.0f} GFLOP/s")
    print(f"  memory read bandwidth (SGEMV over the {x.nbytes / 2**20:,.0f} MiB database): {bandwidth:,.1f} GB/s")
    return {"sgemm_gflops": sgemm_search, "sgemm_square_gflops": sgemm_square, "read_gbs": bandwidth}


def section_exact(x: np.ndarray, queries: np.ndarray, limits: dict[str, float], batches: list[int]) -> list[dict[str, Any]]:
    import faiss

    from indexing.exact import BlasExactIndex

    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    index.add(x)
    ours = BlasExactIndex(x)
    cv = faiss.cvar
    defaults = (cv.distance_compute_blas_threshold, cv.distance_compute_blas_database_bs)

    def faiss_cfg(threshold: int, db_bs: int, index: Any = index) -> Callable[[np.ndarray], Any]:
        def run(q: np.ndarray) -> Any:
            cv.distance_compute_blas_threshold, cv.distance_compute_blas_database_bs = threshold, db_bs
            try:
                return index.search(q, K)
            finally:
                cv.distance_compute_blas_threshold, cv.distance_compute_blas_database_bs = defaults

        return run

    def numpy_naive(q: np.ndarray) -> Any:
        s = q @ x.T
        return np.argpartition(s, n - K, axis=1)[:, n - K :]

    methods: list[tuple[str, Callable[[np.ndarray], Any]]] = [
        (f"faiss Flat as shipped (BLAS only if nq*d >= {defaults[0]:,})", faiss_cfg(*defaults)),
        ("faiss Flat, BLAS kernel forced (1,024-row blocks)", faiss_cfg(0, defaults[1])),
        ("faiss Flat, BLAS forced, 16,384-row blocks", faiss_cfg(0, 16384)),
        ("numpy matmul + argpartition (issue's reference)", numpy_naive),
        ("BlasExactIndex (Snapshot.search, Flat on CPU)", lambda q: ours.search(q, K)),
    ]
    ref_s, ref_r = ours.search(queries[:256], K)
    fs, fr = index.search(queries[:256], K)
    same = float(np.mean(fr == ref_r))
    print(f"  BlasExactIndex vs faiss Flat on 256 queries: {same:.4f} of ranks identical, "
          f"max |sim diff| {float(np.max(np.abs(fs - ref_s))):.2e}")
    out = []
    from indexing import exact

    for b in batches:
        q = np.ascontiguousarray(queries[:b])
        row: dict[str, Any] = {"batch": b}
        # ours, split: its blocked SGEMM alone (the rest is top-k selection and merging)
        step = max(exact.MIN_BLOCK_ROWS, exact.BLOCK_SCORES // b)
        buf = np.empty((b, min(step, n)), dtype=np.float32)

        def sgemm_only(q: np.ndarray = q, step: int = step, buf: np.ndarray = buf) -> None:
            for s in range(0, n, step):
                e = min(n, s + step)
                np.matmul(q, x[s:e].T, out=buf[:, : e - s])

        # FAISS (OpenMP threads) and numpy (OpenBLAS threads) are timed in separate phases
        # with a pause between: each library's idle threads spin for a while after a call
        # and would slow the other down if the two were interleaved call by call.
        budget = 0.4 if n * d * b > 2e10 else 0.8
        secs: dict[str, float] = {}
        for family in ("faiss", "numpy"):
            fns: dict[str, Callable[[], Any]] = {
                name: (lambda fn=fn, q=q: fn(q))
                for name, fn in methods
                if name.startswith("faiss") == (family == "faiss")
                and not (name.startswith("numpy") and b * n > 2**28)  # (b, n) scores must fit
            }
            if family == "numpy":
                fns["sgemm_only"] = sgemm_only
            time.sleep(0.3)
            secs.update(interleaved(fns, min_time=budget))
        for name, _ in methods:
            row[name] = b / secs[name] if name in secs else float("nan")
        row["ours_sgemm_share"] = secs["sgemm_only"] / secs[methods[-1][0]]
        row["sgemm_gflops"] = 2.0 * b * n * d / secs["sgemm_only"] / 1e9
        out.append(row)
        flops = 2.0 * n * d
        parts = ", ".join(f"{r[:22]}: {row[r]:,.0f} q/s" for r, _ in methods)
        print(f"  batch {b:5d}: {parts}; ours {row[methods[-1][0]] * flops / 1e9:,.0f} GFLOP/s, "
              f"its SGEMM alone {row['sgemm_gflops']:,.0f} GFLOP/s")
    names = [m for m, _ in methods]
    headers = ["batch", *[f"{m} q/s" for m in names], "ours GFLOP/s",
               "same SGEMM alone GFLOP/s", "ours / SGEMM alone", "ours / faiss"]
    rows = []
    for r in out:
        g = r[names[-1]] * 2.0 * n * d / 1e9
        rows.append([r["batch"], *[r[m] for m in names], g, r["sgemm_gflops"],
                     f"{r['ours_sgemm_share']:.0%}", f"{r[names[-1]] / r[names[0]]:.1f}x"])
    print(table(headers, rows))
    for r in out:
        if r["batch"] == 1:
            gbs = r[names[-1]] * x.nbytes / 1e9
            print(f"  batch 1, ours: {gbs:,.1f} GB/s of database read "
                  f"({gbs / limits['read_gbs']:.0%} of the measured read bandwidth)")
    # small batches through the per-query SIMD path stream the database once per query
    print("  bytes streamed by faiss's per-query path (nq x database) per second:")
    for r in out:
        if r["batch"] * d < defaults[0]:
            gbs = r[names[0]] * x.nbytes / 1e9
            print(f"    batch {r['batch']:5d}: {gbs:,.1f} GB/s ({gbs / limits['read_gbs']:.0%} of the measured read bandwidth)")
    return out


def section_threads(x: np.ndarray, queries: np.ndarray, *, reps: int = 60) -> dict[str, float]:
    """One query at a time on an fp16 flat index (the fp16 kinds' small-batch path):
    FAISS with all its OpenMP threads against ``faiss_threads_for(1)``, in alternation.

    ``IndexScalarQuantizer.search`` opens an OpenMP region on every thread even for one
    query; on busy cores the idle thread's wake-up costs a scheduler slice."""
    import faiss

    from indexing.exact import faiss_threads_for

    d = x.shape[1]
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    times: dict[str, list[float]] = {"all threads": [], "faiss_threads_for(1)": []}
    for i in range(reps):
        q = np.ascontiguousarray(queries[i : i + 1])
        for name in times:
            t = time.perf_counter()
            if name == "all threads":
                index.search(q, K)
            else:
                with faiss_threads_for(1):
                    index.search(q, K)
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, v in times.items():
        ms = np.asarray(v[1:]) * 1e3
        out[f"{name} p50_ms"] = float(np.median(ms))
        out[f"{name} p90_ms"] = float(np.percentile(ms, 90))
        print(f"  fp16 flat, 1 query, {name}: p50 {out[f'{name} p50_ms']:.2f} ms, p90 {out[f'{name} p90_ms']:.2f} ms")
    return out


def section_kinds(
    x: np.ndarray,
    queries: np.ndarray,
    kinds: list[str],
    workdir: Path,
    *,
    single: int,
    batches: list[int],
    seed: int,
) -> list[dict[str, Any]]:
    from indexing.exact import BlasExactIndex, recall_at_k
    from indexing.snapshot import build_snapshot, load_snapshot

    n = x.shape[0]
    rng = np.random.default_rng(seed)
    meta = metadata(n, rng)
    truth = BlasExactIndex(x).search(queries, K)[1]
    wheres = {"20%": "bucket < 20", "2%": "bucket < 2"}
    buckets = np.asarray(meta.column("bucket"))
    filtered_truth = {
        label: BlasExactIndex(x).search(queries, K, allowed=buckets < int(w.split("<")[1]))[1]
        for label, w in wheres.items()
    }
    results = []
    raw = x.nbytes / n
    for kind in kinds:
        root = workdir / kind.replace(",", "_")
        stages: dict[str, float] = {}
        last = [time.perf_counter()]

        def progress(
            stage: str, done: int, total: int, stages: dict[str, float] = stages, last: list[float] = last
        ) -> None:
            now = time.perf_counter()
            stages[stage] = stages.get(stage, 0.0) + now - last[0]
            last[0] = now

        gc.collect()
        t0 = time.perf_counter()
        try:
            version = build_snapshot(root, x, meta, model_version="bench", kind=kind, progress=progress)
        except Exception as exc:
            print(f"  {kind}: build failed ({exc})")
            continue
        build_s = time.perf_counter() - t0
        vdir = root / "versions" / version
        disk_index = sum(p.stat().st_size for p in vdir.iterdir() if p.name in ("index.faiss", "embeddings.npy"))
        gc.collect()
        mem, meta_bytes, mem_faiss = load_memory(root)
        mem_index = max(mem - meta_bytes, 0)
        snap = load_snapshot(root, device="cpu")
        _, rows = snap.search(queries, K)
        rec = recall_at_k(truth, rows)
        lat = []
        for i in range(single):
            t = time.perf_counter()
            snap.search(queries[i : i + 1], K)
            lat.append(time.perf_counter() - t)
        lat_ms = np.asarray(lat) * 1e3
        thr = {b: b / timeit(lambda b=b, s=snap: s.search(queries[:b], K), min_time=1.0) for b in batches}
        filt = {}
        for label, where in wheres.items():
            _, frows = snap.search(queries, K, where=where)
            flat = []
            for i in range(min(single, 100)):
                t = time.perf_counter()
                snap.search(queries[i : i + 1], K, where=where)
                flat.append(time.perf_counter() - t)
            filt[label] = (recall_at_k(filtered_truth[label], frows), float(np.median(flat) * 1e3))
        rerank = {}
        if snap.rerank:  # lossy kinds: the exact re-scoring's depth against recall and time
            from indexing.snapshot import SearchParams

            for depth in (0, snap.rerank, 16):
                p = SearchParams(rerank=depth)
                _, rrows = snap.search(queries, K, params=p)
                one = timeit(lambda p=p, s=snap: s.search(queries[:1], K, params=p), min_time=0.5)
                rerank[depth] = (recall_at_k(truth, rrows), one * 1e3)
            print(f"  {kind}: rerank depth -> (recall@10, 1-query ms): {rerank}")
        sweep = {}  # per-query nprobe / efSearch against recall and time
        if snap._ivf is not None or snap._hnsw is not None:
            from indexing.snapshot import SearchParams

            if snap._ivf is not None:
                nlist = snap._ivf.nlist
                grid = [("nprobe", v) for v in (8, 32, 128, 512) if v <= nlist]
            else:
                grid = [("ef_search", v) for v in (32, 64, 128, 256, 512)]
            for name, value in grid:
                p = SearchParams(**{name: value})
                _, srows = snap.search(queries, K, params=p)
                one = timeit(lambda p=p, s=snap: s.search(queries[:1], K, params=p), min_time=0.5)
                sweep[f"{name}={value}"] = (recall_at_k(truth, srows), one * 1e3)
            print(f"  {kind}: per-query setting -> (recall@10, 1-query ms): {sweep}")
        r = {
            "kind": kind,
            "rerank": rerank,
            "sweep": sweep,
            "backend": snap.backend,
            "build_s": build_s,
            "train_s": stages.get("train", 0.0),
            "add_s": stages.get("add", 0.0),
            "mem_bytes_per_vector": mem_index / n,
            "mem_vs_raw": mem_index / x.nbytes,
            "faiss_index_bytes_per_vector": mem_faiss / n,
            "disk_bytes_per_vector": disk_index / n,
            "disk_vs_raw": disk_index / x.nbytes,
            "vectors_file": snap.manifest.get("vectors"),
            "recall": rec,
            "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)),
            # one query at a time: 1 / median latency (robust when the cores are shared),
            # and 1 / mean latency (what a lone client sees, outliers included)
            "single_qps": float(1e3 / np.median(lat_ms)),
            "single_qps_mean": float(1e3 / np.mean(lat_ms)),
            "batch_qps": thr,
            "filtered": filt,
        }
        results.append(r)
        print(f"  {kind:16s} built in {build_s:7.1f} s, {r['mem_bytes_per_vector']:7.1f} B/vector in memory "
              f"({r['mem_vs_raw']:.2f}x raw {raw:.0f} B), recall@10 {rec:.4f}, single {r['p50_ms']:.2f} ms p50")
        snap = None
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)
    flat = {r["kind"]: r for r in results}.get("Flat")
    headers = ["kind", "build s", "mem B/vec (x raw)", "FAISS index alone B/vec (x raw)", "disk B/vec (x raw)", "recall@10", "1-query p50 ms",
               "1-query q/s, 1/p50 (x Flat)", "1-query q/s, 1/mean (x Flat)", *[f"batch {b} q/s" for b in batches],
               *[f"filter {lab}: recall / p50 ms" for lab in wheres]]
    rows = []
    for r in results:
        rows.append([
            r["kind"], r["build_s"], f"{r['mem_bytes_per_vector']:,.0f} ({r['mem_vs_raw']:.2f})",
            f"{r['faiss_index_bytes_per_vector']:,.0f} ({r['faiss_index_bytes_per_vector'] / raw:.2f})",
            f"{r['disk_bytes_per_vector']:,.0f} ({r['disk_vs_raw']:.2f})", f"{r['recall']:.4f}",
            r["p50_ms"],
            *[f"{r[key]:,.0f} ({r[key] / flat[key]:.1f}x)" if flat else f"{r[key]:,.0f}"
              for key in ("single_qps", "single_qps_mean")],
            *[r["batch_qps"][b] for b in batches],
            *[f"{r['filtered'][lab][0]:.3f} / {r['filtered'][lab][1]:.2f}" for lab in wheres],
        ])
    print(table(headers, rows))
    return results


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    g.add_argument("--sizes", help="comma-separated NxD, e.g. 100000x256,1000000x256 (overrides the preset)")
    g.add_argument("--data", choices=["clustered", "random"], default="clustered")
    r = ap.add_argument_group("run")
    r.add_argument("--sections", default="limits,exact,kinds")
    r.add_argument(
        "--kinds",
        default=None,
        help="';'-separated factory strings (default: Flat;SQfp16;HNSW32;IVF<4 sqrt n>,Flat;IVF<..>,PQ<d/8>)",
    )
    r.add_argument("--queries", type=int, default=1000, help="queries for recall")
    r.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    r.add_argument("--batches", default="64,1024", help="batch sizes for throughput per kind")
    r.add_argument("--exact-batches", default=",".join(map(str, EXACT_BATCHES)))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workdir", type=Path, default=None, help="where snapshots are built (default: a temp folder)")
    r.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import faiss

    sizes = PRESETS[args.preset]
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]  # type: ignore[misc]
    sections = set(args.sections.split(","))
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load avg {' '.join(load)}; "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy {np.__version__}")
    report: dict[str, Any] = {"load_before": load, "data": args.data, "sizes": {}}
    tmp = tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir)
    try:
        for n, d in sizes:
            print(f"\n== {n:,} x {d} float32 ({n * d * 4 / 2**20:,.0f} MiB), data={args.data} ==")
            rng = np.random.default_rng(args.seed)
            t = time.perf_counter()
            x = embedding_like(n, d, rng, args.data)
            nq = max([args.queries, *(int(b) for b in args.exact_batches.split(",")),
                      *(int(b) for b in args.batches.split(","))])
            queries = embedding_like(nq, d, np.random.default_rng(args.seed + 1), args.data)
            print(f"  generated in {time.perf_counter() - t:.1f} s")
            entry: dict[str, Any] = {}
            limits = section_limits(x)
            entry["limits"] = limits
            if "exact" in sections:
                print("-- exact search (top-10), queries/s by batch size")
                entry["exact"] = section_exact(x, queries, limits, [int(b) for b in args.exact_batches.split(",")])
                print("-- one query on an fp16 flat index: OpenMP threads")
                entry["threads"] = section_threads(x, queries)
            if "kinds" in sections:
                print("-- index kinds")
                kinds = args.kinds.split(";") if args.kinds else default_kinds(n, d)
                entry["kinds"] = section_kinds(
                    x, queries, kinds, Path(tmp), single=args.single,
                    batches=[int(b) for b in args.batches.split(",")], seed=args.seed,
                )
            report["sizes"][f"{n}x{d}"] = entry
            del x
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/proc/loadavg") as fh:
        report["load_after"] = fh.read().split()[:3]
    print(f"\nload avg after: {' '.join(report['load_after'])}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
