"""`cohortsim eval` on a tiny ingested cohort: rows, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .clirun import cli


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    os.environ["COHORTSIM_SITE_SECRET"] = "eval-test-secret-0123456789"
    code, _, err = cli("synth", str(root / "synth"), "--patients", "16", "--seed", "5")
    assert code == 0, err
    code, _, err = cli(
        "ingest", str(root / "synth" / "dicom"), "--store", str(root / "store"),
        "--outcomes", str(root / "synth" / "outcomes.csv"),
    )
    assert code == 0, err
    return root / "store"


def test_eval_json_rows(store: Path) -> None:
    code, stdout, err = cli(
        "eval", "--store", str(store), "--label", "phenotype", "--k", "3",
        "--regions", "lesion", "--backbone", "test_resnet", "--epochs", "1",
        "--batch-size", "6", "--device", "cpu", "--json",
    )
    assert code == 0, err
    rows = json.loads(stdout)
    methods = [r["method"] for r in rows]
    assert methods == [
        "random vectors", "HU histogram", "HU histogram + ComBat",
        "random-init test_resnet (lesion)", "cohortsim simclr (lesion)",
        "cohortsim simclr (lesion) + ComBat",
    ]
    for r in rows:
        assert 0.0 <= r["precision_at_k"] <= 1.0 and -1.0 <= r["scanner_excess"] <= 1.0
        assert r["k"] == 3 and r["n_queries"] + r["n_reference"] == 16
        # 95 % intervals over the query patients (1000 resamples by default)
        lo, hi = r["precision_ci"]
        assert 0.0 <= lo <= r["precision_at_k"] <= hi <= 1.0
        assert r["scanner_excess_ci"][0] <= r["scanner_excess"] <= r["scanner_excess_ci"][1]
        assert (r["n_boot"], r["ci_level"]) == (1000, 0.95)
    # the naive HU histogram picks neighbours by scanner (5 scanners, ~0.2 share each)
    assert rows[1]["scanner_excess"] > 0.3


def test_eval_table_and_errors(store: Path) -> None:
    code, stdout, err = cli(
        "eval", "--store", str(store), "--label", "phenotype", "--k", "3", "--regions", "",
    )
    assert code == 0, err
    assert "HU histogram" in stdout and "P@3" in stdout
    assert "95% interval over query patients, 1000 bootstrap resamples" in " ".join(stdout.split())
    code, stdout, err = cli(
        "eval", "--store", str(store), "--label", "phenotype", "--k", "3", "--regions", "",
        "--bootstrap", "0", "--json",
    )
    assert code == 0, err
    assert all(r["precision_ci"] is None and r["n_boot"] == 0 for r in json.loads(stdout))
    code, _, err = cli("eval", "--store", str(store), "--label", "histology", "--k", "3")
    assert code == 2
    line = " ".join(err.split())
    assert line.startswith("cohortsim: error:") and "'histology'" in line and "phenotype" in line
    code, _, err = cli("eval", "--store", str(store), "--label", "phenotype", "--regions", "liver")
    assert code == 2 and "--regions" in err
    code, _, err = cli("eval", "--store", str(store), "--label", "phenotype", "--k", "10")
    assert code == 2 and "at least 20" in " ".join(err.split())


def test_eval_spools_the_volumes_and_removes_them(store: Path, tmp_path: Path) -> None:
    """The volumes go to a memory-mapped file in --spool-dir while the evaluation runs,
    and nothing is left there afterwards."""
    spool = tmp_path / "spool"
    spool.mkdir()
    code, stdout, err = cli(
        "eval", "--store", str(store), "--label", "phenotype", "--k", "3", "--regions", "",
        "--spool-dir", str(spool), "--json",
    )
    assert code == 0, err
    assert [r["method"] for r in json.loads(stdout)][:2] == ["random vectors", "HU histogram"]
    assert list(spool.iterdir()) == []
    code, _, err = cli(
        "eval", "--store", str(store), "--label", "phenotype", "--spool-dir", str(tmp_path / "no"),
    )
    assert code == 2 and "--spool-dir" in err and "is not a folder" in " ".join(err.split())
