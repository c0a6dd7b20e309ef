"""cohortsim listen: dcmtk's storescu / echoscu (real DICOM peers) sending to the C-STORE
SCP; allow-lists, refused SOP classes, full disk, a killed listener, a broken association,
and a stored study searchable by a running server without a restart."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from indexing.store import CohortStore
from service.api import cohortsim_pb2
from service.background import BackgroundServer
from service.client import CohortsimClient
from service.pacs.inflow import Inflow
from service.pacs.listener import ListenerConfig, StoreListener

from . import pacs_peers as pp

pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pp.need_dcmtk()
    return pp.make_site(tmp_path_factory.mktemp("listen-site"))


@pytest.fixture()
def listener(site: dict, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreListener]:
    """A listener on a free port into a store of its own; ``request.param`` overrides
    :class:`ListenerConfig` fields."""
    kw = dict(getattr(request, "param", {}))
    store = tmp_path / "store"
    inflow = Inflow(store, site["pseudo"], index_dir=kw.pop("index", None))
    config = ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=0.5, poll_s=0.2, **kw)
    lst = StoreListener(config, inflow)
    lst.start()
    yield lst
    lst.stop()


def _spooled(lst: StoreListener) -> list[Path]:
    return sorted(p for p in lst.spool.rglob("*") if p.is_file() and not p.name.startswith(".open-"))


def _wait(pred, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_echo_and_store_then_ingested_and_spool_cleaned(site: dict, listener: StoreListener, tmp_path: Path) -> None:
    assert pp.echoscu(listener.port).returncode == 0
    uid, files = pp.ct_study(tmp_path / "study", seed=11, patient="NEW-11")
    res = pp.storescu(listener.port, files)
    assert res.returncode == 0, res.stderr
    assert listener.received == len(files)
    assert oct(listener.spool.stat().st_mode & 0o777) == "0o700"
    _wait(lambda: listener.ingested_batches >= 1)
    store = CohortStore(tmp_path / "store")
    assert store.study_uids() == {site["pseudo"].study(uid)}
    assert _spooled(listener) == []  # nothing kept once ingested


@pytest.mark.parametrize("listener", [{"allowed_aets": ("MODALITY",)}], indirect=True)
def test_calling_ae_title_not_on_the_allow_list_is_rejected(listener: StoreListener, tmp_path: Path) -> None:
    _, files = pp.ct_study(tmp_path / "study", seed=12, patient="NEW-12")
    res = pp.storescu(listener.port, files, calling="INTRUDER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stderr
    assert listener.received == 0 and _spooled(listener) == []
    assert pp.storescu(listener.port, files[:1], calling="MODALITY").returncode == 0


def test_called_ae_title_must_be_ours(listener: StoreListener, tmp_path: Path) -> None:
    _, files = pp.ct_study(tmp_path / "study", seed=13, patient="NEW-13")
    res = pp.storescu(listener.port, files, called="SOMEONE")
    assert res.returncode != 0 and "Called AE Title Not Recognized" in res.stderr
    assert _spooled(listener) == []


@pytest.mark.parametrize("listener", [{"allowed_hosts": ("10.11.12.13",)}], indirect=True)
def test_host_not_on_the_allow_list_is_refused(listener: StoreListener, tmp_path: Path) -> None:
    _, files = pp.ct_study(tmp_path / "study", seed=14, patient="NEW-14")
    res = pp.storescu(listener.port, files)
    assert res.returncode != 0
    assert listener.received == 0 and _spooled(listener) == []


def test_non_image_sop_class_is_refused_with_0122(listener: StoreListener, tmp_path: Path) -> None:
    _, files = pp.ct_study(tmp_path / "study", seed=15, patient="NEW-15")
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.Modality = "OT"
    ds.save_as(tmp_path / "sc.dcm")
    res = subprocess.run(
        [pp.STORESCU, "-v", "-aet", "MODALITY", "-aec", "COHORTSIM", "127.0.0.1", str(listener.port), str(tmp_path / "sc.dcm")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert "Refused: SOPClassNotSupported" in res.stderr  # dcmtk's name of status 0x0122
    assert listener.refused == 1 and listener.received == 0
    assert _spooled(listener) == []


def test_full_disk_refuses_with_a700_and_keeps_what_was_acknowledged(
    listener: StoreListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, files = pp.ct_study(tmp_path / "study", seed=16, patient="NEW-16")
    real = StoreListener._write
    calls = {"n": 0}

    def failing(path: Path, data: bytes, *, fsync: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:  # the disk fills up at the third instance
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, fsync=fsync)

    monkeypatch.setattr(StoreListener, "_write", staticmethod(failing))
    res = subprocess.run(
        [pp.STORESCU, "-v", "-aet", "MODALITY", "-aec", "COHORTSIM", "127.0.0.1", str(listener.port), *map(str, files)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    out = res.stdout + res.stderr
    assert "Refused: OutOfResources" in out  # dcmtk's name of status 0xA7xx
    assert listener.received == 2 and listener.refused >= 1  # storescu stops at the refusal
    # the two acknowledged instances are on disk, nothing partial; the study is held
    assert len(_spooled(listener)) == 2
    assert not [p for p in listener.spool.rglob("*.tmp")]
    assert listener.stable_studies(now=time.time() + 600) == []
    assert listener.ingest_stable(now=time.time() + 600) == 0
    # space again: the sender re-sends the study, which is then ingested whole
    monkeypatch.setattr(StoreListener, "_write", staticmethod(real))
    assert pp.storescu(listener.port, files).returncode == 0
    _wait(lambda: listener.ingested_batches >= 1)
    assert listener._ingest.last_report.files_seen == len(files)  # type: ignore[attr-defined]
    assert _spooled(listener) == []


def test_broken_association_is_held_not_half_ingested(listener: StoreListener, tmp_path: Path) -> None:
    from pynetdicom import AE

    _, files = pp.ct_study(tmp_path / "study", seed=17, patient="NEW-17")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="COHORTSIM")
    assert assoc.is_established
    for f in files[:3]:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assoc.abort()  # the sender dies half-way
    _wait(lambda: not listener._assoc)
    assert len(_spooled(listener)) == 3  # acknowledged: kept
    assert listener.ingest_stable(now=time.time() + 600) == 0  # held: not half-ingested
    assert not (tmp_path / "store").exists() or CohortStore(tmp_path / "store").study_uids() == set()
    # the sender re-sends the whole study on a clean association: ingested whole
    assert pp.storescu(listener.port, files).returncode == 0
    _wait(lambda: listener.ingested_batches >= 1)
    assert listener._ingest.last_report.files_seen == len(files)  # type: ignore[attr-defined]
    assert listener._ingest.last_report.studies_ingested == 1  # type: ignore[attr-defined]


def _listen_cli(site: dict, tmp_path: Path, port: int, stable_s: float) -> subprocess.Popen[bytes]:
    repo = Path(__file__).resolve().parents[2]
    args = [
        sys.executable, "-c", "from service.cli import main; main()", "listen",
        "--store", str(tmp_path / "store"), "--spool", str(tmp_path / "spool"), "--port", str(port),
        "--stable-s", str(stable_s), "--secret-file", str(site["secret"]), "--workers", "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while pp.echoscu(port).returncode != 0:
        if proc.poll() is not None or time.monotonic() - t0 > 90:
            proc.kill()
            raise AssertionError(f"cohortsim listen did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        time.sleep(0.3)
    return proc


def test_killed_listener_ingests_acknowledged_instances_on_restart(site: dict, tmp_path: Path) -> None:
    pp.need_dcmtk()
    uid, files = pp.ct_study(tmp_path / "study", seed=18, patient="NEW-18")
    port = pp.free_port()
    proc = _listen_cli(site, tmp_path, port, stable_s=3600)  # never stable before the kill
    try:
        assert pp.storescu(port, files).returncode == 0  # all acknowledged
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    spooled = [p for p in (tmp_path / "spool").rglob("*.dcm")]
    assert len(spooled) == len(files)
    assert not (tmp_path / "store").exists() or CohortStore(tmp_path / "store").study_uids() == set()
    proc = _listen_cli(site, tmp_path, port, stable_s=0.5)
    try:
        _wait(lambda: (tmp_path / "store").exists() and bool(CohortStore(tmp_path / "store").study_uids()), 90)
        assert CohortStore(tmp_path / "store").study_uids() == {site["pseudo"].study(uid)}
        _wait(lambda: not list((tmp_path / "spool").rglob("*.dcm")), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_stored_study_is_searchable_by_the_running_server(site: dict, tmp_path: Path) -> None:
    """storescu -> listener -> ingest -> incremental publish -> live pickup; prints the time."""
    import shutil

    import grpc

    from service.api import cohortsim_pb2_grpc

    index = tmp_path / "index"
    shutil.copytree(site["index"], index)
    store = tmp_path / "store"
    shutil.copytree(site["store"], store)
    inflow = Inflow(store, site["pseudo"], index_dir=index)
    lst = StoreListener(ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=2.0, poll_s=0.5), inflow)
    lst.start()
    uid, files = pp.ct_study(tmp_path / "study", seed=19, patient="NEW-19")
    pseudonym = site["pseudo"].study(uid)
    try:
        with BackgroundServer(index, device="cpu", watch_interval=1.0) as srv, grpc.insecure_channel(srv.target) as ch:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            request = cohortsim_pb2.SearchSimilarRequest(study_uid=pseudonym, k=2)
            with pytest.raises(grpc.RpcError) as info:
                stub.SearchSimilar(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            t0 = time.monotonic()
            assert pp.storescu(lst.port, files).returncode == 0

            def found() -> bool:
                try:
                    stub.SearchSimilar(request, timeout=30)
                    return True
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    return False

            elapsed = _wait(found, 60)
            print(f"\nstored by storescu -> searchable by SearchSimilar: {time.monotonic() - t0:.1f} s")
            assert elapsed < 60
            info_rsp = CohortsimClient(srv.target).index_info()
            assert info_rsp.num_studies == 4
    finally:
        lst.stop()


def test_a_failed_publish_is_retried_without_losing_the_study(
    site: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import indexing.incremental as incremental
    from indexing.snapshot import load_snapshot

    index, store = tmp_path / "index", tmp_path / "store"
    shutil.copytree(site["index"], index)
    shutil.copytree(site["store"], store)
    real = incremental.publish_new_studies
    calls = {"n": 0}

    def flaky(*args, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:  # the index folder's disk is full once
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(incremental, "publish_new_studies", flaky)
    inflow = Inflow(store, site["pseudo"], index_dir=index)
    lst = StoreListener(ListenerConfig(spool=tmp_path / "spool", port=0, stable_s=0.5, poll_s=0.2), inflow,
                        on_tick=inflow.publish_pending)
    lst.start()
    try:
        uid, files = pp.ct_study(tmp_path / "study", seed=20, patient="NEW-20")
        assert pp.storescu(lst.port, files).returncode == 0
        _wait(lambda: inflow.last_publish is not None, 90)
    finally:
        lst.stop()
    assert calls["n"] >= 2
    assert site["pseudo"].study(uid) in set(load_snapshot(index, device="cpu").metadata.column("study_uid").to_pylist())
    assert _spooled(lst) == []
