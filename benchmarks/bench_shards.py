"""Throughput of one index served as N shards behind a shard-mode coordinator vs the
same vectors served as one index (the reference, measured in the same run).

Builds one cohort of random vectors, publishes it once unsharded and once split by
patient into ``--shards`` indexes (:func:`indexing.shards.publish_shards`), then for each
layout starts its processes (``cohortsim serve`` for the index; N ``cohortsim serve``
shards plus ``cohortsim serve --federate shards.toml`` for the sharded one), sends
``--queries`` SearchSimilar calls with ``--concurrency`` in flight from this process and
prints queries per second and latency percentiles. Only one layout runs at a time.
Nothing is asserted.

    python benchmarks/bench_shards.py                       # 200k x 64, 4 shards
    python benchmarks/bench_shards.py --n 50000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "enc-000000000000"


async def _drive(port: int, requests: list, concurrency: int) -> tuple[float, list[float]]:
    """``(queries per second, latencies ms)`` of ``requests`` with ``concurrency`` in flight."""
    from service.api import cohortsim_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        for r in requests[:20]:  # warm-up
            await stub.SearchSimilar(r, timeout=120)
        queue = list(reversed(requests))
        lat: list[float] = []

        async def worker() -> None:
            while queue:
                r = queue.pop()
                t0 = time.perf_counter()
                await stub.SearchSimilar(r, timeout=120)
                lat.append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - t0), lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--n", type=int, default=200_000, help="vectors in the cohort")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--shards", type=int, default=4)
    r = ap.add_argument_group("run")
    r.add_argument("--queries", type=int, default=400)
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_federation import _cli, _start, cpu_s, start_site, stop_all
    from bench_search import make_metadata

    from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
    from indexing.shards import publish_shards
    from indexing.snapshot import build_snapshot, current_version, read_manifest
    from service.api import cohortsim_pb2 as pb

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = make_metadata(args.n, rng)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    requests = [
        pb.SearchSimilarRequest(embedding=pb.Vector(values=v.tolist(), model_version=MODEL), k=args.k)
        for v in queries
    ]
    results: dict[str, tuple[float, list[float], float, list[float], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        evaluation = evaluate_prognosis(x, meta)
        build_snapshot(root / "one", x, meta, model_version=MODEL, extra_manifest={EVALUATION_KEY: evaluation})
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards = publish_shards(x, meta, root / "sharded", args.shards, model_version=MODEL)
        t_sharded = time.perf_counter() - t0
        sizes = []
        for label in ("one index", f"{args.shards} shards"):
            procs: list[subprocess.Popen[bytes]] = []
            try:
                if label == "one index":
                    proc, port = start_site(root / "one", root / "one.log")
                    procs.append(proc)
                else:
                    toml = 'mode = "shards"\n\n'
                    for i, (folder, _) in enumerate(shards):
                        proc, p = start_site(folder, root / f"shard{i}.log")
                        procs.append(proc)
                        toml += f'[[site]]\nname = "shard-{i}"\naddress = "127.0.0.1:{p}"\nindex = "{folder}"\n\n'
                        sizes.append(int(read_manifest(folder, current_version(folder) or "")["num_studies"]))
                    (root / "shards.toml").write_text(toml)
                    cmd = [*_cli(), "serve", "--federate", str(root / "shards.toml"), "--port", "0",
                           "--site-deadline-s", "60"]
                    proc, (port,) = _start(
                        cmd,
                        root / "coordinator.log", r"coordinating .* on [^\s:]+:(\d+)",
                    )
                    procs.append(proc)
                before = sum(cpu_s(p.pid) for p in procs)
                qps, lat = asyncio.run(_drive(port, requests, args.concurrency))
                cpu = (sum(cpu_s(p.pid) for p in procs) - before) / (len(requests) + 20) * 1e3
                qps1, lat1 = asyncio.run(_drive(port, requests[: max(50, args.queries // 4)], 1))
                results[label] = (qps, lat, qps1, lat1, cpu)
            finally:
                stop_all(procs)

    print(f"machine: {platform.machine()}, cohort {args.n} x {args.dim} (Flat), {args.shards} shards of "
          f"{sizes} studies, k={args.k}; {args.queries} queries with {args.concurrency} in flight, then one at a time")
    print(f"build: one index {t_one:.1f} s, {args.shards} shards {t_sharded:.1f} s (evaluation included in both)")
    ref = results["one index"][0]
    ref_cpu = results["one index"][4]
    print(f"{'layout':<14}{'q/s':>9}{'/ one index':>13}{'p50 ms':>9}{'p90 ms':>9}{'1-at-a-time p50 ms':>21}"
          f"{'CPU ms/query':>14}{'/ one index':>13}")
    for label, (qps, lat, _qps1, lat1, cpu) in results.items():
        print(f"{label:<14}{qps:>9.1f}{qps / ref:>13.2f}{np.percentile(lat, 50):>9.2f}"
              f"{np.percentile(lat, 90):>9.2f}{np.percentile(lat1, 50):>21.2f}{cpu:>14.2f}{cpu / ref_cpu:>13.2f}")
    print("CPU ms/query: user + system time of the layout's server processes during the concurrent run "
          "(warm-up included), per query; on a machine shared with other work, q/s depends on the share "
          "of the cores the layout's processes get, CPU per query does not")


if __name__ == "__main__":
    main()
