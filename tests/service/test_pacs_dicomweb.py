"""DICOMweb against a real Orthanc (with its DICOMweb plugin), loaded by STOW-RS: the
resumable pull (cohortsim ingest --dicomweb), queries by PACS reference through gRPC,
and their failures (not in the PACS, PACS down, PACS too slow, no usable series)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from indexing.store import CohortStore
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.errors import ServiceError, reason_from_trailing
from service.pacs import query as pacs_query
from service.pacs.dicomweb import DicomwebConfig, fetch_study, uid_hash
from service.pacs.inflow import Inflow
from service.pacs.pull import pull_studies

from . import pacs_peers as pp

pytest.importorskip("dicomweb_client", reason="the pacs extra (dicomweb-client) is not installed")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    pp.need_orthanc()
    root = tmp_path_factory.mktemp("dicomweb")
    site = pp.make_site(root / "site")
    studies = [pp.ct_study(root / "pacs" / f"p{i}", seed=200 + i, patient=f"PACS-{i}") for i in range(2)]
    # a study with no usable image: one CT instance without pixel data
    ds = pydicom.dcmread(studies[0][1][0])
    del ds.PixelData
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.SeriesInstanceUID = ds.StudyInstanceUID + ".1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.StudyInstanceUID + ".1.1"
    ds.save_as(root / "nopixels.dcm")
    with pp.orthanc(root / "orthanc") as server:
        server.stow([f for _, files in studies for f in files] + [root / "nopixels.dcm"])
        yield {**site, "orthanc": server, "studies": studies, "unusable": ds.StudyInstanceUID, "root": root}


def _cli(*args: str) -> tuple[int, str, str]:
    from service.cli import app

    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def _copy_site(env: dict, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(env["store"], tmp_path / "store")
    shutil.copytree(env["index"], tmp_path / "index")
    return tmp_path / "store", tmp_path / "index"


def test_pull_publishes_into_a_running_server_and_a_rerun_fetches_nothing(env: dict, tmp_path: Path) -> None:
    store, index = _copy_site(env, tmp_path)
    uids = [uid for uid, _ in env["studies"]]
    pseudonyms = [env["pseudo"].study(u) for u in uids]
    with BackgroundServer(index, device="cpu", watch_interval=0.5) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        args = ["ingest", "--dicomweb", env["orthanc"].dicomweb, "--store", str(store), "--index", str(index),
                "--secret-file", str(env["secret"]), "--spool", str(tmp_path / "spool"), "--json", "--workers", "1",
                "--study", uids[0], "--study", uids[1]]
        code, out, err = _cli(*args)
        assert code == 0, err
        report = json.loads(out)
        assert report["studies_ingested"] == 2 and report["pacs"]["instances_fetched"] == 12
        assert report["published"]["added"] == 2
        assert {s["study"] for s in report["studies"]} == set(pseudonyms)
        assert "PACS-0" not in out and uids[0] not in out  # pseudonyms only

        def searchable() -> bool:
            try:
                stub.SearchSimilar(pb.SearchSimilarRequest(study_uid=pseudonyms[0], k=2), timeout=30)
                return True
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                return False

        t0 = time.monotonic()
        while not searchable():
            assert time.monotonic() - t0 < 30, "the running server did not pick up the pulled study"
            time.sleep(0.2)
    code, out, _ = _cli(*args)
    again = json.loads(out)
    assert again["studies_ingested"] == 0 and again["studies_already_present"] == 2
    assert again["pacs"]["instances_fetched"] == 0 and again["published"] is None
    assert not list((tmp_path / "spool").rglob("*.dcm"))  # nothing kept after the ingest


def test_pull_lists_with_qido_and_resumes_after_a_failure(env: dict, tmp_path: Path) -> None:
    cfg = DicomwebConfig(env["orthanc"].dicomweb)
    inflow = Inflow(tmp_path / "store", env["pseudo"], workers=1)
    spool = tmp_path / "spool"
    uid0 = env["studies"][0][0]
    # a run that fetched study 0 partly (4 of 6 instances) before it stopped
    got = fetch_study(cfg, uid0, spool / "partial" / uid_hash(uid0))
    for path in sorted((spool / "partial").rglob("*.dcm"))[:2]:
        path.unlink()

    def failing(folder: Path) -> None:
        raise RuntimeError("ingest failed")

    with pytest.raises(RuntimeError):  # the rest is fetched, then the ingest fails
        pull_studies(cfg, inflow.store(), pseudonymizer=env["pseudo"], spool=spool, modality="CT", ingest=failing)
    assert got.fetched == 6
    assert len(list(spool.rglob("*.dcm"))) == 13  # all three studies wait in the spool
    report, counts = pull_studies(cfg, inflow.store(), pseudonymizer=env["pseudo"], spool=spool, modality="CT",
                                  ingest=inflow.ingest)
    # the spooled studies are ingested without a fetch; only the one the ingest rejected
    # (so the store lacks it) is asked for again
    assert counts.instances_fetched == 1
    ingested = CohortStore(tmp_path / "store").study_uids()
    assert {env["pseudo"].study(u) for u, _ in env["studies"]} <= ingested
    assert any(r["reason"] for r in report.studies_rejected)  # the study without pixels


def test_pull_stores_reader_regions_with_the_pulled_study(env: dict, tmp_path: Path) -> None:
    """``ingest --dicomweb --regions``: the regions CSV (keyed by raw study uid or patient
    id) is applied to the studies as they arrive from the PACS, each a reader patch."""
    from encoders.regions import regions_from_csv

    uid0 = env["studies"][0][0]
    csv_path = tmp_path / "regions.csv"
    csv_path.write_text("study_instance_uid,reader,z0,y0,x0,z1,y1,x1\n"
                        f"{uid0},r1,1,8,8,4,20,20\n{uid0},r2,2,10,10,5,22,22\n")
    inflow = Inflow(tmp_path / "store", env["pseudo"], workers=1, regions=regions_from_csv(csv_path))
    report, _ = pull_studies(DicomwebConfig(env["orthanc"].dicomweb), inflow.store(), pseudonymizer=env["pseudo"],
                             spool=tmp_path / "spool", study_uids=[uid0], ingest=inflow.ingest)
    assert report.studies_ingested == 1 and report.regions_stored == 2
    (row,) = CohortStore(tmp_path / "store").patch_table().to_pylist()
    readers = [p["reader"] for p in json.loads(row["patch_info"]) if p["source"] == "reader"]
    assert row["study_uid"] == env["pseudo"].study(uid0) and readers == ["r1", "r2"]
    assert uid0 not in json.dumps(row)  # the raw key stays in memory


def test_regions_with_ray_are_refused_naming_why(env: dict, tmp_path: Path) -> None:
    csv_path = tmp_path / "regions.csv"
    csv_path.write_text("patient_id,reader,z0,y0,x0,z1,y1,x1\nPACS-0,r1,1,8,8,4,20,20\n")
    code, _, err = _cli("ingest", str(env["root"] / "pacs"), "--store", str(tmp_path / "store"),
                        "--secret-file", str(env["secret"]), "--regions", str(csv_path), "--ray", "local")
    assert code != 0 and "--regions is not taken with --ray" in err and "worker" in err
    assert not (tmp_path / "store").exists()


def test_pull_reports_a_study_not_in_the_pacs(env: dict, tmp_path: Path) -> None:
    code, out, err = _cli("ingest", "--dicomweb", env["orthanc"].dicomweb, "--store", str(tmp_path / "store"),
                          "--secret-file", str(env["secret"]), "--json", "--study", "1.2.3.4.5.6.7.8.9")
    assert code == 0, err
    report = json.loads(out)
    assert report["studies_rejected"][0]["reason"] == "study_not_in_pacs"
    assert report["pacs"]["studies_not_found"] == [env["pseudo"].study("1.2.3.4.5.6.7.8.9")]


def test_pull_from_a_pacs_that_is_down_fails_with_one_line(env: dict, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{pp.free_port()}/dicom-web"
    code, _, err = _cli("ingest", "--dicomweb", url, "--store", str(tmp_path / "store"),
                        "--secret-file", str(env["secret"]))
    assert code == 1
    assert err.strip().startswith("cohortsim: error: cannot reach the PACS at http://127.0.0.1")
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------- query by reference


@pytest.fixture(scope="module")
def pacs_server(env: dict) -> Iterator[BackgroundServer]:
    with BackgroundServer(env["index"], device="cpu", pacs=DicomwebConfig(env["orthanc"].dicomweb)) as srv:
        yield srv


def _stub(target: str) -> tuple[grpc.Channel, cohortsim_pb2_grpc.PatientSimilarityServiceStub]:
    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    return ch, cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)


def _error(call, request, timeout: float = 60) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    exc = info.value
    return exc.code(), reason_from_trailing(exc.trailing_metadata()), exc.details()


def test_search_by_pacs_reference_equals_the_dicom_upload(env: dict, pacs_server: BackgroundServer) -> None:
    uid, files = env["studies"][1]
    ch, stub = _stub(pacs_server.target)
    with ch:
        by_ref = stub.SearchSimilar(pb.SearchSimilarRequest(pacs=pb.PacsStudy(study_instance_uid=uid), k=3), timeout=60)
        upload = stub.SearchSimilar(
            pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=[f.read_bytes() for f in files]), k=3), timeout=60
        )
        assert [n.study_uid for n in by_ref.neighbors] == [n.study_uid for n in upload.neighbors]
        np.testing.assert_allclose([n.similarity for n in by_ref.neighbors], [n.similarity for n in upload.neighbors], atol=1e-5)
        e1 = stub.EmbedStudy(pb.EmbedStudyRequest(pacs=pb.PacsStudy(study_instance_uid=uid)), timeout=60)
        e2 = stub.EmbedStudy(pb.EmbedStudyRequest(dicom=pb.DicomStudy(files=[f.read_bytes() for f in files])), timeout=60)
        np.testing.assert_allclose(e1.embedding.values, e2.embedding.values, atol=1e-5)


def test_pacs_reference_errors(env: dict, pacs_server: BackgroundServer) -> None:
    ch, stub = _stub(pacs_server.target)
    with ch:
        code, reason, msg = _error(stub.SearchSimilar, pb.SearchSimilarRequest(pacs=pb.PacsStudy(study_instance_uid="1.2.3.4.99")))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "STUDY_NOT_IN_PACS") and env["orthanc"].dicomweb in msg
        code, reason, _ = _error(stub.SearchSimilar, pb.SearchSimilarRequest(pacs=pb.PacsStudy(study_instance_uid=env["unusable"])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and reason is not None and reason.startswith("DICOM_")
        code, reason, _ = _error(stub.EmbedStudy, pb.EmbedStudyRequest(pacs=pb.PacsStudy(study_instance_uid="not a uid")))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_STUDY_INSTANCE_UID")


def test_pacs_down_slow_or_missing(env: dict) -> None:
    down = f"http://127.0.0.1:{pp.free_port()}/dicom-web"
    # a "PACS" that accepts connections and never answers
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        slow.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(slow.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    slow_url = f"http://127.0.0.1:{slow.getsockname()[1]}/dicom-web"
    ref = pb.PacsStudy(study_instance_uid=env["studies"][0][0])
    try:
        with BackgroundServer(env["index"], device="cpu", pacs=DicomwebConfig(down)) as srv:
            ch, stub = _stub(srv.target)
            with ch:
                code, reason, msg = _error(stub.SearchSimilar, pb.SearchSimilarRequest(pacs=ref))
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PACS_UNREACHABLE") and down in msg
        with BackgroundServer(env["index"], device="cpu", pacs=DicomwebConfig(slow_url, timeout_s=30)) as srv:
            ch, stub = _stub(srv.target)
            with ch:
                t0 = time.monotonic()
                code, reason, msg = _error(stub.SearchSimilar, pb.SearchSimilarRequest(pacs=ref), timeout=3)
                assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "PACS_TIMEOUT") and slow_url in msg
                assert time.monotonic() - t0 < 3.5
        with BackgroundServer(env["index"], device="cpu", pacs=DicomwebConfig(slow_url, timeout_s=1)) as srv:
            ch, stub = _stub(srv.target)
            with ch:
                code, reason, _ = _error(stub.EmbedStudy, pb.EmbedStudyRequest(pacs=ref))
                assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "PACS_TIMEOUT")
        with BackgroundServer(env["index"], device="cpu") as srv:  # no --dicomweb
            ch, stub = _stub(srv.target)
            with ch:
                code, reason, _ = _error(stub.SearchSimilar, pb.SearchSimilarRequest(pacs=ref))
                assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PACS")
    finally:
        stop.set()
        for s in held:
            s.close()
        slow.close()


def test_researchers_may_not_query_by_pacs_reference() -> None:
    import asyncio

    with pytest.raises(ServiceError) as info:
        asyncio.run(pacs_query.fetch(DicomwebConfig("http://127.0.0.1:9/dicom-web"), pb.PacsStudy(study_instance_uid="1.2.3"),
                                     None, max_files=10, restricted=True))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and info.value.reason == "PACS_QUERY_NOT_ALLOWED"


def test_cli_query_by_pacs_reference(env: dict, pacs_server: BackgroundServer) -> None:
    uid = env["studies"][0][0]
    code, out, err = _cli("query", "--server", pacs_server.target, "--pacs-study", uid, "--k", "2", "--json")
    assert code == 0, err
    assert len(json.loads(out)["neighbors"]) == 2
    code, _, err = _cli("query", "--server", pacs_server.target, "--pacs-study", "1.2.3.4.99")
    assert code == 2 and err.startswith("cohortsim: error:") and "not in the PACS" in err


def test_folder_ingest_publishes_into_the_index(env: dict, tmp_path: Path) -> None:
    """The first way in, with --index: the same incremental publish as the PACS paths."""
    from indexing.snapshot import load_snapshot

    store, index = _copy_site(env, tmp_path)
    uid, _ = pp.ct_study(tmp_path / "dicom" / "new", seed=300, patient="FOLDER-1")
    before = load_snapshot(index, device="cpu").num_studies
    code, _, err = _cli("ingest", str(tmp_path / "dicom"), "--store", str(store), "--index", str(index),
                        "--secret-file", str(env["secret"]), "--workers", "1")
    assert code == 0, err
    assert "published index version" in err
    snap = load_snapshot(index, device="cpu")
    assert snap.num_studies == before + 1
    assert env["pseudo"].study(uid) in set(snap.metadata.column("study_uid").to_pylist())
