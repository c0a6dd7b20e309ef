"""Micro-batching (service.batching): batched answers equal one-at-a-time answers, one
index search serves a group, overload and cancellation behave, and the gRPC path batches."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
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
from service.servicer import ServiceState, search, search_many


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
    many = functools.partial(search_many, max_k=1000)
    queries = _queries(snapshot)
    queries += [SearchQuery(kind="embedding", k=4, embedding=q.embedding * 2) for q in queries[:6]]
    expected = [one(state, snapshot, q) for q in queries]
    calls: list[int] = []
    real_search = snapshot.search

    def counting(q: np.ndarray, k: int, **kw: Any) -> Any:
        calls.append(q.shape[0])
        return real_search(q, k, **kw)

    async def run() -> tuple[list[Any], SearchBatcher]:
        with ThreadPoolExecutor(1) as pool:
            batcher = SearchBatcher(
                state, one, executor=pool, window_s=MAX_WINDOW_S, max_inflight=1, search_many=many
            )
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
    assert batcher.stats.shared >= 4  # k=4 embeddings answered by one search_many call
    for q, a, b in zip(queries, got, expected, strict=True):  # prognosis, diagnostics too
        assert a.prognosis.n_events == b.prognosis.n_events
        assert (a.prognosis.median is None) == (b.prognosis.median is None)
        if b.prognosis.median is not None:
            assert a.prognosis.median == pytest.approx(b.prognosis.median, rel=1e-6)
        # a cohort member's own mean similarity is one of the reference values; the
        # percentile ranks within a tolerance, so float32 noise of the batched search
        # does not move it
        assert a.diagnostics.ood_percentile == b.diagnostics.ood_percentile, q
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


# ------------------------------------------------------------------ lone requests, caches
def test_lone_request_skips_the_prefetch(snapshot: Snapshot) -> None:
    """An idle batcher runs a lone request as its own search on the real snapshot."""
    state = ServiceState(snapshot)
    seen: list[type] = []

    def one(st: Any, snap: Any, q: SearchQuery) -> Any:
        seen.append(type(snap))
        return search(st, snap, q, max_k=1000)

    v = np.random.default_rng(5).standard_normal(snapshot.dimension).astype(np.float32)
    q = SearchQuery(kind="embedding", k=4, embedding=v)

    async def run() -> Any:
        with ThreadPoolExecutor(1) as pool:
            return await SearchBatcher(state, one, executor=pool).search(snapshot, q)

    got = asyncio.run(run())
    assert seen == [type(snapshot)]
    assert _key(got) == _key(search(state, snapshot, q, max_k=1000))


def test_cohort_curve_conversion_is_cached_and_equal(snapshot: Snapshot) -> None:
    from service import convert
    from service.api import cohortsim_pb2 as pb

    v = np.random.default_rng(6).standard_normal((2, snapshot.dimension)).astype(np.float32)
    state = ServiceState(snapshot)
    a, b = (search(state, snapshot, SearchQuery(kind="embedding", k=5, embedding=x), max_k=1000) for x in v)
    assert a.prognosis.cohort_survival is b.prognosis.cohort_survival  # one object per snapshot
    assert len(a.prognosis.cohort_survival) > 10
    first = convert.prognosis_to_proto(a.prognosis, time_unit="months")
    second = convert.prognosis_to_proto(b.prognosis, time_unit="months")
    fresh = pb.Prognosis(cohort_survival=convert._survival_points(b.prognosis.cohort_survival))
    assert list(second.cohort_survival) == list(fresh.cohort_survival)
    assert list(second.survival) == convert._survival_points(b.prognosis.survival)
    assert first.survival != second.survival  # per-query parts are not shared
    second.cohort_survival[0].survival = -1.0  # a response is a copy: the cache stays intact
    assert convert.prognosis_to_proto(b.prognosis, time_unit="months").cohort_survival[0].survival != -1.0


def test_native_threads_are_capped() -> None:
    from threadpoolctl import threadpool_info

    from service.threads import limit_native_threads

    before = {i["prefix"]: i["num_threads"] for i in threadpool_info()}
    try:
        pools = limit_native_threads(1)
        assert pools and set(pools.values()) == {1}
        assert pools == limit_native_threads(None)  # None leaves them as they are
        with pytest.raises(ValueError, match=">= 1"):
            limit_native_threads(0)
    finally:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=before)  # leave the test process as it was


# ------------------------------------------------------------------ DICOM embeddings batched
def test_embed_batcher_batches_waiting_callers_and_keeps_errors_apart() -> None:
    from service.batching import EmbedBatcher

    gate = threading.Event()
    forwards: list[int] = []

    def run(enc: Any, vols: np.ndarray) -> np.ndarray:
        if not forwards:
            gate.wait(5)  # the first forward holds the encoder while the others queue
        forwards.append(len(vols))
        if np.isnan(vols).any():
            raise ValueError("bad volume")
        return vols.reshape(len(vols), -1).sum(axis=1, keepdims=True) * enc

    b = EmbedBatcher()
    enc = 2.0
    rng = np.random.default_rng(0)
    jobs = [rng.standard_normal((1 + i % 3, 2, 2, 2)) for i in range(6)]
    jobs[4][0, 0, 0, 0] = np.nan
    own = rng.standard_normal((2, 2, 2, 2))
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(b.embed, enc, jobs[0], run)
        while not b._busy:
            time.sleep(0.002)
        rest = [pool.submit(b.embed, enc, v, run) for v in jobs[1:]]
        while len(b._queue) < 5:
            time.sleep(0.002)
        alone = pool.submit(b.embed, enc, own, run, shareable=False)  # e.g. regions of interest
        while len(b._queue) < 6:
            time.sleep(0.002)
        gate.set()
        np.testing.assert_allclose(alone.result(), own.reshape(2, -1).sum(1, keepdims=True) * 2.0)
        results = [first, *rest]
        for i, (fut, v) in enumerate(zip(results, jobs, strict=True)):
            if i == 4:
                with pytest.raises(ValueError, match="bad volume"):
                    fut.result()
            else:
                np.testing.assert_allclose(fut.result(), v.reshape(len(v), -1).sum(1, keepdims=True) * 2.0)
    assert b.stats.largest == 5  # the five that waited shared one forward
    assert b.stats.retried == 5  # ... which failed on job 4, so each ran alone
    assert forwards[:2] == [len(jobs[0]), sum(len(v) for v in jobs[1:])]
    assert len(own) in forwards[2:] and b.stats.forwards == 3  # the unshared job ran on its own


def test_concurrent_dicom_queries_share_a_forward_and_answer_as_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import encoders.model as model
    from encoders.model import EncoderCard, create_encoder, save_encoder
    from encoders.synth import synth_cohort
    from indexing.snapshot import build_snapshot

    synth_cohort(tmp_path / "synth", patients=2, seed=2)
    studies = [
        [f.read_bytes() for f in sorted(d.rglob("*.dcm"))]
        for d in sorted((tmp_path / "synth" / "dicom").iterdir())
    ]
    encoder = create_encoder("test_resnet", embedding_dim=16)
    card = save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), tmp_path / "model")
    from .conftest import make_cohort

    rng = np.random.default_rng(4)
    emb = rng.normal(size=(40, 16)).astype(np.float32)
    table = make_cohort(seed=4)[1].slice(0, 40)
    build_snapshot(tmp_path / "index", emb, table, model_version=card.version, encoder_dir=tmp_path / "model")
    snap = load_snapshot(tmp_path / "index", device="cpu")
    state = ServiceState(snap, tta_views=1)
    queries = [SearchQuery(kind="dicom", k=5, dicom_files=files) for files in (*studies, studies[0])]
    alone = [search(state, snap, q, max_k=100) for q in queries]
    assert state.embedder.stats.largest == 1

    real = model.embed
    gate = threading.Event()
    calls: list[int] = []

    def slow_first(enc: Any, vols: np.ndarray, **kw: Any) -> np.ndarray:
        calls.append(len(vols))
        if len(calls) == 1:
            gate.wait(10)  # hold the encoder until the other two studies queue
        return real(enc, vols, **kw)

    monkeypatch.setattr(model, "embed", slow_first)
    state.embedder.stats = type(state.embedder.stats)()
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(search, state, snap, queries[0], max_k=100)]
        while not calls:
            time.sleep(0.002)
        futs += [pool.submit(search, state, snap, q, max_k=100) for q in queries[1:]]
        while len(state.embedder._queue) < 2:
            time.sleep(0.002)
        gate.set()
        together = [f.result() for f in futs]
    assert state.embedder.stats.largest == 2  # the two waiting studies (2 volumes each) in one forward
    assert calls[1] == 4
    for a, b in zip(together, alone, strict=True):
        assert [nb.row for nb in a.neighbors] == [nb.row for nb in b.neighbors]
        np.testing.assert_allclose([nb.similarity for nb in a.neighbors], [nb.similarity for nb in b.neighbors], atol=1e-5)
        assert a.diagnostics.stability is not None and b.diagnostics.stability is not None
        assert a.diagnostics.stability.mean_overlap == b.diagnostics.stability.mean_overlap


def test_blas_threads_setting() -> None:
    from service.config import ConfigError, load_config

    assert load_config().server_kwargs()["blas_threads"] == 1
    assert load_config(env={"COHORTSIM_BLAS_THREADS": "2"}).server_kwargs()["blas_threads"] == 2
    assert load_config(env={"COHORTSIM_BLAS_THREADS": ""}).server_kwargs()["blas_threads"] is None
    with pytest.raises(ConfigError, match="blas_threads"):
        load_config(env={"COHORTSIM_BLAS_THREADS": "0"})
