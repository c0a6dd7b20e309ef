"""Micro-batching (service.batching): batched answers equal one-at-a-time answers, one
index search serves a group, overload and cancellation behave, and the gRPC path batches."""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from indexing.snapshot import Snapshot, load_snapshot
from service.batching import MAX_WINDOW_S, SearchBatcher
from service.convert import SearchQuery
from service.errors import ServiceError
from service.servicer import ServiceState, search


@pytest.fixture(scope="module")
def snapshot(index_dir: Path) -> Snapshot:
    return load_snapshot(index_dir, device="cpu")


def _queries(snapshot: Snapshot) -> list[SearchQuery]:
    rng = np.random.default_rng(3)
    out: list[SearchQuery] = []
    for i in range(12):
        v = rng.standard_normal(snapshot.dimension).astype(np.float32)
        out.append(SearchQuery(kind="embedding", k=1 + i % 7, embedding=v))
    uids = snapshot.metadata.column("study_uid").to_pylist()
    for i in (0, 1, 5, 77):  # rows 0 and 1: one patient with two studies
        out.append(SearchQuery(kind="study_uid", k=3 + i % 5, study_uid=uids[i]))
    out.append(SearchQuery(kind="embedding", k=4, embedding=out[0].embedding, where="site = 'north'"))
    return out


def _key(result: Any) -> list[tuple[int, float]]:
    return [(nb.row, round(float(nb.similarity), 5)) for nb in result.neighbors]


def test_batched_answers_equal_one_at_a_time(snapshot: Snapshot) -> None:
    state = ServiceState(snapshot)
    one = functools.partial(search, max_k=1000)
    queries = _queries(snapshot)
    expected = [one(state, snapshot, q) for q in queries]
    calls: list[int] = []
    real_search = snapshot.search

    def counting(q: np.ndarray, k: int, **kw: Any) -> Any:
        calls.append(q.shape[0])
        return real_search(q, k, **kw)

    async def run() -> tuple[list[Any], SearchBatcher]:
        with ThreadPoolExecutor(1) as pool:
            batcher = SearchBatcher(state, one, executor=pool, window_s=MAX_WINDOW_S, max_inflight=1)
            return list(await asyncio.gather(*(batcher.search(snapshot, q) for q in queries))), batcher

    snapshot.search = counting  # type: ignore[method-assign]
    try:
        got, batcher = asyncio.run(run())
    finally:
        del snapshot.search  # type: ignore[method-assign]
    for q, a, b in zip(queries, got, expected, strict=True):
        assert _key(a) == _key(b), q
        assert len(a.neighbors) == q.k
        assert a.prognosis.effective_n == pytest.approx(b.prognosis.effective_n, rel=1e-4), (a.prognosis, b.prognosis)
    # the first query goes alone (idle batcher); the rest share index calls
    assert batcher.stats.batches < len(queries) / 2
    assert max(calls) > 1
    assert batcher.stats.fallbacks == 0
    # the study_uid query of row 0 excludes its own patient's second study (row 1)
    rows0 = {nb.row for nb in got[12].neighbors}
    assert not rows0 & {0, 1}


def test_window_is_bounded(snapshot: Snapshot) -> None:
    with pytest.raises(ValueError, match="2"):
        SearchBatcher(ServiceState(snapshot), search, window_s=0.005)


def test_overload_and_cancellation(snapshot: Snapshot) -> None:
    gate = threading.Event()
    seen: list[str] = []

    def slow(state: Any, snap: Any, q: SearchQuery) -> Any:
        gate.wait(5)
        seen.append(q.study_uid or "emb")
        return search(state, snap, q, max_k=1000)

    state = ServiceState(snapshot)
    v = np.ones(snapshot.dimension, np.float32)

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = SearchBatcher(state, slow, executor=pool, window_s=0, max_queue=2, max_inflight=1)
            first = asyncio.ensure_future(b.search(snapshot, SearchQuery(kind="embedding", k=2, embedding=v)))
            await asyncio.sleep(0.01)  # first is running, blocked on the gate
            doomed = asyncio.ensure_future(b.search(snapshot, SearchQuery(kind="study_uid", k=2, study_uid="S-000000000000000000000003")))
            kept = asyncio.ensure_future(b.search(snapshot, SearchQuery(kind="embedding", k=3, embedding=v)))
            await asyncio.sleep(0.01)
            with pytest.raises(ServiceError) as err:
                await b.search(snapshot, SearchQuery(kind="embedding", k=1, embedding=v))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.reason == "OVERLOADED"
            doomed.cancel()
            await asyncio.sleep(0.01)
            gate.set()
            assert len((await first).neighbors) == 2
            assert len((await kept).neighbors) == 3
            assert b.stats.requests == 2  # the cancelled one never ran

    asyncio.run(run())
    assert "S-000000000000000000000003" not in seen


def test_errors_stay_per_request(snapshot: Snapshot) -> None:
    state = ServiceState(snapshot)
    one = functools.partial(search, max_k=1000)
    v = np.ones(snapshot.dimension, np.float32)

    async def run() -> list[Any]:
        with ThreadPoolExecutor(1) as pool:
            b = SearchBatcher(state, one, executor=pool, window_s=MAX_WINDOW_S, max_inflight=1)
            return await asyncio.gather(
                b.search(snapshot, SearchQuery(kind="embedding", k=2, embedding=v)),
                b.search(snapshot, SearchQuery(kind="study_uid", k=2, study_uid="nope")),
                b.search(snapshot, SearchQuery(kind="embedding", k=2, embedding=v, where="nope ==")),
                b.search(snapshot, SearchQuery(kind="embedding", k=5, embedding=v)),
                return_exceptions=True,
            )

    ok, unknown, bad_filter, ok2 = asyncio.run(run())
    assert len(ok.neighbors) == 2 and len(ok2.neighbors) == 5
    assert type(unknown).__name__ == "UnknownStudyError"
    assert type(bad_filter).__name__ == "FilterError"


def test_grpc_concurrent_searches_are_batched(index_dir: Path) -> None:
    from service.background import BackgroundServer
    from service.client import AsyncCohortsimClient

    rng = np.random.default_rng(1)
    vs = rng.standard_normal((24, 32)).astype(np.float32)
    with BackgroundServer(index_dir, device="cpu", batch_window_ms=2.0, max_workers=1) as srv:

        async def run() -> list[Any]:
            async with AsyncCohortsimClient(srv.target) as c:
                return list(await asyncio.gather(*(c.search(embedding=v, k=5) for v in vs)))

        got = asyncio.run(run())
        ref = load_snapshot(index_dir, device="cpu")
        for v, r in zip(vs, got, strict=True):
            rows = ref.search((v / np.linalg.norm(v))[None], 5)[1][0]
            uids = [ref.metadata.column("study_uid")[int(i)].as_py() for i in rows]
            assert [nb.study_uid for nb in r.neighbors] == uids
