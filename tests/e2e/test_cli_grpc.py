"""End to end through the CLI and gRPC on a tiny synthetic cohort.

synth -> ingest (with a junk file) -> train (test_resnet, 2 epochs) -> index build ->
`cohortsim serve` as a real process -> `cohortsim query` by DICOM and by study id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .clirun import cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    os.environ["COHORTSIM_SITE_SECRET"] = "e2e-test-secret-0123456789"
    code, _, err = cli("synth", str(root / "synth"), "--patients", "13", "--seed", "3")
    assert code == 0, err
    # hold the last patient back as the query; drop a junk file among the cohort's files
    folders = sorted((root / "synth" / "dicom").iterdir(), key=lambda p: p.name)
    shutil.move(str(folders[-1]), str(root / "query"))
    (root / "synth" / "dicom" / "notes.txt").write_text("not a DICOM file")
    return root


@pytest.fixture(scope="module")
def built(workdir: Path) -> Path:
    code, stdout, err = cli(
        "ingest", str(workdir / "synth" / "dicom"), "--store", str(workdir / "store"),
        "--outcomes", str(workdir / "synth" / "outcomes.csv"), "--site", "north", "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["studies_ingested"] == 12
    assert [Path(r["path"]).name for r in report["files_rejected"]] == ["notes.txt"]
    assert report["files_rejected"][0]["reason"]
    # idempotent: a second ingest adds nothing
    code, stdout, err = cli("ingest", str(workdir / "synth" / "dicom"), "--store", str(workdir / "store"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["studies_ingested"] == 0
    code, _, err = cli(
        "train", "--store", str(workdir / "store"), "--out", str(workdir / "model"),
        "--backbone", "test_resnet", "--epochs", "2", "--batch-size", "6", "--device", "cpu",
    )
    assert code == 0, err
    assert (workdir / "model" / "model.safetensors").is_file()
    # the volumes' spool (a memory-mapped file) and the checkpoint are gone
    assert sorted(p.name for p in (workdir / "model").iterdir()) == ["card.json", "model.safetensors"]
    card = json.loads((workdir / "model" / "card.json").read_text())
    assert card["backbone"] == "test_resnet"
    code, _, err = cli(
        "index", "build", "--store", str(workdir / "store"), "--model", str(workdir / "model"),
        "--out", str(workdir / "index"), "--device", "cpu",
    )
    assert code == 0, err
    # 12 studies are too few to evaluate prognoses; the build says so
    assert "Prognostic quality: not evaluated" in " ".join(err.split())
    return workdir


def test_store_holds_no_identifying_values(built: Path) -> None:
    # the synthetic headers carry fake names, ids and institutions; none may reach the store
    needles = [b"Synthetic^Patient", b"SYN-0", b"e2e-test-secret"]
    for f in (built / "store").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for n in needles:
                assert n not in data, f"{n!r} found in {f}"
            if f.suffix == ".parquet":
                text = pq.read_table(f).drop_columns(
                    [c for c in ("volume",) if c in pq.read_schema(f).names]
                ).to_pylist().__repr__()
                assert "Synthetic" not in text and "SYN-" not in text


def test_serve_and_query(built: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--index", str(built / "index"), "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        port = None
        deadline = time.monotonic() + 90
        assert proc.stderr is not None
        while time.monotonic() < deadline and port is None:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"serving .* on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
        assert port, "server did not report its port"
        target = f"127.0.0.1:{port}"

        code, stdout, err = cli("query", "--server", target, "--dicom", str(built / "query"), "--k", "5", "--json")
        assert code == 0, err
        answer = json.loads(stdout)
        sims = [n["similarity"] for n in answer["neighbors"]]
        assert len(sims) == 5 and sims == sorted(sims, reverse=True)
        assert all(n["patient_id"].startswith("P-") for n in answer["neighbors"])
        assert answer["prognosis"]["survival"], "prognosis has no survival curve"
        assert abs(sum(n["weight"] for n in answer["neighbors"]) - 1.0) < 1e-6
        assert 0.0 <= answer["diagnostics"]["ood_percentile"] <= 1.0

        first = answer["neighbors"][0]["study_uid"]
        code, stdout, err = cli("query", "--server", target, "--study-uid", first, "--k", "3", "--json")
        assert code == 0, err
        assert first not in [n["study_uid"] for n in json.loads(stdout)["neighbors"]]

        # human-readable output names the prognosis
        code, stdout, err = cli("query", "--server", target, "--study-uid", first, "--k", "3")
        assert code == 0, err
        assert "median survival" in stdout

        # figures: the KM plot and the thumbnail strip (query thumbnail from its DICOM)
        km, strip = built / "km.png", built / "strip.png"
        code, stdout, err = cli(
            "query", "--server", target, "--dicom", str(built / "query"), "--k", "5",
            "--plot", str(km), "--thumbnails", str(strip),
        )
        assert code == 0, err
        assert "stability under 4 scanner-like perturbations" in " ".join(stdout.split())
        assert "whole cohort, for comparison" in stdout
        for png in (km, strip):
            assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in " ".join(err.split())

        # bad input: a clear one-line reason and a non-zero exit
        code, _, err = cli("query", "--server", target, "--study-uid", "S-does-not-exist")
        assert code != 0 and "cohortsim: error:" in err and len(err.strip().splitlines()) == 1
        junk = built / "junk.dcm"
        junk.write_bytes(b"\x00" * 300)
        code, _, err = cli("query", "--server", target, "--dicom", str(junk))
        assert code != 0 and "cohortsim: error:" in err

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_input_exits_nonzero(tmp_path: Path) -> None:
    code, _, err = cli("ingest", str(tmp_path / "missing"), "--store", str(tmp_path / "s"))
    assert code == 2 and err.startswith("cohortsim: error:")
    code, _, err = cli("index", "build", "--out", str(tmp_path / "i"))
    assert code == 2 and "--store" in err
    code, _, err = cli("query", "--server", "127.0.0.1:1", "--study-uid", "S-x", "--timeout", "2")
    assert code != 0 and err.startswith("cohortsim: error:")
    code, _, err = cli("serve", "--index", str(tmp_path / "none"))
    assert code != 0 and err.startswith("cohortsim: error:")


def test_train_defaults_to_the_evaluated_epochs(built: Path, tmp_path: Path) -> None:
    """Without --epochs, train runs what cohortsim eval scores: 100 lesion epochs, 8 whole
    (a 1 s budget stops it; the card says how many were asked for)."""
    from encoders.evaluate import EvalConfig

    for region, want in (("lesion", EvalConfig.epochs), ("whole", EvalConfig.whole_epochs)):
        code, _, err = cli(
            "train", "--store", str(built / "store"), "--out", str(tmp_path / region),
            "--backbone", "test_resnet", "--batch-size", "6", "--device", "cpu",
            "--region", region, "--time-budget", "1",
        )
        assert code == 0, err
        assert f"training {want} epochs ({region} region" in " ".join(err.split())
        notes = json.loads((tmp_path / region / "card.json").read_text())["notes"]
        assert f"of {want} epochs" in notes or f"of {2 * want} " in notes, notes


def test_train_on_store_makes_its_model_folder(built: Path, tmp_path: Path) -> None:
    """The demo trains into a folder nobody created yet (the spool lives inside it)."""
    from indexing.store import CohortStore
    from service.cli.train import _train_on_store

    out = tmp_path / "new" / "model"
    card = _train_on_store(CohortStore(built / "store"), out, batch_size=6, backbone="test_resnet",
                           epochs=1, device="cpu", region="lesion")
    assert card.epochs == 1
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "model.safetensors"]
