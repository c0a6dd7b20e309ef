"""Live swap under load: several clients query without pause while a rebuild
publishes a new version and the server switches, then ``cohortsim index rollback``
switches back. No call fails, and every answer is exactly the answer of the one version
its ``index_version`` names (the same neighbours with the same scores), never a mix."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
from typer.testing import CliRunner

from indexing.snapshot import build_snapshot, current_version
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.cli import app

from .conftest import MODEL_VERSION, make_cohort

WATCH_S = 0.1
K = 10
CLIENTS = 4
PER_PHASE = 15  # answers each client must get from a version before the next step

Answer = tuple[str, tuple[tuple[str, float], ...]]  # (index_version, ((study_uid, score), ...))


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def expected_top_k(
    emb: np.ndarray, table: pa.Table, query: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Exact top-K ``(study ids, scores)`` of ``query`` in a cohort, by brute force."""
    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ (query / np.linalg.norm(query))
    order = np.argsort(-sims, kind="stable")[:K]
    uids = table.column("study_uid").to_pylist()
    return [uids[i] for i in order], sims[order]


class Client:
    """One client on its own thread and channel, querying back to back until stopped."""

    def __init__(self, target: str, query: np.ndarray) -> None:
        self.target = target
        self.query = query
        self.request = cohortsim_pb2.SearchSimilarRequest(
            embedding=cohortsim_pb2.Vector(values=query.tolist()), k=K
        )
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
            while not self.stop.is_set():
                try:
                    resp = stub.SearchSimilar(self.request, timeout=30)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                else:
                    hits = tuple((n.study_uid, n.similarity) for n in resp.neighbors)
                    self.answers.append((resp.index_version, hits))

    def count(self, version: str) -> int:
        return sum(1 for v, _ in list(self.answers) if v == version)


def test_swap_and_cli_rollback_under_load(tmp_path: Path) -> None:
    index = tmp_path / "index"
    emb1, table1 = make_cohort(seed=0)
    emb2, table2 = make_cohort(seed=1)
    table2 = table2.slice(0, 180)  # the new version also has another size
    emb2 = emb2[:180]
    v1 = build_snapshot(index, emb1, table1, model_version=MODEL_VERSION)
    queries = np.random.default_rng(7).normal(size=(CLIENTS, emb1.shape[1])).astype(np.float32)

    with BackgroundServer(index, device="cpu", watch_interval=WATCH_S) as server:
        clients = [Client(server.target, q) for q in queries]
        for c in clients:
            c.thread.start()
        try:
            wait_for(lambda: all(c.count(v1) >= PER_PHASE for c in clients))
            # the rebuild runs (and publishes) while every client keeps querying
            v2 = build_snapshot(index, emb2, table2, model_version=MODEL_VERSION)
            wait_for(lambda: all(c.count(v2) >= PER_PHASE for c in clients))
            runner = CliRunner()
            res = runner.invoke(app, ["index", "rollback", str(index), v1])
            assert res.exit_code == 0, res.output
            assert current_version(index) == v1
            n_before = [len(c.answers) for c in clients]
            wait_for(
                lambda: all(
                    sum(v == v1 for v, _ in c.answers[n:]) >= PER_PHASE
                    for c, n in zip(clients, n_before, strict=True)
                )
            )
        finally:
            for c in clients:
                c.stop.set()
            for c in clients:
                c.thread.join(timeout=30)

    cohorts = {v1: (emb1, table1), v2: (emb2, table2)}
    for c in clients:
        assert c.errors == []  # no call failed through the swap or the rollback
        expected = {v: expected_top_k(e, t, c.query) for v, (e, t) in cohorts.items()}
        for version, hits in c.answers:
            assert version in cohorts
            # the answer is the named version's own: its neighbours, its scores (to float32
            # rounding: a micro-batch of several clients' queries rounds differently)
            uids, sims = expected[version]
            assert [uid for uid, _ in hits] == uids
            np.testing.assert_allclose([s for _, s in hits], sims, atol=1e-5)
        # each client saw v1, then v2, then v1 again: a call never went back to an older
        # version after a newer one answered (except through the rollback)
        runs = [v for i, (v, _) in enumerate(c.answers) if i == 0 or c.answers[i - 1][0] != v]
        assert runs == [v1, v2, v1]
    # the two versions really answer differently, so the checks above can tell them apart
    assert expected_top_k(emb1, table1, queries[0])[0] != expected_top_k(emb2, table2, queries[0])[0]
