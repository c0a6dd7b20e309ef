"""The gRPC service end to end in-process: answers, status codes, health, reflection."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from indexing.snapshot import load_snapshot
from service.api import SERVICE_FULL_NAME, cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.client import AsyncCohortsimClient, CohortsimClient, CohortsimClientError

from .conftest import DIM, MODEL_VERSION, N_STUDIES


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with CohortsimClient(server.target, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: BackgroundServer):
    with grpc.insecure_channel(server.target) as channel:
        yield cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)


def error_of(call, request) -> tuple[grpc.StatusCode, str, str | None]:
    """Call a stub method expecting failure: (code, message, ErrorInfo reason)."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=20)
    err = info.value
    status = rpc_status.from_call(err)
    reason = None
    if status is not None:
        for detail in status.details:
            ei = error_details_pb2.ErrorInfo()
            if detail.Unpack(ei):
                assert ei.domain == "cohortsim.v1"
                reason = ei.reason
    return err.code(), err.details(), reason


def vector_request(values, k: int = 10) -> cohortsim_pb2.SearchSimilarRequest:
    return cohortsim_pb2.SearchSimilarRequest(
        embedding=cohortsim_pb2.Vector(values=list(values)), k=k
    )


# --------------------------------------------------------------------------- answers


def test_index_info(client: CohortsimClient, index_dir: Path) -> None:
    info = client.index_info()
    snap = load_snapshot(index_dir, device="cpu")
    assert info.num_studies == N_STUDIES
    assert info.dimension == DIM
    assert info.metric == "cosine"
    assert info.index_kind == "Flat"
    assert info.model_version == MODEL_VERSION
    assert info.index_version == snap.version
    assert info.gpu is False
    assert info.dicom_supported is False
    assert info.max_k >= 100
    assert info.create_time is not None and info.create_time.tzinfo is not None


def test_search_by_embedding_matches_in_process_search(
    client: CohortsimClient, index_dir: Path, cohort: tuple[np.ndarray, pa.Table]
) -> None:
    emb, table = cohort
    rng = np.random.default_rng(7)
    query = emb[3] + 0.1 * rng.normal(size=DIM).astype(np.float32)
    result = client.search(embedding=query, k=12)

    snap = load_snapshot(index_dir, device="cpu")
    q = (query / np.linalg.norm(query.astype(np.float64))).astype(np.float32)
    sims, rows = snap.search(q[None, :], 12)
    uids = table.column("study_uid").to_pylist()
    assert [n.study_uid for n in result.neighbors] == [uids[r] for r in rows[0]]
    np.testing.assert_allclose([n.similarity for n in result.neighbors], sims[0], atol=1e-5)
    assert result.index_version == snap.version
    assert result.model_version == MODEL_VERSION
    # neighbours carry metadata and outcomes; best first
    sims_out = [n.similarity for n in result.neighbors]
    assert sims_out == sorted(sims_out, reverse=True)
    first = result.neighbors[0]
    assert first.site in ("north", "south")
    assert first.acquisition["manufacturer"] and first.acquisition["kvp"] == "120"


def test_prognosis_is_consistent(
    client: CohortsimClient, cohort: tuple[np.ndarray, pa.Table]
) -> None:
    emb, _ = cohort
    result = client.search(embedding=emb[10], k=30)
    assert math.isclose(sum(n.weight for n in result.neighbors), 1.0, abs_tol=1e-6)
    p = result.prognosis
    assert p.survival, "expected a survival curve"
    for s in p.survival:
        assert 0.0 <= s.lower <= s.survival <= s.upper <= 1.0
        assert s.at_risk >= 1
    times = [s.time for s in p.survival]
    assert times == sorted(times)
    assert p.time_unit == "months"
    assert [h.time for h in p.at_horizons] == [12.0, 24.0, 60.0]
    for h in p.at_horizons:
        if h.survival is not None:
            assert h.lower <= h.survival <= h.upper
    with_outcome = [n for n in result.neighbors if n.time is not None and n.event is not None]
    assert p.neighbors_with_outcome == len(with_outcome)
    assert p.events == sum(1 for n in with_outcome if n.event)
    assert 1.0 <= p.effective_sample_size <= 30.0
    (dist,) = p.label_distributions
    assert dist.name == "histology"
    assert math.isclose(sum(s.share for s in dist.shares), 1.0, abs_tol=1e-6)
    (vs,) = p.value_summaries
    assert vs.name == "tumor_volume_ml" and vs.lower <= vs.mean <= vs.upper
    d = result.diagnostics
    assert 0.0 <= d.ood_percentile <= 1.0
    assert d.same_scanner_share is None  # the query's scanner is unknown for embeddings
    # neighbours without outcomes have unset (None) time/event, never NaN
    missing = [n for n in result.neighbors if n.time is None]
    assert all(n.event is None and n.labels == {} for n in missing)
    assert result.to_dict()["neighbors"][0]["study_uid"] == result.neighbors[0].study_uid


def test_search_by_study_uid_excludes_the_study_and_its_patient(
    client: CohortsimClient, cohort: tuple[np.ndarray, pa.Table]
) -> None:
    _, table = cohort
    uid, patient = table.column("study_uid")[0].as_py(), table.column("patient_id")[0].as_py()
    # patient 0 has two studies (rows 0 and 1): neither may come back
    result = client.search(study_uid=uid, k=20)
    assert len(result.neighbors) == 20
    assert uid not in {n.study_uid for n in result.neighbors}
    assert patient not in {n.patient_id for n in result.neighbors}


def test_default_k_is_ten(stub) -> None:
    req = cohortsim_pb2.SearchSimilarRequest(study_uid=f"S-{5:024x}")
    assert len(stub.SearchSimilar(req, timeout=20).neighbors) == 10


def test_async_client(server: BackgroundServer) -> None:
    async def main():
        async with AsyncCohortsimClient(server.target, timeout=20) as c:
            info = await c.index_info()
            result = await c.search(study_uid=f"S-{7:024x}", k=5)
            health = await c.health()
            with pytest.raises(CohortsimClientError) as err:
                await c.search(study_uid="S-nope", k=5)
            return info, result, health, err.value

    info, result, health, err = asyncio.run(main())
    assert info.num_studies == N_STUDIES
    assert len(result.neighbors) == 5
    assert health == "SERVING"
    assert err.code == "NOT_FOUND" and err.reason == "UNKNOWN_STUDY"


# --------------------------------------------------------------------------- errors


def test_wrong_dimension(stub) -> None:
    code, message, reason = error_of(stub.SearchSimilar, vector_request([0.1] * (DIM + 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "WRONG_DIMENSION"
    assert str(DIM) in message


def test_empty_embedding(stub) -> None:
    code, _, reason = error_of(stub.SearchSimilar, vector_request([]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_DIMENSION")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding(stub, bad: float) -> None:
    values = [0.1] * DIM
    values[3] = bad
    code, _, reason = error_of(stub.SearchSimilar, vector_request(values))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NON_FINITE_EMBEDDING")


def test_zero_embedding(stub) -> None:
    code, _, reason = error_of(stub.SearchSimilar, vector_request([0.0] * DIM))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ZERO_EMBEDDING")


@pytest.mark.parametrize("k", [-1, 100_000])
def test_k_out_of_range(stub, k: int) -> None:
    code, message, reason = error_of(stub.SearchSimilar, vector_request([0.1] * DIM, k=k))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_K")
    assert "k must be between 1 and" in message


def test_unknown_study(stub) -> None:
    code, _, reason = error_of(
        stub.SearchSimilar, cohortsim_pb2.SearchSimilarRequest(study_uid="S-not-in-index")
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_STUDY")


def test_empty_request(stub) -> None:
    code, message, reason = error_of(stub.SearchSimilar, cohortsim_pb2.SearchSimilarRequest())
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_QUERY")
    assert message == "set one of embedding, study_uid, dicom, pacs"


def test_filter_restricts_neighbours(stub) -> None:
    req = vector_request([0.1] * DIM, k=15)
    req.filter.where = "site = 'north' AND manufacturer IN ('GE', 'SIEMENS')"
    resp = stub.SearchSimilar(req, timeout=20)
    assert len(resp.neighbors) == 15
    assert {n.site for n in resp.neighbors} == {"north"}
    assert {n.acquisition["manufacturer"] for n in resp.neighbors} <= {"GE", "SIEMENS"}


def test_bad_filter_is_invalid_argument_with_columns(stub) -> None:
    req = vector_request([0.1] * DIM)
    req.filter.where = "scanner_brand = 'GE'"
    code, message, reason = error_of(stub.SearchSimilar, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
    assert "scanner_brand" in message and "manufacturer" in message and "site" in message
    req.filter.where = "site = 'north' AND"
    code, message, reason = error_of(stub.SearchSimilar, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
    assert "position" in message


def test_search_parameters_on_exact_index_are_refused(stub) -> None:
    req = vector_request([0.1] * DIM)
    req.search_parameters.nprobe = 4
    code, message, reason = error_of(stub.SearchSimilar, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY")
    assert "exact" in message


def test_dicom_query_on_embeddings_only_index(stub) -> None:
    req = cohortsim_pb2.SearchSimilarRequest(dicom=cohortsim_pb2.DicomStudy(files=[b"DICM"]))
    code, message, reason = error_of(stub.SearchSimilar, req)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ENCODER")
    assert "send an embedding" in message
    code, _, reason = error_of(
        stub.EmbedStudy,
        cohortsim_pb2.EmbedStudyRequest(dicom=cohortsim_pb2.DicomStudy(files=[b"x"])),
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ENCODER")


def test_empty_dicom_study(stub) -> None:
    req = cohortsim_pb2.SearchSimilarRequest(dicom=cohortsim_pb2.DicomStudy())
    code, _, reason = error_of(stub.SearchSimilar, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "NO_FILES")


def test_client_error_is_one_line(client: CohortsimClient) -> None:
    with pytest.raises(CohortsimClientError) as info:
        client.search(embedding=np.ones(DIM + 3, np.float32))
    err = info.value
    assert err.code == "INVALID_ARGUMENT" and err.reason == "WRONG_DIMENSION"
    assert "\n" not in str(err) and str(err).startswith("INVALID_ARGUMENT: ")


def test_unreachable_server_is_unavailable() -> None:
    with (
        CohortsimClient("127.0.0.1:1", timeout=2) as c,
        pytest.raises(CohortsimClientError) as info,
    ):
        c.index_info()
    assert info.value.code == "UNAVAILABLE"


# --------------------------------------------------------------------------- health, reflection


def test_health_serving(client: CohortsimClient, server: BackgroundServer) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_FULL_NAME), timeout=10
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_FULL_NAME),
        ]
        listed, files = list(refl.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICE_FULL_NAME in names
    assert "grpc.health.v1.Health" in names
    assert files.file_descriptor_response.file_descriptor_proto


def test_missing_index_is_not_serving(tmp_path: Path) -> None:
    with (
        BackgroundServer(tmp_path / "no-index", device="cpu") as srv,
        CohortsimClient(srv.target, timeout=10) as c,
    ):
        assert c.health() == "NOT_SERVING"
        assert c.health("") == "NOT_SERVING"
        with pytest.raises(CohortsimClientError) as info:
            c.index_info()
        assert info.value.code == "UNAVAILABLE" and info.value.reason == "INDEX_UNAVAILABLE"


def test_unexpected_error_is_internal_without_details(
    client: CohortsimClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("secret detail P-0000000000000001")

    monkeypatch.setattr("service.servicer.search_similar", boom)
    with pytest.raises(CohortsimClientError) as info:
        client.search(study_uid=f"S-{9:024x}", k=3)
    err = info.value
    assert (err.code, err.reason) == ("INTERNAL", "INTERNAL")
    assert "secret" not in err.message and "ref" in err.message
