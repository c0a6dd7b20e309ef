"""CLI habits: --version, --json reports, one-line usage errors, choices in --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from indexing.snapshot import current_version
from service.audit import AuditLog
from service.cli import app

from .test_cli_index import SECRET, cohort  # noqa: F401  (the fixture)

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), env={"COHORTSIM_SITE_SECRET": SECRET})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def test_version() -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("cohortsim ") and len(out.split()) >= 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["index", "build", "--nope"], "No such option"),
        (["train", "--store", "s", "--out", "o", "--region", "liver"], "'liver' is not one of"),
        (["index", "list"], "Missing argument"),
        (["delete", "--patient"], "requires an argument"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], words: str) -> None:
    code, out, err = cli(*args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cohortsim: error: "), err
    assert words in lines[0] and "--help" in lines[0]


def test_usage_error_through_the_console_script() -> None:
    # the installed entry point (service.cli:main), not the test runner
    proc = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "index", "build", "--nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("cohortsim: error: No such option")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_choices_shown_in_help() -> None:
    code, out, _ = cli("train", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for choice in ("[lesion|whole]", "[attention|mean]", "[simclr|vicreg]", "[tissue|none]", "[auto|cpu|gpu|cuda]"):
        assert choice in flat, choice


def test_json_reports(cohort: dict[str, Path]) -> None:  # noqa: F811
    root, store, index = cohort["root"], cohort["store"], cohort["index"]
    n, d = 12, 8
    x = np.random.default_rng(3).normal(size=(n, d)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "patient_id": [f"P-{i:016x}" for i in range(n)],
                "study_uid": [f"S-{i:024x}" for i in range(n)],
                "embedding": pa.array(x.tolist(), pa.list_(pa.float32())),
            }
        ),
        root / "emb.parquet",
    )
    code, out, err = cli("index", "build", "--embeddings", str(root / "emb.parquet"), "--out", str(root / "idx"), "--json")
    assert code == 0, err
    built = json.loads(out)
    assert built["version"] == current_version(root / "idx") and built["num_studies"] == n
    assert built["dimension"] == d and built["index_kind"] == "Flat" and built["pruned"] == []

    csv = root / "outcomes.csv"
    csv.write_text("patient_id,time,event\nraw3,17.5,1\n")
    code, out, err = cli("outcomes", str(csv), "--store", str(store), "--index", str(index), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["patients_updated"] == 1 and report["index_version"] == current_version(index)

    code, out, err = cli("delete", "--patient", "raw1", "--store", str(store), "--index", str(index), "--json")
    assert code == 0, err
    deleted = json.loads(out)
    assert len(deleted["patients"]) == 1 and deleted["patients"][0].startswith("P-")
    assert deleted["store_withdrawn"] == 1 and deleted["index_hidden"] == 1

    code, out, err = cli("compact", "--store", str(store), "--index", str(index), "--json")
    assert code == 0, err
    compacted = json.loads(out)
    assert compacted["store"]["studies_removed"] == 1
    assert compacted["index_version"] == current_version(index)

    code, out, err = cli("index", "compact", str(index), "--json")
    assert code == 0, err
    assert json.loads(out) == {"index_dir": str(index), "version": None, "compacted": False}


def test_audit_verify_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    recs = [log.append({"principal": f"p{i}", "method": "/x/Y", "status": "OK"}) for i in range(3)]
    log.close()
    code, out, _ = cli("audit", "verify", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["records"] == 3
    assert report["head"] == recs[-1]["hash"]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines[:1], lines[1].replace("p1", "p9"), *lines[2:]]))
    code, out, _ = cli("audit", "verify", str(path), "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["bad_line"] == 2
