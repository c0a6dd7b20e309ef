"""The gRPC service under load: 1, 8 and 32 concurrent clients vs in-process search.

In one run, on the same random vectors and queries:

* in-process reference: ``search_similar`` (FAISS/BLAS exact search + prognosis) one
  query at a time, and batched (``m`` queries per call) at the batch sizes the server
  formed and at 8 / 32;
* the service in a separate process (micro-batching on, and off with ``--compare-off``),
  loaded by ``c`` asyncio clients on loopback (``AsyncCohortsimClient``), each sending
  ``--per-client`` queries back to back (bounded).

Prints QPS, p50 and p99 per row, the ratios the issue's targets name, the mean batch size
the server formed, and /proc/loadavg before and after (the cores are shared). Nothing is
asserted.

    python benchmarks/bench_service.py                 # 100k x 256 exact
    python benchmarks/bench_service.py --n 1000000     # 1M x 256 (about 1 GiB of vectors)
    python benchmarks/bench_service.py --preset small  # 10k x 64, a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# One BLAS thread per search (in-process reference and server alike, set before numpy
# loads; the spawned server inherits it): on 2 shared cores OpenBLAS's spinning threads
# made a 10k x 64 search 100x slower (11.6 ms vs 0.10 ms) while other jobs ran.
# Override by setting the variables before running.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import PRESETS, make_metadata  # noqa: E402


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def summary(ms: list[float], wall_s: float) -> tuple[float, float, float]:
    a = np.asarray(ms)
    return len(a) / wall_s, float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _server_main(index_dir: str, conn: Any, window_ms: float | None, workers: int, inflight: int) -> None:
    """Child process: serve ``index_dir``; answer "stats" / "stop" on ``conn``."""
    from service.server import create_server, server_batcher, shutdown

    async def main() -> None:
        server, port = await create_server(
            index_dir,
            port=0,
            device="cpu",
            batch_window_ms=window_ms,
            max_workers=workers,
            batch_inflight=inflight,
            watch_interval=None,
        )
        await server.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "stats":
                b = server_batcher(server)
                if b is None:
                    conn.send({})
                else:
                    st = b.stats
                    conn.send({"batches": st.batches, "requests": st.requests,
                               "largest": st.largest, "fallbacks": st.fallbacks})
            else:
                break
        await shutdown(server, 1.0)
        conn.send("stopped")

    asyncio.run(main())


class ServerProcess:
    def __init__(self, index_dir: Path, window_ms: float | None, workers: int, inflight: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(str(index_dir), child, window_ms, workers, inflight), daemon=True)

    def __enter__(self) -> ServerProcess:
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("the server did not start within 120 s")
        self.port = int(self.conn.recv())
        return self

    def stats(self) -> dict[str, int]:
        self.conn.send("stats")
        return dict(self.conn.recv())

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.send("stop")
            self.conn.poll(10)
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()


async def load(target: str, queries: np.ndarray, clients: int, per_client: int, k: int) -> tuple[list[float], float]:
    from service.client import AsyncCohortsimClient

    lat: list[float] = []
    async with AsyncCohortsimClient(target) as c:
        for v in queries[:4]:  # warm-up (connection, server caches)
            await c.search(embedding=v, k=k)

        async def worker(w: int) -> None:
            for i in range(per_client):
                v = queries[(w * per_client + i) % len(queries)]
                t = time.perf_counter()
                await c.search(embedding=v, k=k)
                lat.append((time.perf_counter() - t) * 1e3)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return lat, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ref")
    ap.add_argument("--n", type=int, help="number of vectors (overrides the preset)")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--per-client", type=int, default=0, help="queries per client (0: about 3 s of work per level)")
    ap.add_argument("--window-ms", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2, help="server worker threads (batches in flight)")
    ap.add_argument("--inflight", type=int, default=1, help="batches the server runs at once")
    ap.add_argument("--compare-off", action="store_true", help="also run the server with batching off")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, d = PRESETS[args.preset]
    n, d = args.n or n, args.dim or d
    levels = [int(c) for c in args.clients.split(",")]

    import faiss

    from indexing.query import search_similar
    from indexing.snapshot import build_snapshot, load_snapshot

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((512, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; loadavg before: {loadavg()}")
    print(f"cohort: {n} x {d} float32 exact (Flat), k={args.k}; batching window {args.window_ms} ms, "
          f"{args.workers} server workers, {args.inflight} batch(es) in flight")

    with tempfile.TemporaryDirectory() as tmp:
        build_snapshot(Path(tmp), x, make_metadata(n, rng), model_version="bench", kind="Flat")
        del x
        snap = load_snapshot(Path(tmp), device="cpu")

        def one_at_a_time(count: int) -> tuple[float, float, float]:
            for v in q[:5]:
                search_similar(snap, v[None], args.k)
            ms = []
            t0 = time.perf_counter()
            for v in q[5 : 5 + count]:
                t = time.perf_counter()
                search_similar(snap, v[None], args.k)
                ms.append((time.perf_counter() - t) * 1e3)
            return summary(ms, time.perf_counter() - t0)

        def batched(m: int, rounds: int) -> float:
            search_similar(snap, q[:m], args.k)
            t0 = time.perf_counter()
            for r in range(rounds):
                start = (r * m) % (len(q) - m)
                search_similar(snap, q[start : start + m], args.k)
            return rounds * m / (time.perf_counter() - t0)

        t = time.perf_counter()
        search_similar(snap, q[:1], args.k)
        per_q_s = max(time.perf_counter() - t, 1e-4)
        count = int(min(300, max(30, 3.0 / per_q_s)))
        ref_qps, ref_p50, ref_p99 = one_at_a_time(count)
        raw = []
        for v in q[5:45]:
            t = time.perf_counter()
            snap.search(v[None], args.k)
            raw.append((time.perf_counter() - t) * 1e3)
        print(f"\nin-process one at a time: {ref_qps:8.1f} QPS  p50 {ref_p50:7.2f} ms  p99 {ref_p99:7.2f} ms "
              f"(search only p50 {np.percentile(raw, 50):.2f} ms)")

        rows: list[tuple[str, int, float, float, float, dict[str, int]]] = []
        modes: list[tuple[str, float | None]] = [("batched", args.window_ms)]
        if args.compare_off:
            modes.append(("unbatched", None))
        for mode, window in modes:
            with ServerProcess(Path(tmp), window, args.workers, args.inflight) as srv:
                target = f"127.0.0.1:{srv.port}"
                for c in levels:
                    per = args.per_client or max(10, int(3.0 / per_q_s / max(1, c) * min(c, 8)))
                    per = min(per, 400)
                    before = srv.stats()
                    lat, wall = asyncio.run(load(target, q, c, per, args.k))
                    after = srv.stats()
                    delta = {key: after.get(key, 0) - before.get(key, 0) for key in ("batches", "requests")}
                    delta["largest"] = after.get("largest", 0)
                    delta["fallbacks"] = after.get("fallbacks", 0)
                    qps, p50, p99 = summary(lat, wall)
                    rows.append((mode, c, qps, p50, p99, delta))
                    print(f"service {mode:9s} {c:3d} clients: {qps:8.1f} QPS  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
                          f"  ({len(lat)} calls; batches {delta})", flush=True)

        formed = sorted({max(1, round(r[5]["requests"] / r[5]["batches"])) for r in rows if r[5].get("batches")})
        sizes = sorted(set(formed) | {8, 32})
        print("\nin-process batched search_similar (same queries):")
        best: dict[int, float] = {}
        for m in sizes:
            best[m] = batched(m, max(3, int(1.0 / per_q_s / m) + 1))
            print(f"  m={m:3d}: {best[m]:8.1f} QPS  ({best[m] / ref_qps:.2f}x one at a time)")

    print("\nratios (targets):")
    for mode, c, qps, p50, p99, delta in rows:
        mean_b = delta["requests"] / delta["batches"] if delta.get("batches") else 1.0
        mb = max(1, round(mean_b))
        line = (f"  {mode:9s} {c:3d} clients: QPS / in-process one-at-a-time {qps / ref_qps:5.2f}"
                f"  QPS / in-process batched(m={mb}) {qps / best.get(mb, batched(mb, 3)):5.2f}"
                f"  p99/p50 {p99 / p50:4.2f}")
        if c == 1:
            line += f"  p50 - in-process p50 {p50 - ref_p50:+.2f} ms"
        print(line)
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
