"""PACS inflow throughput, each figure a ratio to a reference measured in the same run.

1. C-STORE receive: dcmtk ``storescu`` sends the same files to dcmtk's own ``storescp``
   (reference: writes each file, no fsync; 128 KiB PDUs, no host lookup, TCP_NODELAY) and to cohortsim's listener
   (:class:`service.pacs.listener.StoreListener`: read the study UID, write the data set
   as sent, fsync, rename; the stable timer off during the run), and to pynetdicom's own
   no-op SCP (its floor). Figures: instances/s ours / reference, and each receiver's CPU
   time per instance (storescp's from the kernel's child accounting, ours from the
   process). ``--cstore-only`` stops there. With this tree's ``PYTHONPATH`` replaced by
   an older tree's, the same script measures that tree's listener (before / after).
2. DICOMweb pull: a real Orthanc (DICOMweb plugin) loaded by STOW-RS; the reference is a
   plain ``dicomweb-client`` loop (``retrieve_study`` per study, each instance written to
   a file); ours is :func:`service.pacs.dicomweb.fetch_study` (QIDO listing of the
   instances, then WADO-RS per series, atomic writes). Figure: instances/s ours / reference.
3. Latency: a study sent by storescu to the listener (``stable_s`` as given) until a
   running server answers ``SearchSimilar`` for it (ingest, embed, incremental publish,
   live pickup), in seconds.

Needs dcmtk (/usr/bin/storescu, /usr/bin/storescp) and Orthanc with orthanc-dicomweb.
Run: ``nice -n 10 python benchmarks/bench_pacs.py [--studies 4 --slices 64 --rows 256] [--cstore-only]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
sys.path.insert(0, str(ROOT / "tests" / "encoders"))

import dicom_factory  # noqa: E402
import pacs_peers as pp  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402


def make_studies(root: Path, studies: int, slices: int, rows: int) -> list[tuple[str, list[Path]]]:
    out = []
    for i in range(studies):
        uid = generate_uid(entropy_srcs=["bench-pacs", str(i)])
        files = dicom_factory.write_series(
            root / f"s{i}", dicom_factory.phantom_hu(slices, rows, seed=i), study_uid=uid, patient_id=f"BENCH-{i}"
        )
        out.append((uid, files))
    return out


# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment: with it
# off, each instance waits for a delayed ACK (about 40 ms), 10x slower on loopback here
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def time_storescu(port: int, files: list[Path], called: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([pp.STORESCU, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True, check=False, env=DCMTK_ENV)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-500:]}")
    return dt


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _noop_scp(quick: bool) -> Any:
    """pynetdicom's floor: an SCP with the listener's contexts whose handler answers
    0x0000 at once (nothing decoded or written); ``quick``: the event-driven reactors."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

    ae = AE(ae_title="COHORTSIM")
    for cx in StoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0
    handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    if quick:
        from service.pacs.reactor import quicken

        handlers.append((evt.EVT_CONN_OPEN, lambda event: quicken(event.assoc)))
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)


def bench_cstore(work: Path, files: list[Path], repeats: int) -> dict[str, tuple[float, float]]:
    """Per receiver: (median seconds for ``files``, median CPU seconds of the receiver).
    Receivers: dcmtk ``storescp`` (reference), cohortsim listen (fsync each, and
    --no-fsync), pynetdicom's no-op SCP (stock and event-driven reactors, when this tree
    has them). Each repeat runs every receiver once, in turn."""
    from service.pacs.listener import ListenerConfig, StoreListener

    has_quick = "quick_reactor" in ListenerConfig.__dataclass_fields__
    runs: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, dt: float, cpu: float) -> None:
        runs.setdefault(name, []).append((dt, cpu))

    for r in range(repeats):
        out = work / f"storescp-{r}"
        out.mkdir()
        port = pp.free_port()
        # its fastest settings: largest receive PDU, no host name lookup
        scp = subprocess.Popen([pp.STORESCP, "-pdu", "131072", "-dhl", "-od", str(out), "-aet", "REF", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
        try:
            for _ in range(100):
                if pp.echoscu(port, called="REF").returncode == 0:
                    break
                time.sleep(0.1)
            dt = time_storescu(port, files, "REF")
            c0 = _child_cpu()  # storescu and echoscu counted up to here
        finally:
            scp.terminate()
            scp.wait()
        add("storescp", dt, _child_cpu() - c0)
        assert len(list(out.iterdir())) == len(files)
        for fsync in (True, False):
            lst = StoreListener(
                ListenerConfig(spool=work / f"spool-{r}-{fsync}", port=0, stable_s=1e9, poll_s=3600, fsync=fsync),
                ingest=lambda folder: None,
            )
            lst.start()
            try:
                c0 = time.process_time()
                dt = time_storescu(lst.port, files, "COHORTSIM")
                add(f"listen{'' if fsync else ' --no-fsync'}", dt, time.process_time() - c0)
            finally:
                lst.stop()
            assert lst.received == len(files)
        for quick in (False, True) if has_quick else (False,):
            server = _noop_scp(quick)
            try:
                c0 = time.process_time()
                dt = time_storescu(int(server.server_address[1]), files, "COHORTSIM")
                add(f"pynetdicom no-op ({'event-driven' if quick else 'stock'} reactors)", dt,
                    time.process_time() - c0)
            finally:
                server.shutdown()
    return {k: (statistics.median(d for d, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}


def bench_dicomweb(work: Path, studies: list[tuple[str, list[Path]]], repeats: int) -> tuple[float, float]:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from service.pacs.dicomweb import ANY_TRANSFER_SYNTAX, DicomwebConfig, fetch_study

    with pp.orthanc(work / "orthanc") as server:
        server.stow([f for _, files in studies for f in files])
        cfg = DicomwebConfig(server.dicomweb)
        ref_times, our_times = [], []
        for r in range(repeats):
            dest = work / f"ref-{r}"
            dest.mkdir()
            client = DICOMwebClient(server.dicomweb)
            t0 = time.perf_counter()
            for uid, _ in studies:
                for k, ds in enumerate(client.retrieve_study(uid, media_types=ANY_TRANSFER_SYNTAX)):
                    pydicom.dcmwrite(dest / f"{uid}-{k}.dcm", ds)
            ref_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for uid, _ in studies:
                fetch_study(cfg, uid, work / f"ours-{r}" / uid)
            our_times.append(time.perf_counter() - t0)
    return statistics.median(ref_times), statistics.median(our_times)


def bench_latency(work: Path, stable_s: float) -> float:
    import grpc

    from service.api import cohortsim_pb2, cohortsim_pb2_grpc
    from service.background import BackgroundServer
    from service.pacs.inflow import Inflow
    from service.pacs.listener import ListenerConfig, StoreListener

    site = pp.make_site(work / "site")
    uid, files = pp.ct_study(work / "latency-study", seed=999, patient="BENCH-LATENCY")
    inflow = Inflow(site["store"], site["pseudo"], index_dir=site["index"])
    lst = StoreListener(ListenerConfig(spool=work / "latency-spool", port=0, stable_s=stable_s, poll_s=0.5), inflow)
    lst.start()
    request = cohortsim_pb2.SearchSimilarRequest(study_uid=site["pseudo"].study(uid), k=2)
    try:
        with BackgroundServer(site["index"], device="cpu") as srv, grpc.insecure_channel(srv.target) as ch:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            t0 = time.perf_counter()
            time_storescu(lst.port, files, "COHORTSIM")
            while True:
                try:
                    stub.SearchSimilar(request, timeout=30)
                    return time.perf_counter() - t0
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND or time.perf_counter() - t0 > 300:
                        raise
                    time.sleep(0.2)
    finally:
        lst.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("size")
    g.add_argument("--studies", type=int, default=4)
    g.add_argument("--slices", type=int, default=64)
    g.add_argument("--rows", type=int, default=256)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--stable-s", type=float, default=10.0, help="the listener's stable-study timer for the latency run")
    g.add_argument("--cstore-only", action="store_true", help="only the C-STORE receive figures")
    args = ap.parse_args()
    pp.need_dcmtk()
    if not args.cstore_only:
        pp.need_orthanc()
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    try:
        studies = make_studies(work / "dicom", args.studies, args.slices, args.rows)
        files = [f for _, fs in studies for f in fs]
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances ({args.studies} studies x {args.slices} slices of {args.rows}^2), {mb:.1f} MB")
        timing = bench_cstore(work, files, args.repeats)
        ref, ref_cpu = timing["storescp"]
        print(f"C-STORE receive ({load()}):")
        for name, (dt, cpu) in timing.items():
            print(f"  {name:40s} {len(files) / dt:6.0f} inst/s  ratio {ref / dt:.2f}x  "
                  f"CPU {cpu / len(files) * 1e3:.2f} ms/inst ({cpu / max(ref_cpu, 1e-9):.1f}x storescp's)")
        print("  (target: listen >= 0.5x storescp)")
        if args.cstore_only:
            return
        ref, ours = bench_dicomweb(work, studies, args.repeats)
        print(f"DICOMweb pull: dicomweb-client loop {len(files) / ref:.0f} inst/s, fetch_study {len(files) / ours:.0f} inst/s"
              f" -> ratio {ref / ours:.2f}x (target >= 0.8x)")
        latency = bench_latency(work, args.stable_s)
        print(f"storescu -> searchable by a running server: {latency:.1f} s (stable_s {args.stable_s:g}; target < 60 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
