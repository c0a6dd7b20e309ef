"""The thin client: service.client and the stubs work without the server's stack.

A decision-support app installs ``cohortsim-client`` (clients/python) and must not pull
torch / timm / faiss. In a subprocess whose imports of those (and of encoders, indexing)
raise, the client is imported and calls a running server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.background import BackgroundServer

from .conftest import DIM, MODEL_VERSION

REPO = Path(__file__).resolve().parents[2]

BLOCKED = ["torch", "torchvision", "timm", "faiss", "encoders", "indexing", "pyarrow", "pydicom", "scipy", "lifelines"]
# the engine's plain result types and warning codes, which the client shares (standard library only)
SHARED = ["indexing", "indexing.notices", "indexing.prognosis_types"]

SCRIPT = r"""
import json, sys

BLOCKED = set(sys.argv[3].split(","))
SHARED = set(sys.argv[4].split(","))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED and name not in SHARED:
            raise ImportError(f"{name} is blocked: the thin client must not import it")
        return None

sys.meta_path.insert(0, Block())
from service.client import AsyncCohortsimClient, CohortsimClient, CohortsimClientError, StudyEmbedding
import asyncio

target, dim = sys.argv[1], int(sys.argv[2])
vec = [1.0] + [0.0] * (dim - 1)
with CohortsimClient(target) as c:
    info = c.index_info()
    res = c.search(embedding=StudyEmbedding(vec, info.model_version), k=3)
    try:
        c.search(embedding=[0.0] * dim, k=3)
        reason = None
    except CohortsimClientError as exc:
        reason = exc.reason

async def run():
    async with AsyncCohortsimClient(target) as a:
        return len((await a.search(embedding=vec, k=2)).neighbors)

import service.client
print(json.dumps({
    "num_studies": info.num_studies, "model_version": info.model_version,
    "neighbors": len(res.neighbors), "error": reason, "async_neighbors": asyncio.run(run()),
    "client_file": service.client.__file__,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and m not in SHARED),
}))
"""


def _run_client(server: BackgroundServer, pythonpath: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.target, str(DIM), ",".join(BLOCKED), ",".join(SHARED)],
        capture_output=True, text=True, timeout=120, env=env, cwd=pythonpath,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(got: dict) -> None:
    assert got["loaded"] == []
    assert got["num_studies"] > 0 and got["model_version"] == MODEL_VERSION
    assert got["neighbors"] == 3 and got["async_neighbors"] == 2
    assert got["error"] == "ZERO_EMBEDDING"


def test_client_works_without_the_server_stack(server: BackgroundServer) -> None:
    got = _run_client(server, REPO)
    _check(got)
    assert Path(got["client_file"]).resolve() == REPO / "service" / "client.py"


def test_thin_wheel_holds_only_the_client_and_works(server: BackgroundServer, tmp_path: Path) -> None:
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling (the build backend of clients/python) is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(REPO / "clients" / "python"), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cohortsim_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if ".dist-info/" not in n]
        zf.extractall(tmp_path / "site")
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert sorted(names) == sorted(
        [
            "service/__init__.py", "service/client.py", "service/status_details.py",
            "indexing/__init__.py", "indexing/notices.py", "indexing/prognosis_types.py",
            "service/api/__init__.py", "service/api/cohortsim_pb2.py",
            "service/api/cohortsim_pb2.pyi", "service/api/cohortsim_pb2_grpc.py",
        ]
    )
    requires = [line.split(":", 1)[1].strip().lower() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any(r.startswith(("torch", "timm", "faiss", "pyarrow", "pydicom")) for r in requires)
    got = _run_client(server, tmp_path / "site")
    _check(got)
    assert Path(got["client_file"]).resolve() == (tmp_path / "site" / "service" / "client.py").resolve()


def test_client_result_types_are_the_engines() -> None:
    """One definition: the client returns the engine's prognosis value types and codes."""
    import indexing.notices
    import indexing.prognosis
    import service.client

    for name in ("SurvivalPoint", "HorizonEstimate", "LabelShare"):
        assert getattr(service.client, name) is getattr(indexing.prognosis, name), name
    assert service.client.SKILL_CODES is indexing.notices.SKILL_CODES
