"""Small uploads that would cost gigabytes (issue #24): four hostile DICOM uploads at once
beside a clinician's queries.

In one run, against one server process (default settings: the decoded-byte budget and
the DICOM calls per caller on):

1. **unloaded**: a clinician sends embedding queries at a steady rate; p50 / p99;
2. **loaded**: the same clinician queries while four researcher clients, each in its own
   process, send back to back a 20-file deflated study (2048 x 2048 zero slices: about 160 KB on the wire,
   about 480 MiB decoded as the red team built it, 1.9 GB with 4096 x 4096 slices) or an
   RLE study of the same shape.

Prints the server's RSS before, its peak RSS (``VmHWM``) during the load and that of each
decode worker process (``--decode-workers``; 0 decodes on the server's threads), the clinician's
p50 / p99 in both phases and their ratio (the issue's target: p99 < 2x unloaded, peak RSS
< 2 GiB, 0 failed clinician calls), and the hostile calls' outcomes by reason. Nothing is
asserted.

    python benchmarks/bench_hostile_uploads.py            # 20 s per phase, 4 attackers
    python benchmarks/bench_hostile_uploads.py --seconds 5 --side 1024   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERVER = """
import asyncio, json, sys
from service.config import ServeConfig, SecurityConfig
from service.server import serve
cfg = ServeConfig(port=0, device="cpu", watch_interval_s=None, **json.loads(sys.argv[3]))
sec = SecurityConfig(auth_tokens=sys.argv[2])
asyncio.run(serve(sys.argv[1], cfg, sec, ready=lambda p: print(f"PORT {p}", flush=True)))
"""


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the server's decode workers)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def worker_peaks(pid: int, seen: dict[int, int]) -> None:
    """Record the peak RSS (``VmHWM``) of each child of ``pid`` into ``seen``."""
    for child in children(pid):
        with contextlib.suppress(OSError):
            seen[child] = max(seen.get(child, 0), proc_status(child, "VmHWM"))


def proc_status(pid: int, key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build(root: Path) -> tuple[Path, Path, bytes]:
    """An index with a tiny encoder, tokens (clinician, researcher) and a template slice."""
    from encoders.dicom import read_study
    from encoders.model import EncoderCard, create_encoder, embed, save_encoder
    from encoders.preprocess import preprocess
    from encoders.synth import synth_cohort
    from indexing.snapshot import build_snapshot
    from service.auth import hash_token, new_token

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
    from conftest import make_cohort  # the seeded 200-study cohort table of the tests

    synth_cohort(root / "synth", patients=2, seed=1)
    folder = sorted((root / "synth" / "dicom").iterdir())[0]
    files = sorted(folder.rglob("*.dcm"))
    encoder = create_encoder("test_resnet", embedding_dim=16)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    own = embed(encoder, preprocess(read_study(files), card.input)[None])[0]
    emb = np.random.default_rng(3).normal(size=(200, 16)).astype(np.float32)
    emb[0] = own
    _, table = make_cohort(seed=3)
    build_snapshot(root / "index", emb, table, model_version=card.version, encoder_dir=root / "model")
    tokens = {role: new_token() for role in ("clinician", "researcher")}
    path = root / "tokens.json"
    path.write_text(json.dumps({hash_token(t): {"role": r, "id": f"{r}-1"} for r, t in tokens.items()}))
    path.chmod(0o600)
    (root / "tokens.plain").write_text(json.dumps(tokens))
    import pydicom

    by_series: dict[str, list[Path]] = {}
    for f in files:
        by_series.setdefault(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID, []).append(f)
    return root / "index", path, max(by_series.values(), key=len)[0].read_bytes()


def hostile_study(template: bytes, n: int, side: int, kind: str) -> list[bytes]:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

    base = pydicom.dcmread(io.BytesIO(template))
    series = generate_uid()
    out = []
    for i in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.ImagePositionPatient, ds.InstanceNumber = [0.0, 0.0, float(i)], i + 1
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        pixels = np.zeros((side, side), np.int16)
        ds.PixelData = pixels.tobytes()
        if kind == "rle":
            ds.compress(RLELossless, pixels)
        else:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def clinician(target: str, token: str, seconds: float, rate: float) -> tuple[list[float], int]:
    import grpc

    from service.api import cohortsim_pb2 as pb
    from service.api import cohortsim_pb2_grpc

    md = [("authorization", f"Bearer {token}")]
    rng = np.random.default_rng(0)
    lat: list[float] = []
    failed = 0
    with grpc.insecure_channel(target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        end = time.monotonic() + seconds
        nxt = time.monotonic()
        while time.monotonic() < end:
            req = pb.SearchSimilarRequest(embedding=pb.Vector(values=rng.normal(size=16).tolist()), k=10)
            t0 = time.perf_counter()
            try:
                stub.SearchSimilar(req, metadata=md, timeout=5)
                lat.append((time.perf_counter() - t0) * 1e3)
            except grpc.RpcError:
                failed += 1
            nxt += 1.0 / rate
            time.sleep(max(0.0, nxt - time.monotonic()))
    return lat, failed


def attacker_process(target: str, token: str, files: list[bytes], seconds: float, queue: Any) -> None:
    """One attacker in its own process (so its client work never slows the clinician's
    client): uploads back to back for ``seconds``, then puts its outcomes on ``queue``."""
    os.nice(19)  # stands in for a remote machine: the attack's own client work would
    # otherwise take the two shared cores from the server it attacks
    stop = threading.Event()
    out: Counter = Counter()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    attacker(target, token, files, stop, out)
    queue.put(dict(out))


def attacker(target: str, token: str, files: list[bytes], stop: threading.Event, out: Counter) -> None:
    import grpc
    from grpc_status import rpc_status

    from service.api import cohortsim_pb2 as pb
    from service.api import cohortsim_pb2_grpc

    md = [("authorization", f"Bearer {token}")]
    req = pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=files), k=11)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        while not stop.is_set():
            try:
                stub.SearchSimilar(req, metadata=md, timeout=60)
                out["OK"] += 1
            except grpc.RpcError as err:
                reason = err.code().name
                status = rpc_status.from_call(err)
                if status is not None:
                    from google.rpc import error_details_pb2

                    for d in status.details:
                        ei = error_details_pb2.ErrorInfo()
                        if d.Unpack(ei):
                            reason = ei.reason
                out[reason] += 1


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(a, q)) if a else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--rate", type=float, default=5.0, help="clinician queries per second")
    ap.add_argument("--attackers", type=int, default=4)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--side", type=int, default=2048, help="rows = columns of each hostile slice")
    ap.add_argument("--kind", choices=["deflate", "rle"], default="deflate")
    cfg = ap.add_argument_group("server settings (default: ServeConfig's)")
    cfg.add_argument("--decode-workers", type=int, default=None,
                     help="decode worker processes (0: decode on the server's threads)")
    cfg.add_argument("--cooldown-s", type=float, default=None, help="dicom_cooldown_s")
    args = ap.parse_args()
    settings: dict[str, Any] = {}
    if args.decode_workers is not None:
        settings["decode_workers"] = args.decode_workers
    if args.cooldown_s is not None:
        settings["dicom_cooldown_s"] = args.cooldown_s

    with tempfile.TemporaryDirectory(prefix="cohortsim-hostile-") as tmp:
        root = Path(tmp)
        index, token_file, template = build(root)
        tokens = json.loads((root / "tokens.plain").read_text())
        study = hostile_study(template, args.files, args.side, args.kind)
        print(f"hostile study: {args.files} {args.kind} files of {args.side}x{args.side}, "
              f"{sum(map(len, study)) / 1e3:.0f} kB on the wire, "
              f"{args.files * args.side**2 * 6 / 2**20:.0f} MiB decoded (int16 + float32)")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        print(f"server settings: {settings or 'defaults'}")
        srv = subprocess.Popen([sys.executable, "-c", SERVER, str(index), str(token_file),
                                json.dumps(settings)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            assert srv.stdout is not None
            line = srv.stdout.readline()
            target = f"127.0.0.1:{int(line.split()[1])}"
            # the decode workers start beside the serving: measure once they exist
            from service.config import ServeConfig

            want = settings.get("decode_workers", ServeConfig().decode_workers)
            end = time.monotonic() + 120
            while want and len(children(srv.pid)) < want + 1 and time.monotonic() < end:
                time.sleep(0.2)  # + 1: multiprocessing's resource tracker
            time.sleep(3.0 if want else 0.0)  # their imports
            clinician(target, tokens["clinician"], 2.0, args.rate)  # warm up
            rss0 = proc_status(srv.pid, "VmRSS")
            base, base_failed = clinician(target, tokens["clinician"], args.seconds, args.rate)
            hwm0 = proc_status(srv.pid, "VmHWM")
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [ctx.Process(target=attacker_process,
                                 args=(target, tokens["researcher"], study, args.seconds + 3.0, queue))
                     for _ in range(args.attackers)]
            for p in procs:
                p.start()
            time.sleep(2.0)
            peaks: dict[int, int] = {}
            watching = threading.Event()

            def watch() -> None:  # workers replaced during the load keep their peak here
                while not watching.wait(0.5):
                    worker_peaks(srv.pid, peaks)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            loaded, loaded_failed = clinician(target, tokens["clinician"], args.seconds, args.rate)
            outcomes: Counter = Counter()
            for _ in procs:
                outcomes.update(queue.get(timeout=120))
            for p in procs:
                p.join()
            hwm = proc_status(srv.pid, "VmHWM")
            watching.set()
            watcher.join()
            worker_peaks(srv.pid, peaks)
        finally:
            srv.terminate()
            srv.wait(timeout=30)
    print(f"server RSS before: {rss0 / 2**20:.0f} MiB; peak before load {hwm0 / 2**20:.0f} MiB; "
          f"peak during load {hwm / 2**20:.0f} MiB (target < 2048)")
    print(f"child processes seen (decode workers, resource tracker): {len(peaks)}, peak RSS each (MiB): "
          f"{sorted(round(v / 2**20) for v in peaks.values())}; server + children's peaks "
          f"{(hwm + sum(peaks.values())) / 2**20:.0f} MiB")
    print(f"clinician unloaded: {len(base)} ok, {base_failed} failed, p50 {pct(base, 50):.1f} ms, "
          f"p99 {pct(base, 99):.1f} ms")
    print(f"clinician loaded:   {len(loaded)} ok, {loaded_failed} failed, p50 {pct(loaded, 50):.1f} ms, "
          f"p99 {pct(loaded, 99):.1f} ms")
    print(f"p99 loaded / unloaded: {pct(loaded, 99) / pct(base, 99):.2f} (target < 2)")
    print(f"hostile calls by outcome: {dict(outcomes)}")
    print(f"loadavg: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
