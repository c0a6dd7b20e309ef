"""SIGTERM mid-load: a real ``cohortsim serve`` process with DICOM and embedding
calls in flight gets SIGTERM; every call it had received completes OK, and it exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoders.model import EncoderCard, create_encoder, save_encoder
from encoders.synth import synth_cohort
from indexing.snapshot import build_snapshot
from service.api import cohortsim_pb2, cohortsim_pb2_grpc

from .conftest import make_cohort

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

REPO = Path(__file__).resolve().parents[2]
DIM = 16
N_DICOM = 4  # DICOM queries in flight (embedded one at a time: they queue on the server)
N_EMBEDDING = 12  # embedding queries in flight (they wait for a worker behind the DICOM ones)


@pytest.fixture(scope="module")
def dicom_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """An index with a tiny untrained encoder, and one synthetic study's DICOM files."""
    root = tmp_path_factory.mktemp("sigterm")
    synth_cohort(root / "synth", patients=1, seed=4)
    files = [p.read_bytes() for p in sorted((root / "synth" / "dicom").rglob("*.dcm"))]
    encoder = create_encoder("test_resnet", embedding_dim=DIM)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    emb, table = make_cohort(seed=4)
    emb = np.random.default_rng(4).normal(size=(table.num_rows, DIM)).astype(np.float32)
    build_snapshot(
        root / "index", emb, table, model_version=card.version, encoder_dir=root / "model"
    )
    return root / "index", files


@pytest.fixture
def serve_process(dicom_index: tuple[Path, list[bytes]], tmp_path: Path) -> Iterator[dict]:
    """``cohortsim serve`` (the installed entry point) on free ports; its log in a file.

    ``--grace-s 60``: the drain, not its speed, is under test (the suite shares its cores)."""
    log_path = tmp_path / "serve.log"
    exe = Path(sys.executable).parent / "cohortsim"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*cmd, "serve", "--index", str(dicom_index[0]), "--port", "0", "--device", "cpu",
             "--metrics-port", "0", "--grace-s", "60"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, COLUMNS="400"),
        )
    try:
        ports: dict[str, int] = {}
        end = time.monotonic() + 120
        while len(ports) < 2:
            text = log_path.read_text()
            if m := re.search(r"serving .* on [^\s:]+:(\d+)", text):
                ports["grpc"] = int(m.group(1))
            if m := re.search(r"metrics on http://[^:]+:(\d+)/metrics", text):
                ports["metrics"] = int(m.group(1))
            assert proc.poll() is None, text
            assert time.monotonic() < end, f"the server did not start:\n{text}"
            time.sleep(0.1)
        yield {"proc": proc, "log": log_path, **ports}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def in_flight(metrics_port: int) -> int:
    """Calls in progress on the server (its own ``cohortsim_rpc_in_flight`` gauge)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("cohortsim_rpc_in_flight{")
        )
    )


def test_sigterm_drains_in_flight_calls(
    serve_process: dict, dicom_index: tuple[Path, list[bytes]]
) -> None:
    proc = serve_process["proc"]
    files = dicom_index[1]
    dicom = cohortsim_pb2.SearchSimilarRequest(dicom=cohortsim_pb2.DicomStudy(files=files), k=5)
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(f"127.0.0.1:{serve_process['grpc']}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        stub.SearchSimilar(dicom, timeout=120)  # one first call pays the one-time imports
        calls = [stub.SearchSimilar.future(dicom, timeout=60) for _ in range(N_DICOM)]
        calls += [
            stub.SearchSimilar.future(
                cohortsim_pb2.SearchSimilarRequest(
                    embedding=cohortsim_pb2.Vector(values=rng.normal(size=DIM).tolist()), k=5
                ),
                timeout=60,
            )
            for _ in range(N_EMBEDDING)
        ]
        # SIGTERM once the server holds the calls (its in-flight gauge says so)
        end = time.monotonic() + 30
        while in_flight(serve_process["metrics"]) < 2 and not all(c.done() for c in calls):
            assert time.monotonic() < end, "the calls never reached the server"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        pending_at_signal = sum(not c.done() for c in calls)
        codes = [c.code() for c in calls]  # waits for each call
        answers = [c.result() for c in calls if c.code() == grpc.StatusCode.OK]
    assert proc.wait(timeout=60) == 0, serve_process["log"].read_text()
    assert codes == [grpc.StatusCode.OK] * len(calls), serve_process["log"].read_text()
    assert all(len(a.neighbors) == 5 for a in answers)
    # the test is meaningful only if calls were still running when the signal came
    assert pending_at_signal >= 2
    log = serve_process["log"].read_text()
    assert "draining in-flight calls for up to 60 s" in log and "server stopped" in log


def test_stop_settings_come_from_config_and_are_checked() -> None:
    from service.config import ConfigError, load_config

    assert (load_config(env={}).grace_s, load_config(env={}).stop_delay_s) == (20.0, 1.0)
    cfg = load_config(env={"COHORTSIM_GRACE_S": "45", "COHORTSIM_STOP_DELAY_S": "0"})
    assert (cfg.grace_s, cfg.stop_delay_s) == (45.0, 0.0)
    with pytest.raises(ConfigError, match="grace_s"):
        load_config(env={}, flags={"grace_s": -1.0})
