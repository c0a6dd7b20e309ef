"""A running server picks up new index versions (rebuild, rollback) without failing a call,
keeps the old one when the new one is broken, and honours deletions on the next call."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexing.snapshot import build_snapshot, publish, rollback
from indexing.tombstones import TOMBSTONE_FILE, add_tombstones
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer

from .conftest import DIM, MODEL_VERSION, make_cohort

WATCH_S = 0.1


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class QueryLoop:
    """A client querying in a loop on its own thread, recording versions and failures."""

    def __init__(self, target: str, vector: np.ndarray) -> None:
        self.target = target
        self.request = cohortsim_pb2.SearchSimilarRequest(
            embedding=cohortsim_pb2.Vector(values=vector.tolist()), k=10
        )
        self.versions: list[str] = []
        self.patients: list[set[str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
            while not self._stop.is_set():
                try:
                    resp = stub.SearchSimilar(self.request, timeout=30)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                else:
                    self.versions.append(resp.index_version)
                    self.patients.append({n.patient_id for n in resp.neighbors})

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def latest(self) -> str | None:
        return self.versions[-1] if self.versions else None


def test_rebuild_rollback_and_broken_version_while_querying(tmp_path: Path) -> None:
    emb, table = make_cohort(seed=0)
    index = tmp_path / "index"
    v1 = build_snapshot(index, emb, table, model_version=MODEL_VERSION)
    with (
        BackgroundServer(index, device="cpu", watch_interval=WATCH_S) as server,
        QueryLoop(server.target, emb[0]) as loop,
    ):
        wait_for(lambda: loop.latest() == v1)
        # a nightly rebuild publishes a new version while the client keeps querying
        emb2, table2 = make_cohort(seed=1)
        v2 = build_snapshot(index, emb2, table2, model_version=MODEL_VERSION)
        wait_for(lambda: loop.latest() == v2)
        # a broken version (fails its checksum) becomes CURRENT: the server keeps v2
        other = tmp_path / "other"
        v3 = build_snapshot(other, emb, table, model_version=MODEL_VERSION)
        shutil.copytree(other / "versions" / v3, index / "versions" / v3)
        (index / "versions" / v3 / "index.faiss").write_bytes(b"not an index")
        publish(index, v3)
        n = len(loop.versions)
        wait_for(lambda: len(loop.versions) > n + 20)
        assert loop.latest() == v2
        # a rollback is followed too
        rollback(index, v1)
        wait_for(lambda: loop.latest() == v1)
        # a withdrawn patient is gone from the very next answers
        victim = sorted(loop.patients[-1])[0]
        add_tombstones(index / TOMBSTONE_FILE, [victim])
        n = len(loop.patients)
        wait_for(lambda: len(loop.patients) > n + 2)
        assert all(victim not in p for p in loop.patients[n + 1 :])
    assert loop.errors == []
    seen = [v for i, v in enumerate(loop.versions) if i == 0 or loop.versions[i - 1] != v]
    assert seen == [v1, v2, v1]


def test_server_started_without_index_serves_once_one_is_built(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    with (
        BackgroundServer(index, device="cpu", watch_interval=WATCH_S) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        emb, table = make_cohort(seed=0)
        version = build_snapshot(index, emb, table, model_version=MODEL_VERSION)

        def serving() -> bool:
            req = health_pb2.HealthCheckRequest(service="")
            return health.Check(req, timeout=10).status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving)
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        resp = stub.SearchSimilar(
            cohortsim_pb2.SearchSimilarRequest(embedding=cohortsim_pb2.Vector(values=[0.1] * DIM), k=3),
            timeout=10,
        )
        assert resp.index_version == version and len(resp.neighbors) == 3


def test_watching_can_be_turned_off(tmp_path: Path) -> None:
    emb, table = make_cohort(seed=0)
    index = tmp_path / "index"
    v1 = build_snapshot(index, emb, table, model_version=MODEL_VERSION)
    with BackgroundServer(index, device="cpu", watch_interval=None) as server:
        build_snapshot(index, emb, table, model_version=MODEL_VERSION)
        time.sleep(0.5)
        with grpc.insecure_channel(server.target) as channel:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
            info = stub.GetIndexInfo(cohortsim_pb2.GetIndexInfoRequest(), timeout=10)
        assert info.index_version == v1
