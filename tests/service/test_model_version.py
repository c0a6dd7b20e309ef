"""Vector.model_version: an embedding from another encoder is refused, one without a
version is answered with a warning, and the clients re-send EmbedStudy's version."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.client import (
    AsyncCohortsimClient,
    CohortsimClient,
    CohortsimClientError,
    StudyEmbedding,
    build_search_request,
)
from service.convert import UNVERSIONED_EMBEDDING_WARNING

from .conftest import MODEL_VERSION


def test_mismatched_model_version_is_a_failed_precondition(server: BackgroundServer, cohort) -> None:
    emb, _ = cohort
    req = build_search_request(embedding=emb[3], k=3, model_version="enc-ffffffffffff")
    assert req.embedding.HasField("model_version")
    with grpc.insecure_channel(server.target) as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SearchSimilar(req, timeout=20)
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "enc-ffffffffffff" in err.details() and MODEL_VERSION in err.details()
    raw = dict(err.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    detail = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(detail) for d in status.details)
    assert detail.reason == "MODEL_VERSION_MISMATCH"
    assert detail.metadata["expected"] == MODEL_VERSION


def test_model_version_checked_or_warned(server: BackgroundServer, cohort) -> None:
    emb, _ = cohort
    with CohortsimClient(server.target) as client:
        bare = client.search(embedding=emb[3], k=3)
        named = client.search(embedding=emb[3], k=3, model_version=MODEL_VERSION)
        wrapped = client.search(embedding=StudyEmbedding(emb[3], MODEL_VERSION), k=3)
        with pytest.raises(CohortsimClientError) as info:
            client.search(embedding=StudyEmbedding(emb[3], "enc-0123456789ab"), k=3)
        by_uid = client.search(study_uid=client.list_studies(page_size=1).studies[0].study_uid, k=3)
    assert (info.value.code, info.value.reason) == ("FAILED_PRECONDITION", "MODEL_VERSION_MISMATCH")
    assert UNVERSIONED_EMBEDDING_WARNING in bare.diagnostics.warnings
    assert "QUERY_MODEL_VERSION_UNKNOWN" in [w.code for w in bare.diagnostics.warning_details]
    for res in (named, wrapped, by_uid):
        assert UNVERSIONED_EMBEDDING_WARNING not in res.diagnostics.warnings
    assert [n.study_uid for n in bare.neighbors] == [n.study_uid for n in named.neighbors]
    with pytest.raises(ValueError, match="embedding query"):
        build_search_request(study_uid="S-1", model_version=MODEL_VERSION)


def test_async_client_sends_the_model_version(server: BackgroundServer, cohort) -> None:
    emb, _ = cohort

    async def run() -> tuple[list[str], str | None]:
        async with AsyncCohortsimClient(server.target) as client:
            ok = await client.search(embedding=StudyEmbedding(emb[5], MODEL_VERSION), k=2)
            try:
                await client.search(embedding=emb[5], k=2, model_version="enc-0123456789ab")
            except CohortsimClientError as exc:
                return ok.diagnostics.warnings, exc.reason
            return ok.diagnostics.warnings, None

    warnings, reason = asyncio.run(run())
    assert UNVERSIONED_EMBEDDING_WARNING not in warnings
    assert reason == "MODEL_VERSION_MISMATCH"


def test_embed_response_carries_the_version_in_the_vector() -> None:
    from service.convert import embed_response

    resp = embed_response(np.ones(4, np.float32) / 2, "enc-abcdefabcdef")
    assert resp.embedding.model_version == "enc-abcdefabcdef" == resp.model_version
    req = cohortsim_pb2.SearchSimilarRequest(embedding=resp.embedding, k=1)
    assert req.embedding.HasField("model_version")
