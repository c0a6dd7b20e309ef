"""`cohortsim federate` bad input: one-line errors, non-zero exit, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from .clirun import cli

pytest.importorskip("flwr", reason="Flower is the optional extra cohortsim[federated]")


def _line(err: str) -> str:
    return " ".join(err.split())


def test_server_refuses_bad_options(tmp_path: Path) -> None:
    out = str(tmp_path / "m")
    code, _, err = cli("federate", "server", "--out", out, "--strategy", "fedsgd", "--insecure")
    assert code == 2 and _line(err).startswith("cohortsim: error:") and "fedavg, fedprox" in err
    code, _, err = cli("federate", "server", "--out", out, "--min-sites", "2", "--min-replies", "3",
                       "--insecure")
    assert code == 2 and "--min-replies (3) cannot exceed --min-sites (2)" in _line(err)
    code, _, err = cli("federate", "server", "--out", out)
    assert code == 2 and "--insecure (loopback tests only)" in _line(err)
    code, _, err = cli("federate", "server", "--out", out, "--insecure", "--address", "nohost")
    assert code == 2 and "HOST:PORT" in err
    assert not (tmp_path / "m").exists()


def test_site_refuses_a_missing_or_empty_store(tmp_path: Path) -> None:
    code, _, err = cli("federate", "site", "--store", str(tmp_path / "none"), "--insecure")
    assert code == 2 and _line(err).startswith("cohortsim: error:")
    code, _, err = cli("federate", "site", "--store", str(tmp_path), "--insecure",
                       "--device", "tpu")
    assert code == 2 and "--device must be cpu or cuda" in err
    code, _, err = cli("federate", "site", "--store", str(tmp_path / "none"))
    assert code == 2 and "--root-certificates" in err
