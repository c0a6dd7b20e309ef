"""Coordinator latency over N site processes vs each site's own latency (fan-out in parallel).

Builds N disjoint site indexes of random vectors, starts each as a ``cohortsim serve``
process on loopback, asks every site ``SearchSite`` directly (one query at a time), then
asks a coordinator (in this process) ``SearchSimilar`` with the same queries. Prints p50 /
p90 of each and the coordinator's p50 as a ratio to the slowest site's p50 (the reference
measured in the same run). Nothing is asserted.

    python benchmarks/bench_federation.py               # 4 sites x 20k x 64
    python benchmarks/bench_federation.py --sites 3 --n 5000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "enc-000000000000"


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "cohortsim"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def _start_site(index: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*_cli(), "serve", "--index", str(index), "--port", "0", "--device", "cpu"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if m := re.search(r"serving .* on [^\s:]+:(\d+)", log.read_text()):
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"site did not start:\n{log.read_text()}")


def _pcts(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--sites", type=int, default=4)
    g.add_argument("--n", type=int, default=20_000, help="vectors per site")
    g.add_argument("--dim", type=int, default=64)
    r = ap.add_argument_group("run")
    r.add_argument("--queries", type=int, default=200)
    r.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_search import make_metadata

    from indexing.snapshot import build_snapshot
    from service.api import cohortsim_pb2 as pb
    from service.api import cohortsim_pb2_grpc
    from service.coordinator import create_coordinator
    from service.federation import Site

    rng = np.random.default_rng(0)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ports = []
        try:
            for s in range(args.sites):
                x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                build_snapshot(root / f"s{s}", x, make_metadata(args.n, rng), model_version=MODEL, kind="Flat")
                proc, port = _start_site(root / f"s{s}", root / f"s{s}.log")
                procs.append(proc)
                ports.append(port)
            queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)

            def request(v: np.ndarray) -> pb.SearchSiteRequest:
                return pb.SearchSiteRequest(embedding=pb.Vector(values=v.tolist(), model_version=MODEL), k=args.k)

            site_ms: list[list[float]] = []
            for port in ports:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
                    for v in queries[:10]:
                        stub.SearchSite(request(v), timeout=60)
                    times = []
                    for v in queries:
                        t0 = time.perf_counter()
                        stub.SearchSite(request(v), timeout=60)
                        times.append((time.perf_counter() - t0) * 1e3)
                site_ms.append(times)

            ready = threading.Event()
            holder: dict[str, object] = {}

            def run_coordinator() -> None:
                async def main_() -> None:
                    sites = [Site(f"s{i}", f"127.0.0.1:{p}") for i, p in enumerate(ports)]
                    server, port, fanout = await create_coordinator(sites, port=0, deadline_s=30)
                    stop = asyncio.Event()
                    holder.update(port=port, stop=stop, loop=asyncio.get_running_loop())
                    await server.start()
                    ready.set()
                    await stop.wait()
                    await server.stop(0)
                    await fanout.close()

                asyncio.run(main_())

            thread = threading.Thread(target=run_coordinator, daemon=True)
            thread.start()
            ready.wait(60)
            coord_ms = []
            with grpc.insecure_channel(f"127.0.0.1:{holder['port']}") as ch:
                stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
                for v in queries[:10]:
                    stub.SearchSimilar(pb.SearchSimilarRequest(embedding=pb.Vector(values=v.tolist(), model_version=MODEL), k=args.k), timeout=60)
                for v in queries:
                    t0 = time.perf_counter()
                    stub.SearchSimilar(pb.SearchSimilarRequest(embedding=pb.Vector(values=v.tolist(), model_version=MODEL), k=args.k), timeout=60)
                    coord_ms.append((time.perf_counter() - t0) * 1e3)
            loop = holder["loop"]
            loop.call_soon_threadsafe(holder["stop"].set)  # type: ignore[attr-defined]
            thread.join(10)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(20)

    print(f"machine: {platform.machine()}, {args.sites} sites x {args.n} x {args.dim}, k={args.k}, "
          f"{args.queries} queries one at a time")
    slowest = max(_pcts(t)[0] for t in site_ms)
    print(f"{'path':<32}{'p50 ms':>9}{'p90 ms':>9}{'p50 / slowest site':>20}")
    for i, t in enumerate(site_ms):
        p50, p90 = _pcts(t)
        print(f"{f'site s{i} SearchSite':<32}{p50:>9.2f}{p90:>9.2f}{p50 / slowest:>20.2f}")
    p50, p90 = _pcts(coord_ms)
    print(f"{'coordinator SearchSimilar':<32}{p50:>9.2f}{p90:>9.2f}{p50 / slowest:>20.2f}")


if __name__ == "__main__":
    main()
