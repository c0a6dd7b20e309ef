"""The RPCs beyond search: GetPatient, ListStudies (pages, filter), GetCohortStats (and its
researcher view), DeletePatient, ReloadIndex, IngestStudies without a store, and
SearchSimilarStream's framing and cap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from indexing.snapshot import build_snapshot
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc as pb_grpc
from service.background import BackgroundServer
from service.client import CohortsimClient, CohortsimClientError, stream_search_requests
from service.governance import DisclosurePolicy, Governance

from .conftest import MODEL_VERSION, N_STUDIES, make_cohort


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[CohortsimClient]:
    with CohortsimClient(server.target) as c:
        yield c


def test_get_patient(client: CohortsimClient, cohort) -> None:
    _, table = cohort
    pid = table.column("patient_id")[0].as_py()  # patient 0 has studies 0 and 1
    rec = client.get_patient(pid)
    assert rec.patient_id == pid
    assert [s.study_uid for s in rec.studies] == [
        table.column("study_uid")[0].as_py(),
        table.column("study_uid")[1].as_py(),
    ]
    assert rec.studies[0].acquisition["manufacturer"] == table.column("manufacturer")[0].as_py()
    assert rec.time == pytest.approx(table.column("time")[0].as_py())
    with pytest.raises(CohortsimClientError) as err:
        client.get_patient("P-ffffffffffffffff")
    assert (err.value.code, err.value.reason) == ("NOT_FOUND", "UNKNOWN_PATIENT")
    with pytest.raises(CohortsimClientError) as err:
        client.get_patient("Jane Doe")
    assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "INVALID_PATIENT_ID")


def test_list_studies_pages_cover_the_index_once(client: CohortsimClient, cohort) -> None:
    _, table = cohort
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = client.list_studies(page_size=64, page_token=token)
        assert page.total_size == N_STUDIES
        seen += [s.study_uid for s in page.studies]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 4
    assert seen == table.column("study_uid").to_pylist()
    north = client.list_studies(page_size=1000, where="site = 'north'")
    assert north.total_size == N_STUDIES // 2 and not north.next_page_token
    assert {s.site for s in north.studies} == {"north"}
    for kw, reason in [
        ({"page_size": 5000}, "INVALID_PAGE_SIZE"),
        ({"page_token": "garbage"}, "INVALID_PAGE_TOKEN"),
        # a token of another filter is refused, not silently reused
        ({"page_token": client.list_studies(page_size=10).next_page_token, "where": "site = 'north'"}, "INVALID_PAGE_TOKEN"),
        ({"where": "no_such_column = 1"}, None),
    ]:
        with pytest.raises(CohortsimClientError) as err:
            client.list_studies(**kw)  # type: ignore[arg-type]
        assert err.value.code == "INVALID_ARGUMENT"
        if reason:
            assert err.value.reason == reason


def test_cohort_stats_counts(client: CohortsimClient, cohort) -> None:
    _, table = cohort
    stats = client.cohort_stats()
    assert stats.study_count == N_STUDIES
    assert stats.patient_count == len(set(table.column("patient_id").to_pylist()))
    assert {c.value: c.study_count for c in stats.sites} == {"north": 100, "south": 100}
    assert sum(c.study_count for c in stats.scanners) == N_STUDIES
    labels = table.column("labels").to_pylist()
    adeno = {p for p, lab in zip(table.column("patient_id").to_pylist(), labels, strict=True)
             if lab and dict(lab).get("histology") == "adeno"}
    assert stats.labels[("histology", "adeno")] == len(adeno)
    assert not stats.withheld_fields


def test_cohort_stats_researcher_view_withholds_small_cells() -> None:
    m = 11
    resp = pb.GetCohortStatsResponse(
        study_count=100, patient_count=90,
        sites=[pb.CategoryCount(value="a", study_count=85, patient_count=85),
               pb.CategoryCount(value="b", study_count=5, patient_count=5)],
        scanners=[pb.CategoryCount(value="GE x", study_count=100, patient_count=90)],
        labels=[pb.LabelCount(name="h", value="x", patient_count=40),
                pb.LabelCount(name="h", value="y", patient_count=35),
                pb.LabelCount(name="h", value="z", patient_count=3)],
    )
    out = Governance(DisclosurePolicy(min_cell=m)).cohort_stats(resp)
    sites = {c.value: (c.study_count, c.patient_count) for c in out.sites}
    assert sites == {"a": (0, 0), "b": (0, 0)}  # b is small; a's complement (5) is small too
    assert [c.patient_count for c in out.scanners] == [90]
    # z (3) is withheld, and y with it: z alone would be the labelled total less the
    # shown labels (secondary suppression)
    assert {lab.value: lab.patient_count for lab in out.labels} == {"x": 40, "y": 0, "z": 0}
    assert out.disclosure_control.min_cell_count == m
    assert "labels[h=z]" in out.disclosure_control.withheld_fields
    # every count left is 0 or >= m
    for c in [*out.sites, *out.scanners]:
        assert c.patient_count == 0 or c.patient_count >= m


@pytest.fixture()
def own_index(tmp_path: Path) -> Path:
    emb, table = make_cohort(seed=5)
    build_snapshot(tmp_path, emb, table, model_version=MODEL_VERSION, kind="Flat")
    return tmp_path


def test_delete_patient_and_reload_index(own_index: Path) -> None:
    emb, table = make_cohort(seed=5)
    pid = table.column("patient_id")[0].as_py()
    with BackgroundServer(own_index, device="cpu", watch_interval=None) as srv, CohortsimClient(srv.target) as c:
        uid0 = table.column("study_uid")[0].as_py()
        assert uid0 in [nb.study_uid for nb in c.search(embedding=emb[0], k=3).neighbors]
        assert c.delete_patient(pid) == (True, 2)
        assert c.delete_patient(pid) == (False, 0)  # already hidden
        assert uid0 not in [nb.study_uid for nb in c.search(embedding=emb[0], k=3).neighbors]
        with pytest.raises(CohortsimClientError) as err:
            c.get_patient(pid)
        assert err.value.code == "NOT_FOUND"
        assert c.list_studies(page_size=1).total_size == N_STUDIES - 2
        # ReloadIndex: nothing new -> same version; a published new version -> swapped now
        old = c.index_info().index_version
        assert c.reload_index() == (old, False)
        # build_snapshot publishes (CURRENT); the server is not watching, ReloadIndex swaps
        version = build_snapshot(own_index, emb[:100], table.slice(0, 100), model_version=MODEL_VERSION, kind="Flat")
        assert c.reload_index() == (version, True)
        assert c.index_info().num_studies == 98  # the withdrawn patient's rows were dropped


def test_list_studies_keeps_spacing_inside_quoted_values(tmp_path: Path) -> None:
    # sites 'a  b' and 'a b': each filter selects its own rows, whichever ran first
    emb, table = make_cohort(seed=5)
    sites = ["a  b" if i % 2 else "a b" for i in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("site"), "site", pa.array(sites))
    build_snapshot(tmp_path, emb, table, model_version=MODEL_VERSION, kind="Flat")
    with BackgroundServer(tmp_path, device="cpu", watch_interval=None) as srv, CohortsimClient(srv.target) as c:
        for where, want in [("site = 'a b'", "a b"), ("site = 'a  b'", "a  b"), (" site='a b' ", "a b")]:
            page = c.list_studies(page_size=1000, where=where)
            assert page.total_size == N_STUDIES // 2, where
            assert {s.site for s in page.studies} == {want}, where
        rows = c.cohort_stats(where="site = 'a  b'")
        assert [(x.value, x.study_count) for x in rows.sites] == [("a  b", N_STUDIES // 2)]


def test_ingest_without_a_store_is_a_failed_precondition(client: CohortsimClient) -> None:
    with pytest.raises(CohortsimClientError) as err:
        client.ingest([[b"not dicom"]])
    assert (err.value.code, err.value.reason) == ("FAILED_PRECONDITION", "NO_STORE")


def test_search_stream_framing_and_cap(index_dir: Path) -> None:
    srv = BackgroundServer(index_dir, device="cpu", max_stream_mb=1, watch_interval=None)
    with srv, CohortsimClient(srv.target) as c, grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.PatientSimilarityServiceStub(channel)
            # an embedding query belongs to SearchSimilar
            req = pb.SearchSimilarRequest(embedding=pb.Vector(values=[1.0] * 32))
            with pytest.raises(Exception) as err:
                stub.SearchSimilarStream(iter([pb.SearchSimilarStreamRequest(request=req)]), timeout=10)
            assert "STREAM_NOT_DICOM" in str(err.value.trailing_metadata())  # type: ignore[attr-defined]
            # chunks before the request
            chunk = pb.SearchSimilarStreamRequest(chunk=pb.DicomFileChunk(data=b"x", last=True))
            with pytest.raises(grpc.RpcError) as rerr:
                stub.SearchSimilarStream(iter([chunk]), timeout=10)
            assert CohortsimClientError.from_rpc_error(rerr.value).reason == "STREAM_WITHOUT_REQUEST"
            # this index has no encoder: refused at the request, before any chunk is
            # buffered (the cap itself: tests/service/test_upload_budget.py)
            big = [b"\0" * (700 << 10), b"\0" * (700 << 10)]
            with pytest.raises(CohortsimClientError) as cerr:
                c.search_stream(big, k=3, chunk_bytes=256 << 10)
            assert (cerr.value.code, cerr.value.reason) == ("FAILED_PRECONDITION", "NO_ENCODER")
            assert c.index_info().num_studies == N_STUDIES
    # the chunking reassembles files exactly
    msgs = list(stream_search_requests([b"a" * 5, b"b" * 3], pb.SearchSimilarRequest(), chunk_bytes=2))
    files, cur = [], b""
    for msg in msgs[1:]:
        cur += msg.chunk.data
        if msg.chunk.last:
            files.append(cur)
            cur = b""
    assert files == [b"a" * 5, b"b" * 3]


def test_max_concurrent_rpcs_answers_resource_exhausted(index_dir: Path) -> None:
    """A call held open (a stream whose client has not finished sending) fills the
    server's single slot; the next call is refused at once, and the server lives on."""
    import asyncio

    import grpc

    from service.api import cohortsim_pb2_grpc

    srv = BackgroundServer(index_dir, device="cpu", max_concurrent_rpcs=1, watch_interval=None)

    async def run() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            gate = asyncio.Event()

            async def held():  # type: ignore[no-untyped-def]
                await gate.wait()
                yield pb.SearchSimilarStreamRequest(request=pb.SearchSimilarRequest(k=3))

            call = stub.SearchSimilarStream(held(), timeout=10)
            await asyncio.sleep(0.3)
            try:
                await stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=5)
                second = "OK"
            except grpc.aio.AioRpcError as exc:
                second = exc.code().name
            gate.set()
            try:
                await call
                first = "OK"
            except grpc.aio.AioRpcError as exc:
                first = exc.code().name
            return second, first

    with srv:
        second, first = asyncio.run(run())
        with CohortsimClient(srv.target) as c:
            for _ in range(50):  # the slot frees once the server has finished the first call
                try:
                    assert c.index_info().num_studies == N_STUDIES
                    break
                except CohortsimClientError as exc:
                    assert exc.code == "RESOURCE_EXHAUSTED"
                    time.sleep(0.1)
            else:
                raise AssertionError("the server never freed its call slot")
    assert second == "RESOURCE_EXHAUSTED"
    assert first == "FAILED_PRECONDITION"  # the held stream's index has no encoder
