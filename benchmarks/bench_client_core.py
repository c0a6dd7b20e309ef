"""What the blocking client's event-loop thread costs per call.

``CohortsimClient`` runs ``AsyncCohortsimClient`` on an event loop in a thread of its own
(one client core). The reference is what a blocking client without that hop does: the
sync gRPC stub plus the same conversion to dataclasses. Both call one in-process server
in turns, so they share the machine's state; the figure is the ratio of their medians.
Nothing is asserted.

    python benchmarks/bench_client_core.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()

    import grpc

    from indexing.snapshot import build_snapshot
    from service.api import cohortsim_pb2_grpc
    from service.background import BackgroundServer
    from service.client import CohortsimClient, build_search_request, search_result_from_proto

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_search import make_metadata

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    print(f"machine: {platform.node()} {platform.machine()}; {args.n} x {args.dim}, k=10, "
          f"{args.calls} calls of each kind, in turns")
    with tempfile.TemporaryDirectory() as tmp:
        build_snapshot(Path(tmp), x, make_metadata(args.n, rng), model_version="bench", kind="Flat")
        with (
            BackgroundServer(Path(tmp)) as server,
            CohortsimClient(server.target) as client,
            grpc.insecure_channel(server.target) as channel,
        ):
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
            raw_ms: list[float] = []
            core_ms: list[float] = []
            for i in range(args.calls + 50):
                v = x[i % args.n]
                t = time.perf_counter()
                search_result_from_proto(stub.SearchSimilar(build_search_request(embedding=v, k=10), timeout=30))
                raw = (time.perf_counter() - t) * 1e3
                t = time.perf_counter()
                client.search(embedding=v, k=10)
                core = (time.perf_counter() - t) * 1e3
                if i >= 50:  # warm-up
                    raw_ms.append(raw)
                    core_ms.append(core)
    print(f"{'path':44s} {'p50 ms':>8s} {'p90 ms':>8s} {'p50 / ref':>10s}")
    ref = float(np.median(raw_ms))
    for name, ms in (("sync stub + conversion (reference)", raw_ms), ("CohortsimClient (async core on a loop thread)", core_ms)):
        print(f"{name:44s} {np.median(ms):8.3f} {np.percentile(ms, 90):8.3f} {np.median(ms) / ref:10.2f}")


if __name__ == "__main__":
    main()
