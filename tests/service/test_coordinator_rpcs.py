"""A coordinator's other entry points: GetIndexInfo pooled over its sites, and queries
that name a study in the coordinator's own PACS (retrieved and embedded there)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from encoders.dicom import preprocess, read_study
from encoders.model import EncoderCard, create_encoder, embed, save_encoder
from encoders.synth import synth_cohort
from indexing.snapshot import build_snapshot
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import TokenStore
from service.background import BackgroundServer
from service.federation import Site
from service.pacs import query as pacs_query
from service.pacs.dicomweb import DicomwebConfig
from service.status_details import reason_from_trailing

from .conftest import make_cohort
from .test_federation import _InProcessCoordinator

EMBED_DIM = 16
RESEARCHER, CLINICIAN = "r" * 40, "c" * 40
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny untrained encoder, one synthetic DICOM study, and two site indexes of that
    encoder's version; the first holds the study's own vector."""
    root = tmp_path_factory.mktemp("coordinator")
    synth_cohort(root / "synth", patients=1, seed=1)
    files = sorted(next((root / "synth" / "dicom").iterdir()).rglob("*.dcm"))
    encoder = create_encoder("test_resnet", embedding_dim=EMBED_DIM)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), root / "model")
    own = embed(encoder, preprocess(read_study(files), card.input)[None])[0]
    _, table = make_cohort(seed=3)
    rng = np.random.default_rng(4)
    dirs = []
    for i in range(2):
        part = table.slice(30 * i, 30)
        emb = rng.normal(size=(30, EMBED_DIM)).astype(np.float32)
        if i == 0:
            emb[0] = own
        dirs.append(root / f"site{i}")
        build_snapshot(dirs[-1], emb, part, model_version=card.version)
    return {"root": root, "files": [f.read_bytes() for f in files], "model": root / "model",
            "dirs": dirs, "study0": table.column("study_uid")[0].as_py(), "version": card.version}


@pytest.fixture(scope="module")
def sites(setup: dict[str, Any]) -> Iterator[list[Site]]:
    with BackgroundServer(setup["dirs"][0], device="cpu") as a, BackgroundServer(setup["dirs"][1], device="cpu") as b:
        yield [Site("a", a.target), Site("b", b.target)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(port: int, method: str, request: Any, token: str | None = None) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return getattr(stub, method)(request, timeout=60, metadata=metadata)


def _refused(port: int, request: Any, token: str | None = None) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        _call(port, "SearchSimilar", request, token)
    return info.value.code(), reason_from_trailing(info.value.trailing_metadata())


def test_index_info_names_every_site(setup: dict[str, Any], sites: list[Site]) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})
    down = Site("down", f"127.0.0.1:{_free_port()}")
    with _InProcessCoordinator([*sites, down], auth_tokens=tokens) as coord:
        info = _call(coord.port, "GetIndexInfo", pb.GetIndexInfoRequest(), CLINICIAN)
        researcher = _call(coord.port, "GetIndexInfo", pb.GetIndexInfoRequest(), RESEARCHER)
    assert info.num_studies == 60 and info.model_version == setup["version"]
    states = {s.name: (pb.SiteState.Name(s.state), s.num_studies) for s in info.federation.sites}
    assert states == {"a": ("SITE_STATE_ANSWERED", 30), "b": ("SITE_STATE_ANSWERED", 30),
                      "down": ("SITE_STATE_UNAVAILABLE", 0)}
    assert info.index_version.startswith("a=") and ",b=" in info.index_version
    assert not researcher.HasField("federation") and researcher.num_studies == 60


def test_pacs_query_without_pacs_or_encoder_is_refused(setup: dict[str, Any], sites: list[Site]) -> None:
    tokens = TokenStore.from_mapping({RESEARCHER: "researcher", CLINICIAN: "clinician"})
    request = pb.SearchSimilarRequest(pacs=pb.PacsStudy(study_instance_uid=STUDY_UID), k=3)
    with _InProcessCoordinator(sites, auth_tokens=tokens, encoder_dir=setup["model"]) as coord:
        assert _refused(coord.port, request, CLINICIAN) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PACS")
        assert _refused(coord.port, request, RESEARCHER) == (
            grpc.StatusCode.PERMISSION_DENIED, "PACS_QUERY_NOT_ALLOWED"
        )
    with _InProcessCoordinator(sites, pacs=DicomwebConfig("http://127.0.0.1:9/dicom-web")) as coord:
        assert _refused(coord.port, request) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ENCODER")


def test_pacs_query_is_retrieved_and_embedded_at_the_coordinator(
    setup: dict[str, Any], sites: list[Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def fake_pacs(cfg: DicomwebConfig, uid: str, *, timeout_s: float | None = None) -> list[bytes]:
        asked.append(uid)  # the WADO-RS read itself is tested against Orthanc in test_pacs_dicomweb
        return list(setup["files"])

    monkeypatch.setattr(pacs_query, "fetch_study_bytes", fake_pacs)
    pacs = DicomwebConfig("http://pacs.invalid/dicom-web")
    with _InProcessCoordinator(sites, encoder_dir=setup["model"], pacs=pacs) as coord:
        by_ref = _call(coord.port, "SearchSimilar",
                       pb.SearchSimilarRequest(pacs=pb.PacsStudy(study_instance_uid=STUDY_UID), k=3))
        by_files = _call(coord.port, "SearchSimilar",
                         pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=setup["files"]), k=3))
    assert asked == [STUDY_UID]
    assert by_ref.neighbors[0].study_uid == setup["study0"]  # the study's own vector, at site a
    assert by_ref.neighbors[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert [n.study_uid for n in by_ref.neighbors] == [n.study_uid for n in by_files.neighbors]


def test_site_token_is_read_again_only_when_its_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from service import federation
    from service.auth import AuthConfigError

    token = tmp_path / "north.token"
    token.write_text("first\n")
    os.chmod(token, 0o600)
    reads: list[str] = []
    real = federation.read_secret_file

    def counted(path: Any, what: str) -> bytes:
        reads.append(str(path))
        return real(path, what)

    monkeypatch.setattr(federation, "read_secret_file", counted)
    site = Site("north", "h:1", token_file=token)
    assert site.metadata() == (("authorization", "Bearer first"),)
    assert site.metadata() == (("authorization", "Bearer first"),) and len(reads) == 1
    token.write_text("second, a longer token\n")
    assert site.metadata() == (("authorization", "Bearer second, a longer token"),) and len(reads) == 2
    os.chmod(token, 0o644)  # readable by others: refused at once, not served from the cache
    with pytest.raises(AuthConfigError):
        site.metadata()


def test_cohort_stats_are_not_federated(sites: list[Site]) -> None:
    with _InProcessCoordinator(sites) as coord, pytest.raises(grpc.RpcError) as info:
        _call(coord.port, "GetCohortStats", pb.GetCohortStatsRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert reason_from_trailing(info.value.trailing_metadata()) == "COHORT_STATS_NOT_FEDERATED"
