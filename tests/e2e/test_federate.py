"""A real federated run in Flower's deployment mode on loopback: `cohortsim federate
server` (SuperLink + ServerApp) and four `cohortsim federate site` SuperNodes, three
with stores split by scanner from one synthetic cohort and one whose store holds
another input spec (it refuses every round, as a site that drops out of each round).
The encoder that comes out indexes every site's store and answers a query."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is the optional extra cohortsim[federated]")

from .clirun import cli

pytestmark = pytest.mark.slow

SECRET = "federate-e2e-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cohortsim(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:  # own session: the test ends the SuperNode and its children
        return subprocess.Popen([sys.executable, "-c", "from service.cli import main; main()", *args], env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        for sig in (signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from encoders.deid import Pseudonymizer
    from encoders.spec import InputSpec
    from encoders.synth import synth_cohort
    from indexing.ingest import ingest_folder, read_outcomes
    from indexing.store import CohortStore, StudyRecord
    from service.federate import split_store_by_scanner

    root = tmp_path_factory.mktemp("federate")
    synth_cohort(root / "synth", patients=15, seed=3)
    pseudo = Pseudonymizer(SECRET.encode())
    allst = CohortStore(root / "all", create=True)
    ingest_folder(root / "synth" / "dicom", allst, pseudonymizer=pseudo, site="all", workers=1)
    allst.set_outcomes(read_outcomes(root / "synth" / "outcomes.csv", pseudo))
    stores = split_store_by_scanner(root / "all", [root / f"site{i}" for i in range(3)])
    # a fourth site whose store was ingested on another grid
    other = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 32, 32))
    odd = CohortStore(root / "odd", create=True)
    rng = np.random.default_rng(1)
    odd.add_studies([StudyRecord(patient_id=f"P-{i:016x}", study_uid=f"S-{i:024x}", site="odd",
                                 volume=rng.integers(-1000, 400, other.shape).astype(np.int16),
                                 spec=other.to_dict()) for i in range(3)])
    return [*stores, root / "odd"]


def test_three_sites_train_one_encoder_that_indexes_every_site(sites: list[Path], tmp_path: Path) -> None:
    from indexing.query import search_similar
    from indexing.snapshot import load_snapshot

    port = _free_port()
    # a PATH without the environment's bin folder, as under CI or cron: the CLI finds Flower's tools
    env = {**os.environ, "COHORTSIM_SITE_SECRET": SECRET, "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "fed-encoder"
    server = _cohortsim(
        "federate", "server", "--out", str(out), "--address", f"127.0.0.1:{port}", "--insecure",
        "--rounds", "2", "--local-epochs", "1", "--min-sites", "4", "--min-replies", "2",
        "--backbone", "test_resnet", "--spec-from", str(sites[0]), "--embedding-dim", "32",
        "--batch-size", "4", "--round-timeout", "600", env=env, log=tmp_path / "server.log",
    )
    procs = [server]
    try:
        for i, store in enumerate(sites):
            procs.append(_cohortsim(
                "federate", "site", "--store", str(store), "--superlink", f"127.0.0.1:{port}",
                "--insecure", "--runtime-port", str(_free_port()), "--site-name", f"hospital-{i}",
                env={**env, "FLWR_HOME": str(tmp_path / f"flwr-site{i}")},
                log=tmp_path / f"site{i}.log",
            ))
        rc = server.wait(timeout=1500)
    finally:
        for p in procs:
            _end(p)
    assert rc == 0, (tmp_path / "server.log").read_text()[-3000:]

    card = json.loads((out / "card.json").read_text())
    prov = card["provenance"]
    assert prov["strategy"] == "fedavg" and prov["rounds"] == 2 and prov["rounds_completed"] == 2
    # the three good sites, by pseudonym only; the odd site refused every round
    ids = [s["id"] for s in prov["sites"]]
    assert len(ids) == 3 and all(s.startswith("site-") for s in ids)
    assert all("hospital" not in s for s in ids) and all(s["rounds"] == 2 for s in prov["sites"])
    summary = json.loads((out / "federation.json").read_text())
    assert [r["replies"] for r in summary["per_round"]] == [3, 3]
    assert all(len(r["failures"]) == 1 and "store holds volumes of (4.0, 4.0, 4.0) mm" in r["failures"][0]
               for r in summary["per_round"])
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in summary["per_round"])
    assert summary["network_traffic"]["total-bytes"] > 0

    # every site builds its index with the one encoder; all carry the same version
    versions = set()
    for i, store in enumerate(sites[:3]):
        code, _, err = cli("index", "build", "--store", str(store), "--model", str(out),
                           "--out", str(tmp_path / f"index{i}"), "--device", "cpu")
        assert code == 0, err
        snap = load_snapshot(tmp_path / f"index{i}", device="cpu")
        versions.add(snap.manifest["model_version"])
        # a query: a study's own vector finds itself first
        res = search_similar(snap, snap.vector(0)[None, :], 2)
        assert res[0].neighbors[0].study_uid == snap.metadata["study_uid"][0].as_py()
    assert versions == {card["version"]}
