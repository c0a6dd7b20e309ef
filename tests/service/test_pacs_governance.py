"""Who may query by PACS reference: a rule for every query kind of the proto, and the
researcher refusal through a real server with tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.governance import RESEARCHER_QUERY_RULES
from service.pacs.dicomweb import DicomwebConfig

from .pacs_peers import free_port
from .security_env import bearer, rpc_error, write_tokens


def _query_kinds() -> set[str]:
    search = pb.SearchSimilarRequest.DESCRIPTOR.oneofs_by_name["query"].fields
    embed = pb.EmbedStudyRequest.DESCRIPTOR.fields
    return {f"SearchSimilarRequest.{f.name}" for f in search} | {f"EmbedStudyRequest.{f.name}" for f in embed}


def test_every_query_kind_has_a_researcher_rule() -> None:
    """Fails when the proto gains a query kind without a rule in RESEARCHER_QUERY_RULES."""
    assert _query_kinds() == set(RESEARCHER_QUERY_RULES)


@pytest.fixture(scope="module")
def secured(index_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("pacs-gov")
    tokens = write_tokens(root / "tokens.json")
    down = DicomwebConfig(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=5)
    with BackgroundServer(index_dir, device="cpu", auth_tokens=root / "tokens.json", pacs=down) as srv:
        yield srv, tokens


def test_researchers_are_refused_pacs_references_before_any_retrieval(secured) -> None:  # type: ignore[no-untyped-def]
    srv, tokens = secured
    ref = pb.PacsStudy(study_instance_uid="1.2.840.10008.1.2.3.4")
    with grpc.insecure_channel(srv.target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        for call, request, key in (
            (stub.SearchSimilar, pb.SearchSimilarRequest(pacs=ref), "SearchSimilarRequest.pacs"),
            (stub.EmbedStudy, pb.EmbedStudyRequest(pacs=ref), "EmbedStudyRequest.pacs"),
        ):
            code, _, reason = rpc_error(call, request, metadata=bearer(tokens["researcher"]))
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, RESEARCHER_QUERY_RULES[key])
            # a clinician gets through to the PACS (here down: UNAVAILABLE naming it)
            code, message, reason = rpc_error(call, request, metadata=bearer(tokens["clinician"]))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PACS_UNREACHABLE")
            assert "127.0.0.1" in message
        code, _, reason = rpc_error(
            stub.SearchSimilar, pb.SearchSimilarRequest(study_uid="S-0"), metadata=bearer(tokens["researcher"])
        )
        assert reason == RESEARCHER_QUERY_RULES["SearchSimilarRequest.study_uid"]
