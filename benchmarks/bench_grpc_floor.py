"""The round-trip floor of Python gRPC on this machine: what an empty call costs.

A ``grpc.aio`` server with only the health service runs in its own process; a blocking
stub in this process calls ``Check`` back to back and the p50 is printed, without
interceptors and with cohortsim's metrics interceptor (``service.metrics``), in
alternating order, with the server process's CPU per call (``/proc``; the clock ticks
are 10 ms, so use ``--calls`` of 5,000 or more). The 1-client target of
``bench_service.py`` (the service adds at most 0.5 ms over an in-process search) has to
fit above this floor. Nothing is asserted.

    python benchmarks/bench_grpc_floor.py --calls 10000 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _server(with_metrics: bool, ports: Any) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from service.metrics import MetricsInterceptor, ServerMetrics

    async def main() -> None:
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(ServerMetrics())] if with_metrics else []
        )
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text()
    fields = fields[fields.rindex(")") + 2 :]
    utime, stime = fields.split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def floor_ms(with_metrics: bool, calls: int) -> tuple[float, float]:
    """p50 of ``calls`` health Checks (the first fifth is warm-up), ms, and the server
    process's CPU per call over the timed ones (all its threads), us."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ports: Any = mp.Queue()
    proc = mp.Process(target=_server, args=(with_metrics, ports), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            lat = []
            warm = calls // 5
            for i in range(calls):
                if i == warm:
                    cpu0 = _cpu_s(proc.pid)
                t = time.perf_counter()
                stub.Check(request)
                lat.append((time.perf_counter() - t) * 1e3)
            cpu_us = (_cpu_s(proc.pid) - cpu0) / (calls - warm) * 1e6
    finally:
        proc.terminate()
        proc.join()
    return statistics.median(lat[warm:]), cpu_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    mp.set_start_method("spawn", force=True)
    for r in range(args.rounds):
        order = (True, False) if r % 2 else (False, True)
        got = {m: floor_ms(m, args.calls) for m in order}
        print(f"round {r + 1}: empty call p50 {got[False][0]:.3f} ms bare grpc.aio, "
              f"{got[True][0]:.3f} ms with the metrics interceptor; server CPU per call "
              f"{got[False][1]:.0f} us bare, {got[True][1]:.0f} us with it", flush=True)


if __name__ == "__main__":
    main()
