"""What security and governance cost, and what researchers still get.

1. Latency of one GetIndexInfo and one SearchSimilar over gRPC (one client, sequential
   calls, median and p90) with: nothing (the reference, measured in the same run),
   bearer tokens, tokens + audit log (no fsync / fsync), TLS + tokens + audit, and the
   researcher view; printed as ratios to the reference.
2. The differencing check: microseconds per check against a registry of R released sets.
   Audit throughput with fsync, 1 and 16 writers (group commit).
3. What researchers get: over a sequence of random queries on a synthetic cohort, the
   share answered (vs refused as differencing), survival points and label shares shown,
   for several k. Nothing is asserted.

    python benchmarks/bench_security.py                 # 20k studies x 128, 300 calls each
    python benchmarks/bench_security.py --studies 2000 --calls 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa

from indexing.snapshot import build_snapshot
from indexing.store import OUTCOME_SCHEMA, STUDY_SCHEMA, VOLUME_COLUMNS
from service import convert
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc as pbg
from service.auth import new_token
from service.background import BackgroundServer
from service.errors import ServiceError
from service.governance import Governance, ReleaseRegistry
from service.servicer import ServiceState, search
from service.tls import TlsConfig, channel_credentials


def make_cohort(n: int, dim: int, seed: int) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    clusters = max(4, n // 500)
    centres = rng.normal(size=(clusters, dim))
    cluster = rng.integers(0, clusters, n)
    emb = centres[cluster] + 0.6 * rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    studies = [f for f in STUDY_SCHEMA if f.name not in VOLUME_COLUMNS]
    outcomes = [f for f in OUTCOME_SCHEMA if f.name != "patient_id"]
    schema = pa.schema(studies + outcomes)
    hist = ["adeno", "squamous", "small-cell", "large-cell", "carcinoid"]
    p_hist = np.array([0.45, 0.3, 0.15, 0.07, 0.03])
    rows = []
    for i in range(n):
        known = rng.random() > 0.05
        rows.append(
            {
                "patient_id": f"P-{i // 2 if i < n // 5 else i:016x}",
                "study_uid": f"S-{i:024x}",
                "site": ["north", "south", "east"][i % 3],
                "modality": "CT",
                "manufacturer": ["GE", "SIEMENS", "PHILIPS", "CANON"][i % 4],
                "model": "m",
                "ingested_at": datetime(2024, 1, 1, tzinfo=UTC),
                "time": float(rng.exponential(10.0 * (1 + cluster[i] % 5))) if known else None,
                "event": bool(rng.random() < 0.7) if known else None,
                "labels": [("histology", str(rng.choice(hist, p=p_hist)))] if known else None,
                "values": [("volume_ml", float(rng.normal(20, 5)))] if known else None,
            }
        )
    return emb, pa.Table.from_pylist(rows, schema=schema)


def _time_calls(fn, calls: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    t = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    t.sort()
    return statistics.median(t), t[int(0.9 * (len(t) - 1))]


def bench_latency(index: Path, emb: np.ndarray, calls: int, root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
    from pki import TestCA  # test-time certificates (cryptography, a dev dependency)

    tokens = {"clinician": new_token(), "researcher": new_token()}
    token_file = root / "tokens.json"
    token_file.write_text(json.dumps({t: r for r, t in tokens.items()}))
    token_file.chmod(0o600)
    ca = TestCA(root / "pki")
    server = ca.issue("localhost", server=True)
    rng = np.random.default_rng(5)
    vectors = [emb[int(i)] + 0.3 * rng.normal(size=emb.shape[1]).astype(np.float32) for i in rng.integers(0, len(emb), 64)]

    configs = [
        ("no security (reference)", {}, None, None),
        ("bearer tokens", {"auth_tokens": token_file}, "clinician", None),
        ("tokens + audit (no fsync)", {"auth_tokens": token_file, "audit_log": "nofsync"}, "clinician", None),
        ("tokens + audit (fsync)", {"auth_tokens": token_file, "audit_log": "fsync"}, "clinician", None),
        ("TLS + tokens + audit (fsync)", {"auth_tokens": token_file, "audit_log": "fsync", "tls": "tls"}, "clinician", "tls"),
        ("researcher view, tokens", {"auth_tokens": token_file}, "researcher", None),
    ]
    print("\n1. latency per call over gRPC, one client, sequential (ms)")
    print(f"{'configuration':<32} {'info p50':>9} {'p90':>7} {'search p50':>11} {'p90':>7} {'ratio':>7}")
    ref = None
    for n, (name, opts, role, tls) in enumerate(configs):
        kw = dict(opts)
        if "audit_log" in kw:
            from service.audit import AuditLog

            kw["audit_log"] = AuditLog(root / f"audit-{n}.jsonl", fsync=kw["audit_log"] == "fsync")
        if kw.get("tls"):
            kw["tls"] = TlsConfig(server.cert, server.key)
        with BackgroundServer(index, device="cpu", **kw) as srv:
            if tls:
                channel = grpc.secure_channel(srv.target, channel_credentials(ca.cert_path))
            else:
                channel = grpc.insecure_channel(srv.target)
            stub = pbg.PatientSimilarityServiceStub(channel)
            md = [("authorization", f"Bearer {tokens[role]}")] if role else None
            it = iter(range(10**9))

            def info(stub=stub, md=md) -> None:  # type: ignore[no-untyped-def]
                stub.GetIndexInfo(pb.GetIndexInfoRequest(), metadata=md, timeout=30)

            def query(stub=stub, md=md, it=it) -> None:  # type: ignore[no-untyped-def]
                v = vectors[next(it) % len(vectors)]
                req = pb.SearchSimilarRequest(embedding=pb.Vector(values=v.tolist()), k=11)
                try:
                    stub.SearchSimilar(req, metadata=md, timeout=30)
                except grpc.RpcError as exc:  # researcher refusals are answers too
                    if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                        raise

            i50, i90 = _time_calls(info, calls)
            s50, s90 = _time_calls(query, calls)
            channel.close()
        ref = ref or s50
        print(f"{name:<32} {i50:9.3f} {i90:7.3f} {s50:11.3f} {s90:7.3f} {s50 / ref:7.2f}")


def bench_audit(root: Path, records: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.audit import AuditLog

    print(f"\n2a. audit log throughput, {records} records of a typical size (group commit)")
    rec = {"principal": "clinician-1", "role": "clinician", "method": "/x/SearchSimilar",
           "patients": [f"P-{i:016x}" for i in range(10)], "status": "OK"}
    for fsync in (False, True):
        for threads in (1, 16):
            log = AuditLog(root / f"bench-{fsync}-{threads}.jsonl", fsync=fsync)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _, log=log: log.append(rec), range(records)))
            dt = time.perf_counter() - t0
            log.close()
            print(f"  fsync={fsync!s:<5} {threads:2d} writers: {records / dt:9,.0f} records/s")


def bench_registry(patients: int, k: int) -> None:
    print(f"\n2. differencing check: one new {k}-patient set against R released sets "
          f"({patients} patients)")
    rng = np.random.default_rng(0)
    ids = [f"P-{i:016x}" for i in range(patients)]
    for size in (1_000, 10_000, 50_000):
        reg = ReleaseRegistry(11, limit=size + 10)
        for _ in range(size):
            reg.add(ids[j] for j in rng.choice(patients, k, replace=False))
        probes = [[ids[j] for j in rng.choice(patients, k, replace=False)] for _ in range(200)]
        t0 = time.perf_counter()
        for p in probes:
            reg.conflict(p)
        us = (time.perf_counter() - t0) / len(probes) * 1e6
        print(f"  R = {size:>6}: {us:9.1f} us per check")


def bench_utility(index: Path, emb: np.ndarray, queries: int) -> None:
    print(f"\n3. what researchers get: {queries} random queries in sequence, one registry per k")
    print(f"{'k':>5} {'answered':>9} {'refused':>8} {'curve pts':>10} {'horizons':>9} "
          f"{'events shown':>13} {'label shares':>13}")
    state = ServiceState.load(index, device="cpu")
    snap = state.snapshot
    assert snap is not None

    def run(q: convert.SearchQuery):
        return search(state, snap, q, max_k=max(q.k, 1000))

    for k in (11, 22, 55, 110, 220):
        rng = np.random.default_rng(k)
        gov = Governance()
        ok = refused = pts = hz = ev = shares = 0
        for _ in range(queries):
            v = emb[int(rng.integers(len(emb)))] + 0.3 * rng.normal(size=emb.shape[1])
            q = convert.SearchQuery("embedding", k, "", embedding=np.asarray(v, np.float32))
            try:
                r = gov.researcher_search(snap, q, run=run).response
            except ServiceError:
                refused += 1
                continue
            ok += 1
            pts += max(0, len(r.prognosis.survival) - 1)
            hz += sum(h.HasField("survival") for h in r.prognosis.at_horizons)
            ev += r.prognosis.events > 0
            shares += sum(len(d.shares) for d in r.prognosis.label_distributions)
        n = max(ok, 1)
        print(f"{k:5d} {ok / queries:9.0%} {refused / queries:8.0%} {pts / n:10.1f} "
              f"{hz / n:9.2f} {ev / n:13.0%} {shares / n:13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"cohort: {args.studies} studies x {args.dim}")
    emb, table = make_cohort(args.studies, args.dim, 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_snapshot(root / "index", emb, table, model_version="enc-bench", kind="Flat")
        bench_latency(root / "index", emb, args.calls, root)
        bench_audit(root, 2000)
        bench_registry(args.studies, 22)
        bench_utility(root / "index", emb, args.queries)


if __name__ == "__main__":
    main()
