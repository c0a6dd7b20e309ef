"""The checked-in stubs match the protos; --check catches drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from service.api import generate

REPO = Path(__file__).resolve().parents[2]


def run_generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.api.generate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_checked_in_stubs_have_no_drift() -> None:
    res = run_generate("--check")
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout


def test_check_detects_a_modified_proto(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    proto = protos / "cohortsim" / "v1" / "cohortsim.proto"
    text = proto.read_text()
    proto.write_text(
        text.replace(
            "  double weight = 7;\n", "  double weight = 7;\n  // new.\n  int32 rank = 999;\n"
        )
    )
    res = run_generate("--check", "--proto-root", str(protos))
    assert res.returncode == 1
    assert "cohortsim_pb2.py (differs)" in res.stderr
    assert "cohortsim_pb2.pyi (differs)" in res.stderr


def test_generated_files_are_flattened_into_service_api(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == [
        "cohortsim_pb2.py",
        "cohortsim_pb2.pyi",
        "cohortsim_pb2_grpc.py",
    ]
    grpc_stub = (tmp_path / "cohortsim_pb2_grpc.py").read_text()
    assert grpc_stub.startswith(generate.HEADER)
    assert "from service.api import cohortsim_pb2" in grpc_stub
    assert "from cohortsim.v1 import" not in grpc_stub
    # a stale stub and a missing one are reported too
    (tmp_path / "old_pb2.py").write_text("# stale\n")
    (tmp_path / "cohortsim_pb2.pyi").unlink()
    drift = generate.check(tmp_path)
    assert drift == ["cohortsim_pb2.pyi (missing)", "old_pb2.py (stale: no proto generates it)"]


def test_service_full_name_matches_the_descriptor() -> None:
    from service.api import SERVICE_FULL_NAME, cohortsim_pb2

    service = cohortsim_pb2.DESCRIPTOR.services_by_name["PatientSimilarityService"]
    assert service.full_name == SERVICE_FULL_NAME == "cohortsim.v1.PatientSimilarityService"
    assert set(service.methods_by_name) == {
        "SearchSimilar",
        "EmbedStudy",
        "GetIndexInfo",
        "SearchSimilarStream",
        "GetPatient",
        "ListStudies",
        "GetCohortStats",
        "IngestStudies",
        "DeletePatient",
        "ReloadIndex",
        "SearchSite",
        "AggregateSite",
    }
