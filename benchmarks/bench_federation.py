"""Coordinator latency over N site processes vs each site's own latency (fan-out in parallel).

Builds N disjoint site indexes of random vectors, starts each as a ``cohortsim serve``
process, asks every site ``SearchSite`` directly (one query at a time), then asks a
coordinator ``SearchSimilar`` with the same queries. Prints p50 / p90 of each and the
coordinator's p50 as a ratio to the slowest site's p50 (the reference measured in the
same run). Nothing is asserted.

Conditions:

* ``--coordinator process`` (default): ``cohortsim serve --federate`` in its own process,
  as deployed; ``thread``: in this (the client's) process, sharing its interpreter lock
  with the client (what session 8 measured).
* ``--delay-ms D``: every site sits behind a proxy that delays each chunk by D ms each
  way (``delay_proxy.py``), standing in for sites on other hosts; the sites' own p50s are
  then measured through the same proxies, as the coordinator reaches them. 0: loopback.

    python benchmarks/bench_federation.py               # 4 sites x 20k x 64, loopback
    python benchmarks/bench_federation.py --sites 4 --n 10000 --delay-ms 1
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
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "enc-000000000000"


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "cohortsim"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def _start(cmd: list[str], log: Path, pattern: str, count: int = 1) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Start ``cmd``; wait until its log shows ``count`` lines matching ``pattern``
    (whose group 1 is a port)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        found = re.findall(pattern, log.read_text())
        if len(found) >= count:
            return proc, [int(p) for p in found[:count]]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not start:\n{log.read_text()}")


def start_site(index: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc, (port,) = _start([*_cli(), "serve", "--index", str(index), "--port", "0", "--device", "cpu"],
                           log, r"serving .* on [^\s:]+:(\d+)")
    return proc, port


def start_proxies(ports: list[int], delay_ms: float, log: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "delay_proxy.py"), "--delay-ms", str(delay_ms),
           *(f"127.0.0.1:{p}" for p in ports)]
    return _start(cmd, log, r"proxy [^\s:]+:(\d+) ->", count=len(ports))


def start_coordinator(sites_toml: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [*_cli(), "serve", "--federate", str(sites_toml), "--port", "0", "--site-deadline-s", "30"]
    proc, (port,) = _start(cmd,
                           log, r"coordinating .* on [^\s:]+:(\d+)")
    return proc, port


class ThreadCoordinator:
    """A coordinator on a thread of this process (``--coordinator thread``)."""

    def __init__(self, sites: list[Any], **kw: Any) -> None:
        self.sites, self.kw, self.port = sites, kw, 0
        self._ready = threading.Event()
        self._holder: dict[str, Any] = {}

    def __enter__(self) -> ThreadCoordinator:
        from service.coordinator import create_coordinator

        async def main_() -> None:
            server, self.port, fanout = await create_coordinator(self.sites, port=0, deadline_s=30, **self.kw)
            stop = asyncio.Event()
            self._holder.update(stop=stop, loop=asyncio.get_running_loop())
            await server.start()
            self._ready.set()
            await stop.wait()
            await server.stop(0)
            await fanout.close()

        self._thread = threading.Thread(target=lambda: asyncio.run(main_()), daemon=True)
        self._thread.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._holder["loop"].call_soon_threadsafe(self._holder["stop"].set)
        self._thread.join(10)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pcts(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 90))


def _timed(call: Any, requests: list[Any], warm: int = 10) -> list[float]:
    for r in requests[:warm]:
        call(r, timeout=60)
    out = []
    for r in requests:
        t0 = time.perf_counter()
        call(r, timeout=60)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--sites", type=int, default=4)
    g.add_argument("--n", type=int, default=20_000, help="vectors per site")
    g.add_argument("--dim", type=int, default=64)
    r = ap.add_argument_group("run")
    r.add_argument("--queries", type=int, default=200)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--coordinator", choices=("process", "thread"), default="process")
    r.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay to every site (0: loopback)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_search import make_metadata

    from indexing.snapshot import build_snapshot
    from service.api import cohortsim_pb2 as pb
    from service.api import cohortsim_pb2_grpc
    from service.federation import Site

    rng = np.random.default_rng(0)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            ports = []
            for s in range(args.sites):
                x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                build_snapshot(root / f"s{s}", x, make_metadata(args.n, rng), model_version=MODEL, kind="Flat")
                proc, port = start_site(root / f"s{s}", root / f"s{s}.log")
                procs.append(proc)
                ports.append(port)
            if args.delay_ms > 0:
                proxy, ports = start_proxies(ports, args.delay_ms, root / "proxy.log")
                procs.append(proxy)
            queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
            vectors = [pb.Vector(values=v.tolist(), model_version=MODEL) for v in queries]

            site_ms: list[list[float]] = []
            site_cpu: list[float] = []
            for port, proc in zip(ports, procs, strict=False):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
                    site_requests = [pb.SearchSiteRequest(embedding=v, k=args.k) for v in vectors]
                    _timed(stub.SearchSite, site_requests[:20], warm=0)
                    before = cpu_s(proc.pid)
                    site_ms.append(_timed(stub.SearchSite, site_requests, warm=0))
                    site_cpu.append((cpu_s(proc.pid) - before) / len(site_requests) * 1e3)

            requests = [pb.SearchSimilarRequest(embedding=v, k=args.k) for v in vectors]
            coord_cpu = float("nan")
            sites = [Site(f"s{i}", f"127.0.0.1:{p}") for i, p in enumerate(ports)]
            if args.coordinator == "process":
                toml = "".join(f'[[site]]\nname = "{s.name}"\naddress = "{s.address}"\n\n' for s in sites)
                (root / "sites.toml").write_text(toml)
                coord, coord_port = start_coordinator(root / "sites.toml", root / "coordinator.log")
                procs.append(coord)
                with grpc.insecure_channel(f"127.0.0.1:{coord_port}") as ch:
                    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
                    _timed(stub.SearchSimilar, requests[:20], warm=0)
                    before = cpu_s(coord.pid)
                    coord_ms = _timed(stub.SearchSimilar, requests, warm=0)
                    coord_cpu = (cpu_s(coord.pid) - before) / len(requests) * 1e3
            else:
                with ThreadCoordinator(sites) as tc, grpc.insecure_channel(f"127.0.0.1:{tc.port}") as ch:
                    coord_ms = _timed(cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch).SearchSimilar, requests)
        finally:
            stop_all(procs)

    where = f"{args.delay_ms:g} ms each way to every site (delay proxy)" if args.delay_ms > 0 else "loopback"
    print(f"machine: {platform.machine()}, {args.sites} sites x {args.n} x {args.dim}, k={args.k}, "
          f"{args.queries} queries one at a time; network: {where}; coordinator: {args.coordinator}")
    slowest = max(_pcts(t)[0] for t in site_ms)
    print(f"{'path':<32}{'p50 ms':>9}{'p90 ms':>9}{'p50 / slowest site':>20}{'CPU ms/query':>14}")
    for i, t in enumerate(site_ms):
        p50, p90 = _pcts(t)
        print(f"{f'site s{i} SearchSite':<32}{p50:>9.2f}{p90:>9.2f}{p50 / slowest:>20.2f}{site_cpu[i]:>14.2f}")
    p50, p90 = _pcts(coord_ms)
    print(f"{'coordinator SearchSimilar':<32}{p50:>9.2f}{p90:>9.2f}{p50 / slowest:>20.2f}")
    if coord_cpu == coord_cpu:  # measured (process mode)
        print(f"coordinator process CPU per query: {coord_cpu:.2f} ms (user + system, /proc; its own "
              f"cost when the sites run elsewhere: slowest site p50 + this + the network's round trip)")


if __name__ == "__main__":
    main()
