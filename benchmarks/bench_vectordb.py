"""cohortsim's exact search beside milvus-lite and LanceDB on the same vectors and queries.

Same random unit vectors (default 100k x 256) and queries, inner product, k = 10; every
engine is checked for recall@k against exact ground truth (numpy brute force), so the
speeds are compared at equal recall (all exact: 1.00). Rows: cohortsim's exact backend
(``indexing.exact.BlasExactIndex``, what the service searches a Flat index with) at 1
BLAS thread (the server's default) and 2; milvus-lite with a FLAT index (exact);
LanceDB without an index (brute force, exact). One query at a time and batches of
``--batch``. Only the search is timed (no prognosis, no gRPC); nothing is asserted.

milvus-lite and lancedb are not project dependencies; run this in a separate venv:

    python3.11 -m venv /tmp/vdb && /tmp/vdb/bin/pip install numpy threadpoolctl lancedb pymilvus milvus-lite
    PYTHONPATH=. /tmp/vdb/bin/python benchmarks/bench_vectordb.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(search: Callable[[np.ndarray], np.ndarray], q: np.ndarray, m: int, seconds: float) -> tuple[float, float]:
    """(QPS, p50 ms per call) of ``search`` on batches of ``m`` queries for ~``seconds``."""
    search(q[:m])
    ms: list[float] = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds or len(ms) < 5:
        batch = q[(i * m) % (len(q) - m) :][:m]
        t = time.perf_counter()
        search(batch)
        ms.append((time.perf_counter() - t) * 1e3)
        i += 1
    return len(ms) * m / (time.perf_counter() - t0), float(np.median(ms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per row")
    ap.add_argument("--engines", default="cohortsim,milvus,lancedb")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engines = set(args.engines.split(","))
    from indexing.exact import recall_at_k

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((256, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q[:64] @ x.T), axis=1)[:, : args.k]
    print(f"{args.n} x {args.dim} float32, inner product, k={args.k}; {os.cpu_count()} cores; "
          f"loadavg before {loadavg()}")

    rows: list[tuple[str, float, float, float, float, float]] = []

    def run(name: str, search: Callable[[np.ndarray], np.ndarray]) -> None:
        found = np.concatenate([search(q[i : i + 1]) for i in range(64)])
        r = recall_at_k(truth, found)
        one_qps, one_ms = timed(search, q, 1, args.seconds)
        b_qps, b_ms = timed(search, q, args.batch, args.seconds)
        rows.append((name, r, one_qps, one_ms, b_qps, b_ms))
        print(f"  {name:32s} recall@{args.k} {r:.3f}  one at a time {one_qps:7.1f} QPS (p50 {one_ms:6.2f} ms)"
              f"  batch {args.batch}: {b_qps:7.1f} QPS", flush=True)

    if "cohortsim" in engines:
        from threadpoolctl import threadpool_limits

        from indexing.exact import BlasExactIndex

        exact = BlasExactIndex(x)
        for threads in (1, 2):
            with threadpool_limits(threads):
                run(f"cohortsim exact ({threads} BLAS thr)", lambda b: exact.search(b, args.k)[1])

    with tempfile.TemporaryDirectory() as tmp:
        if "milvus" in engines:
            from pymilvus import DataType, MilvusClient

            client = MilvusClient(str(Path(tmp) / "milvus.db"))
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=args.dim)
            index = client.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            client.create_collection("bench", schema=schema, index_params=index)
            t = time.perf_counter()
            for s in range(0, args.n, 10_000):
                client.insert("bench", [{"id": s + i, "vector": v} for i, v in enumerate(x[s : s + 10_000].tolist())])
            client.flush("bench")
            client.load_collection("bench")
            print(f"  milvus-lite: loaded in {time.perf_counter() - t:.1f} s")

            def milvus(b: np.ndarray) -> np.ndarray:
                res = client.search("bench", data=b.tolist(), limit=args.k, anns_field="vector",
                                    search_params={"metric_type": "IP"})
                return np.array([[hit["id"] for hit in hits] for hits in res])

            run("milvus-lite FLAT (exact)", milvus)
            client.close()

        if "lancedb" in engines:
            import lancedb
            import pyarrow as pa

            db = lancedb.connect(str(Path(tmp) / "lance"))
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), args.dim)
            table = db.create_table("bench", pa.table({"id": np.arange(args.n), "vector": vec}))

            def lance(b: np.ndarray) -> np.ndarray:
                out = []
                for v in b:  # one query per call: LanceDB's Python API searches one vector at a time
                    res = table.search(v).distance_type("dot").limit(args.k).select(["id"]).to_arrow()
                    out.append(res.column("id").to_numpy())
                return np.array(out)

            run("lancedb brute force (exact)", lance)

    base = next((r for r in rows if r[0].startswith("cohortsim exact (1")), None)
    if base is not None:
        print("\nratios to cohortsim exact (1 BLAS thread), same run:")
        for name, r, one_qps, _, b_qps, _ in rows:
            print(f"  {name:32s} recall {r:.3f}  one at a time {one_qps / base[2]:5.2f}x  batch {b_qps / base[4]:5.2f}x")
    print(f"loadavg after {loadavg()}")


if __name__ == "__main__":
    main()
