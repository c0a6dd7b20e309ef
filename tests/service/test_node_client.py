"""A Node client (@grpc/grpc-js + @grpc/proto-loader) calls the server from the .proto alone.

Skipped where node or the npm packages are missing (``.ci/run`` installs them with npm
into tests/node/node_modules when npm and its registry are available)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from indexing.snapshot import load_snapshot
from service.background import BackgroundServer

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "node"
NODE = shutil.which("node")
MODULES = HERE / "node_modules"

pytestmark = pytest.mark.skipif(
    NODE is None
    or not (MODULES / "@grpc" / "grpc-js").is_dir()
    or not (MODULES / "@grpc" / "proto-loader").is_dir(),
    reason="node or the npm packages @grpc/grpc-js, @grpc/proto-loader are missing "
    "(cd tests/node && npm install)",
)


def test_node_client_calls_index_info_and_search(index_dir: Path) -> None:
    snap = load_snapshot(index_dir, device="cpu")
    v = snap.vector(7)
    with BackgroundServer(index_dir, device="cpu", watch_interval=None) as srv:
        proc = subprocess.run(
            [str(NODE), str(HERE / "client.js"), srv.target, str(ROOT / "protos"),
             json.dumps([float(x) for x in v]), "5"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_studies"] == snap.num_studies
    assert out["dimension"] == snap.dimension
    assert out["index_version"] == snap.version
    rows = snap.search(v[None], 5)[1][0]
    uids = [snap.metadata.column("study_uid")[int(r)].as_py() for r in rows]
    assert [n["study_uid"] for n in out["neighbors"]] == uids
    assert out["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert out["bad_code"] == 3  # INVALID_ARGUMENT: wrong dimension
    assert out["bad_details"] == "present"  # the google.rpc.Status detail travels
    assert np.isfinite(out["neighbors"][-1]["similarity"])
