"""Soak: steady mixed load on a real ``cohortsim serve`` process, then SIGTERM mid-load.

In one run:

* setup (in a temporary folder): a synthetic DICOM cohort of a few patients, a small
  untrained encoder, and an index of ``--n`` random vectors that carries the encoder, so
  the server answers both embedding and DICOM queries;
* ``cohortsim serve`` in its own process; open-loop load at fixed rates
  (``--embedding-rate`` and ``--dicom-rate`` calls per second, each call on its own task,
  so a slow answer does not slow the schedule) for ``--minutes``;
* every ``--sample-s`` seconds the server's resident memory (VmRSS), threads and open
  files are read from /proc;
* at the end, with calls still in flight (a burst of DICOM and embedding queries), the
  server gets SIGTERM: every call it had received must complete OK and it must exit 0.

Prints one row per ``--window-s`` window (calls, errors, p50 / p99 per query kind, RSS),
then the summary the issue asks for: resident memory growth after warm-up (mean RSS of
the last window vs the first window after warm-up; target < 5 %), error count (target 0),
and the SIGTERM drain. Nothing is asserted; ``--json`` writes everything to a file.

    python benchmarks/soak.py                       # 30 minutes
    python benchmarks/soak.py --minutes 10 --embedding-rate 10 --dicom-rate 0.2
    python benchmarks/soak.py --minutes 1 --warmup-min 0.25 --window-s 15   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One BLAS thread per search (set before numpy loads; the server process inherits it).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import make_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("embedding", "dicom")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- setup
@dataclass
class Setup:
    index: Path
    studies: list[list[bytes]]  # DICOM files of each query study
    queries: np.ndarray  # (q, d) float32 embedding queries
    dim: int


def make_setup(root: Path, *, n: int, dim: int, backbone: str, patients: int, seed: int) -> Setup:
    """Synthetic DICOM studies, an untrained encoder and an index of ``n`` random vectors."""
    from encoders.model import EncoderCard, create_encoder, save_encoder
    from encoders.synth import synth_cohort
    from indexing.snapshot import build_snapshot

    synth_cohort(root / "synth", patients=patients, seed=seed)
    folders = sorted((root / "synth" / "dicom").iterdir())
    studies = [[p.read_bytes() for p in sorted(f.rglob("*.dcm"))] for f in folders]
    encoder = create_encoder(backbone, embedding_dim=dim)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=seed), root / "model")
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    queries = rng.normal(size=(256, dim)).astype(np.float32)
    build_snapshot(
        root / "index",
        vectors,
        make_metadata(n, rng),
        model_version=card.version,
        encoder_dir=root / "model",
    )
    return Setup(root / "index", studies, queries, dim)


# --------------------------------------------------------------------------- server process
def cohortsim_command() -> list[str]:
    exe = Path(sys.executable).parent / "cohortsim"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


class ServerProcess:
    """``cohortsim serve --port 0`` in a child process; its log goes to ``log_path``."""

    def __init__(self, index: Path, log_path: Path, extra: list[str] | None = None) -> None:
        self.log_path = log_path
        env = dict(os.environ, COLUMNS="400")  # the "serving ... on host:port" line stays whole
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*cohortsim_command(), "serve", "--index", str(index), "--port", "0", "--device", "cpu",
             *(extra or [])],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 120.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(r"serving .* on [^\s:]+:(\d+)", self.log_path.read_text())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_path.read_text()}")
            time.sleep(0.1)
        raise RuntimeError("the server did not report its port within 120 s")

    def proc_stats(self) -> dict[str, int]:
        """VmRSS / VmHWM (KiB), threads and open files of the server process."""
        out: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
                elif key == "Threads":
                    out["threads"] = int(value)
            out["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            pass
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self._log.close()
        return code


# --------------------------------------------------------------------------- load
@dataclass
class Call:
    kind: str
    start: float  # seconds since the load began
    ms: float
    code: str  # "OK" or the gRPC status name
    end: float = 0.0


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0  # ticks dropped because too many calls were outstanding


async def one_call(stub: Any, kind: str, request: Any, t0: float, out: list[Call], timeout: float) -> Call:
    import grpc

    start = time.perf_counter()
    code = "OK"
    try:
        await stub.SearchSimilar(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    end = time.perf_counter()
    call = Call(kind, start - t0, (end - start) * 1e3, code, end - t0)
    out.append(call)
    return call


def requests_for(setup: Setup, k: int) -> dict[str, list[Any]]:
    from service.api import cohortsim_pb2 as pb

    emb = [
        pb.SearchSimilarRequest(embedding=pb.Vector(values=q.tolist()), k=k) for q in setup.queries
    ]
    dicom = [pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=files), k=k) for files in setup.studies]
    return {"embedding": emb, "dicom": dicom}


async def run_load(
    server: ServerProcess,
    setup: Setup,
    *,
    seconds: float,
    rates: dict[str, float],
    k: int,
    sample_s: float,
    max_outstanding: int,
    burst: tuple[int, int],
    timeout: float,
) -> tuple[Load, dict[str, Any]]:
    """Steady load for ``seconds``, then SIGTERM with a burst of calls in flight."""
    import grpc

    from service.api import cohortsim_pb2_grpc

    load = Load()
    reqs = requests_for(setup, k)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        t0 = time.perf_counter()
        tasks: set[asyncio.Task[Call]] = set()
        stop = asyncio.Event()

        async def schedule(kind: str, rate: float) -> None:
            if rate <= 0:
                return
            period, i = 1.0 / rate, 0
            while not stop.is_set():
                due = t0 + i * period
                delay = due - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
                i += 1
                if len(tasks) >= max_outstanding:
                    load.skipped += 1
                    continue
                pool = reqs[kind]
                task = asyncio.create_task(one_call(stub, kind, pool[i % len(pool)], t0, load.calls, timeout))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def sample() -> None:
            while not stop.is_set():
                st = server.proc_stats()
                load.samples.append({"t": time.perf_counter() - t0, **st})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), sample_s)

        workers = [asyncio.create_task(schedule(kind, rate)) for kind, rate in rates.items()]
        workers.append(asyncio.create_task(sample()))
        await asyncio.sleep(seconds)
        # SIGTERM mid-load: the scheduled calls still running, plus a burst, are in flight
        stop.set()
        await asyncio.gather(*workers)
        n_dicom, n_emb = burst
        burst_tasks = [
            asyncio.create_task(one_call(stub, "dicom", reqs["dicom"][i % len(reqs["dicom"])], t0, [], timeout))
            for i in range(n_dicom)
        ] + [
            asyncio.create_task(one_call(stub, "embedding", reqs["embedding"][i], t0, [], timeout))
            for i in range(n_emb)
        ]
        await asyncio.sleep(0.3)  # let the burst reach the server (DICOM queries take longer)
        in_flight = [t for t in (*tasks, *burst_tasks) if not t.done()]
        t_signal = time.perf_counter() - t0
        server.proc.send_signal(signal.SIGTERM)
        drained = await asyncio.gather(*in_flight, *[t for t in burst_tasks if t not in in_flight])
        exit_code = await asyncio.to_thread(server.proc.wait, 60)
        t_exit = time.perf_counter() - t0
        late = [c for c in drained if c.end > t_signal]
        drain = {
            "in_flight_at_sigterm": len(in_flight),
            "completed_after_sigterm": len(late),
            "errors": sum(c.code != "OK" for c in drained),
            "error_codes": sorted({c.code for c in drained if c.code != "OK"}),
            "last_answer_after_sigterm_s": round(max((c.end for c in late), default=t_signal) - t_signal, 3),
            "exit_code": exit_code,
            "exit_after_sigterm_s": round(t_exit - t_signal, 3),
        }
    return load, drain


# --------------------------------------------------------------------------- report
def pct(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q)) if ms else float("nan")


def windows(load: Load, seconds: float, window_s: float) -> list[dict[str, Any]]:
    rows = []
    for w in range(int(np.ceil(seconds / window_s - 1e-9))):
        lo, hi = w * window_s, min((w + 1) * window_s, seconds)
        row: dict[str, Any] = {"window": w, "start_s": lo}
        calls = [c for c in load.calls if lo <= c.start < hi]
        row["errors"] = sum(c.code != "OK" for c in calls)
        for kind in KINDS:
            ms = [c.ms for c in calls if c.kind == kind and c.code == "OK"]
            row[kind] = {"calls": len([c for c in calls if c.kind == kind]), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99)}
        rss = [s["VmRSS"] for s in load.samples if lo <= s["t"] < hi and "VmRSS" in s]
        row["rss_mib"] = float(np.mean(rss)) / 1024 if rss else float("nan")
        fds = [s["fds"] for s in load.samples if lo <= s["t"] < hi and "fds" in s]
        row["fds"] = int(max(fds)) if fds else -1
        thr = [s["threads"] for s in load.samples if lo <= s["t"] < hi and "threads" in s]
        row["threads"] = int(max(thr)) if thr else -1
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("duration")
    g.add_argument("--minutes", type=float, default=30.0, help="steady load duration")
    g.add_argument("--warmup-min", type=float, default=None, help="warm-up excluded from the memory growth (default: 10%% of the run, at least 1 window)")
    g.add_argument("--window-s", type=float, default=60.0, help="reporting window")
    g.add_argument("--sample-s", type=float, default=2.0, help="how often RSS is read")
    g = ap.add_argument_group("load")
    g.add_argument("--embedding-rate", type=float, default=20.0, help="embedding queries per second")
    g.add_argument("--dicom-rate", type=float, default=0.5, help="DICOM queries per second")
    g.add_argument("--k", type=int, default=10)
    g.add_argument("--max-outstanding", type=int, default=64, help="calls in flight before ticks are skipped")
    g.add_argument("--burst-dicom", type=int, default=4, help="DICOM queries in flight at SIGTERM")
    g.add_argument("--burst-embedding", type=int, default=32, help="embedding queries in flight at SIGTERM")
    g.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    g = ap.add_argument_group("index")
    g.add_argument("--n", type=int, default=20_000, help="vectors in the index")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--backbone", default="resnet10t")
    g.add_argument("--patients", type=int, default=4, help="synthetic DICOM query studies")
    g.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the windows, samples and summary here")
    ap.add_argument("--workdir", type=Path, help="keep the setup and the server log here (default: a temporary folder)")
    args = ap.parse_args()

    seconds = args.minutes * 60
    warmup = args.warmup_min * 60 if args.warmup_min is not None else max(args.window_s, 0.1 * seconds)
    with tempfile.TemporaryDirectory(prefix="cohortsim-soak-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        setup = make_setup(root, n=args.n, dim=args.dim, backbone=args.backbone, patients=args.patients, seed=args.seed)
        print(f"setup: {args.n} x {args.dim} Flat index, encoder {args.backbone}, {len(setup.studies)} DICOM studies "
              f"({time.perf_counter() - t:.1f} s); loadavg {loadavg()}", flush=True)
        server = ServerProcess(setup.index, root / "server.log")
        try:
            print(f"server pid {server.proc.pid} on port {server.port}; load for {args.minutes:g} min: "
                  f"{args.embedding_rate:g} embedding + {args.dicom_rate:g} DICOM queries/s", flush=True)
            load, drain = asyncio.run(
                run_load(
                    server, setup, seconds=seconds,
                    rates={"embedding": args.embedding_rate, "dicom": args.dicom_rate},
                    k=args.k, sample_s=args.sample_s, max_outstanding=args.max_outstanding,
                    burst=(args.burst_dicom, args.burst_embedding), timeout=args.timeout,
                )
            )
        finally:
            code = server.stop()
        log_tail = (root / "server.log").read_text().splitlines()[-5:]
    rows = windows(load, seconds, args.window_s)
    hdr = f"{'min':>5} {'emb':>6} {'p50':>7} {'p99':>7} {'dicom':>6} {'p50':>7} {'p99':>7} {'err':>4} {'RSS MiB':>8} {'fds':>4} {'thr':>4}"
    print(hdr)
    for r in rows:
        e, d = r["embedding"], r["dicom"]
        print(f"{r['start_s'] / 60:5.1f} {e['calls']:6d} {e['p50_ms']:7.2f} {e['p99_ms']:7.2f} {d['calls']:6d} "
              f"{d['p50_ms']:7.1f} {d['p99_ms']:7.1f} {r['errors']:4d} {r['rss_mib']:8.1f} {r['fds']:4d} {r['threads']:4d}")
    steady = [r for r in rows if r["start_s"] >= warmup - 1e-9]
    first, last = (steady[0], steady[-1]) if steady else (rows[0], rows[-1])
    rss_after = [s["VmRSS"] / 1024 for s in load.samples if s["t"] >= warmup and "VmRSS" in s]
    growth = (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"] * 100
    errors = sum(c.code != "OK" for c in load.calls)
    codes = sorted({c.code for c in load.calls if c.code != "OK"})
    p99s = {kind: [r[kind]["p99_ms"] for r in steady if r[kind]["calls"]] for kind in KINDS}
    summary = {
        "minutes": args.minutes,
        "warmup_min": warmup / 60,
        "calls": len(load.calls),
        "calls_by_kind": {kind: sum(c.kind == kind for c in load.calls) for kind in KINDS},
        "errors": errors,
        "error_codes": codes,
        "skipped_ticks": load.skipped,
        "rss_first_steady_window_mib": round(first["rss_mib"], 1),
        "rss_last_window_mib": round(last["rss_mib"], 1),
        "rss_growth_pct": round(growth, 2),
        "rss_max_after_warmup_mib": round(max(rss_after), 1) if rss_after else None,
        "p99_ms_range_steady": {k: [round(min(v), 2), round(max(v), 2)] if v else None for k, v in p99s.items()},
        "sigterm": drain,
        "final_exit_code": code,
        "loadavg_end": loadavg(),
    }
    print(json.dumps(summary, indent=1))
    print("server log tail:", *log_tail, sep="\n  ")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "windows": rows,
             "samples": load.samples},
            indent=1,
        ))


if __name__ == "__main__":
    main()
