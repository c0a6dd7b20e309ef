"""Micro-batching of concurrent SearchSimilar calls: many requests, one index search.

Why: an exact search of one query streams the whole cohort through memory; a batch of
``m`` queries costs about one pass (``indexing.exact``: one SGEMM per block). Under load
the service therefore answers the requests that arrived together with one
:meth:`Snapshot.search` call. Plain embedding queries that share ``k`` are answered by
one :func:`indexing.query.search_similar` call (``search_many``: one metadata gather,
as the in-process batched path); the others (study_uid queries with their exclusions,
thumbnails, another ``k``) run their own post-processing on the rows the shared search
found.

Policy (:class:`SearchBatcher`):

* an idle batcher dispatches a request at once (a lone client pays no window), and a
  batch of one runs as a plain search (no prefetch, no extra work);
* while a batch runs, new requests queue; they leave when a worker frees up, or when
  ``window_s`` (default 1 ms, at most :data:`MAX_WINDOW_S`) has passed since the first
  of them arrived and fewer than ``max_inflight`` batches run; at most ``max_batch``
  requests go together;
* requests are grouped by what one index call can serve: the same snapshot object, the
  same filter text and the same search parameters. Each keeps its own ``k``, exclusions
  (a ``study_uid`` query drops its patient's studies) and query acquisition: the group
  is searched once with the largest depth any member needs, and each member's
  ``search_similar`` reads its prefix (the top ``k'`` of a top ``K >= k'`` exact search
  is its first ``k'`` entries, handed over as :class:`indexing.engine.Prefetched`). A member that needs more than was fetched (a patient
  with more studies than expected) falls back to its own search, so answers never
  change - they equal the one-at-a-time answers;
* more than ``max_queue`` waiting requests -> RESOURCE_EXHAUSTED ``OVERLOADED``;
* a request whose caller went away (cancelled, deadline passed) before its batch starts
  is dropped from the batch; a running batch finishes (a search is not interruptible).

DICOM queries are decoded and preprocessed on a worker (``ServiceState.embed_dicom``),
then embedded through :class:`EmbedBatcher`: the volumes of every study (and its TTA
views) that arrived while the encoder was busy go through one encoder forward
(``EmbedStudy`` and DICOM ``SearchSimilar`` alike); their searches are not batched
here. Researcher (governed) answers are not batched either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing.engine import Prefetched
from indexing.query import QueryResult, normalize_queries
from indexing.snapshot import SearchParams, Snapshot
from service.convert import SearchQuery
from service.errors import ServiceError

log = logging.getLogger(__name__)

MAX_WINDOW_S = 0.002  # the bound on the batching window
DEFAULT_WINDOW_S = 0.001
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_QUEUE = 1024


def overloaded(waiting: int) -> ServiceError:
    import grpc

    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        f"the server has {waiting} searches waiting; retry with backoff",
        {"waiting": str(waiting)},
    )


@dataclass
class _Item:
    snapshot: Snapshot
    query: SearchQuery
    future: asyncio.Future[QueryResult]
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, str, int | None, int | None]:
        q = self.query
        return (id(self.snapshot), q.where, q.nprobe, q.ef_search)


@dataclass
class BatchStats:
    """Counters for metrics and tests (read on the event loop)."""

    batches: int = 0
    requests: int = 0
    largest: int = 0
    fallbacks: int = 0  # members that needed a deeper search than the batch fetched
    dropped: int = 0  # cancelled before their batch started
    shared: int = 0  # members answered by one search_many call with their peers
    sizes: list[int] = field(default_factory=list)  # last 1,000 batch sizes


SearchFn = Callable[..., QueryResult]  # (state, snapshot, query, *, prefetched=None)
# (caller's future, result, exception): collected on the worker, applied on the loop
_Settled = tuple["asyncio.Future[QueryResult]", Any, BaseException | None]
SearchManyFn = Callable[[Any, Snapshot, list[SearchQuery]], list[QueryResult]]


class SearchBatcher:
    """Collects concurrent searches on the event loop and runs them batched on ``executor``.

    ``search_one(state, snapshot, query, *, prefetched)`` is the per-request search
    (:func:`service.servicer.search`); ``prefetched`` is None or the rows the group's
    shared search fetched for this query (:class:`indexing.engine.Prefetched`), which
    the engine's search step reads instead of searching again.
    ``search_many(state, snapshot, queries)`` (optional, :func:`service.servicer.search_many`)
    answers plain embedding queries of one group that share ``k`` in one call (one
    neighbour / metadata pass for all, as in-process batched search); the others go
    through ``search_one``.
    ``on_batch(size, wait_s)`` (optional) is called on the loop for each dispatched batch.
    """

    def __init__(
        self,
        state: Any,
        search_one: SearchFn,
        *,
        executor: Executor | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_inflight: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        search_many: SearchManyFn | None = None,
    ) -> None:
        if not 0 <= window_s <= MAX_WINDOW_S:
            raise ValueError(f"batch window must be within [0, 2] ms, got {window_s * 1e3:g} ms")
        if max_batch < 1 or max_queue < 1 or max_inflight < 1:
            raise ValueError("max_batch, max_queue and max_inflight must be >= 1")
        self.state = state
        self.search_one = search_one
        self.search_many = search_many
        self.executor = executor
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.max_inflight = int(max_inflight)
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._pending: list[_Item] = []
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def search(self, snapshot: Snapshot, query: SearchQuery) -> QueryResult:
        """The answer of one query, computed in a batch with its concurrent peers."""
        if len(self._pending) >= self.max_queue:
            raise overloaded(len(self._pending))
        loop = asyncio.get_running_loop()
        item = _Item(snapshot, query, loop.create_future())
        self._pending.append(item)
        self._dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.future.cancel()  # a queued item is skipped when its batch starts
            raise

    # dispatch ---------------------------------------------------------------------
    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending and self._inflight < self.max_inflight:
            waited = time.perf_counter() - self._pending[0].arrived
            if (
                self._inflight > 0
                and len(self._pending) < self.max_batch
                and waited < self.window_s
            ):
                if self._timer is None:
                    self._timer = loop.call_later(self.window_s - waited, self._on_timer)
                return
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            batch = [it for it in batch if not it.future.done()]
            if not batch:
                continue
            self._inflight += 1
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes.append(len(batch))
            del self.stats.sizes[:-1000]
            if self.on_batch is not None:
                self.on_batch(len(batch), waited)
            run = functools.partial(self._run, batch, loop)
            try:  # the worker settles the batch with one call back onto the loop (_finish)
                if self.executor is not None:
                    self.executor.submit(run)
                else:
                    loop.run_in_executor(None, run)
            except RuntimeError as exc:  # the executor was shut down (server stopping)
                self._finish([(it.future, None, exc) for it in batch])

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _finish(self, settled: list[_Settled]) -> None:
        """On the loop, once per batch: answer its callers, then dispatch what queued."""
        for future, result, exc in settled:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
        self._inflight -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._dispatch()

    # the batch (on a worker thread) -------------------------------------------------
    def _run(self, batch: Sequence[_Item], loop: asyncio.AbstractEventLoop) -> None:
        out: list[_Settled] = []
        try:
            groups: dict[Any, list[_Item]] = {}
            for it in batch:
                groups.setdefault(it.key, []).append(it)
            for items in groups.values():
                try:
                    self._run_group(items, out)
                except BaseException as exc:  # never lose a caller: fail the whole group
                    out.extend((it.future, None, exc) for it in items)
        finally:
            # one wake-up of the loop per batch, not one per caller (a closed loop: nobody
            # is waiting any more)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finish, out)

    def _run_group(self, items: list[_Item], out: list[_Settled]) -> None:
        live = [it for it in items if not it.future.cancelled()]
        self.stats.dropped += len(items) - len(live)
        snapshot = live[0].snapshot if live else None
        if snapshot is None:
            return
        if len(live) == 1:  # a lone request: its own search, no prefetch (no extra work)
            self._run_one(live[0], out)
            return
        if self.search_many is not None:
            live = self._run_shared(live, out)
            if not live:
                return
        vectors: list[np.ndarray | None] = []
        depth = 1
        n, k_ood = snapshot.num_studies, snapshot.k_ood
        for it in live:
            v, extra = _query_vector(snapshot, it.query)
            vectors.append(v)
            if v is not None:
                depth = max(depth, min(n, max(it.query.k, k_ood) + extra))
        ok = [i for i, v in enumerate(vectors) if v is not None]
        prefetched: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        q0 = live[0].query
        params = (
            SearchParams(nprobe=q0.nprobe, ef_search=q0.ef_search)
            if q0.nprobe is not None or q0.ef_search is not None
            else None
        )
        if ok:
            try:
                mat = np.stack([v for v in vectors if v is not None]).astype(np.float32, copy=False)
                sims, rows = snapshot.search(mat, depth, where=q0.where, params=params)
                prefetched = {i: (sims[j], rows[j]) for j, i in enumerate(ok)}
            except Exception:  # a bad filter / parameters: each member reports its own error
                prefetched = {}
        for i, it in enumerate(live):
            if it.future.cancelled():
                self.stats.dropped += 1
                continue
            pre = None
            if i in prefetched:
                sims_i, rows_i = prefetched[i]
                pre = Prefetched(sims_i[None, :], rows_i[None, :])
            try:
                result = self.search_one(self.state, snapshot, it.query, prefetched=pre)
            except Exception as exc:
                out.append((it.future, None, exc))
                continue
            if pre is not None and not pre.used:
                self.stats.fallbacks += 1
            out.append((it.future, result, None))

    def _run_shared(self, live: list[_Item], out: list[_Settled]) -> list[_Item]:
        """Answer the plain embedding members that share ``k`` with ``search_many``, two or
        more at a time; return the members left for the per-request path."""
        assert self.search_many is not None
        by_k: dict[int, list[_Item]] = {}
        rest: list[_Item] = []
        for it in live:
            q = it.query
            plain = q.kind == "embedding" and not q.include_thumbnails
            (by_k.setdefault(q.k, []) if plain else rest).append(it)
        for items in by_k.values():
            if len(items) < 2:
                rest.extend(items)
                continue
            try:
                results = self.search_many(
                    self.state, items[0].snapshot, [it.query for it in items]
                )
            except Exception:  # e.g. one bad vector: each member reports its own answer or error
                rest.extend(items)
                continue
            self.stats.shared += len(items)
            out.extend((it.future, result, None) for it, result in zip(items, results, strict=True))
        return rest

    def _run_one(self, item: _Item, out: list[_Settled]) -> None:
        try:
            result = self.search_one(self.state, item.snapshot, item.query)
        except Exception as exc:
            out.append((item.future, None, exc))
        else:
            out.append((item.future, result, None))


EmbedFn = Callable[[Any, np.ndarray], np.ndarray]


@dataclass
class _EmbedJob:
    encoder: Any
    volumes: np.ndarray
    run: EmbedFn
    key: Any  # jobs with the same key may share a forward
    priority: int = 1  # lower first (clinicians 0)
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class EmbedStats:
    """Counters of :class:`EmbedBatcher` (for metrics and tests)."""

    forwards: int = 0
    jobs: int = 0
    volumes: int = 0
    largest: int = 0  # most jobs in one forward
    retried: int = 0  # jobs re-run alone after their batch's forward failed


class EmbedBatcher:
    """Concurrent embeddings -> one encoder forward; called on worker threads.

    ``embed(encoder, volumes, run)`` blocks until ``volumes`` ``(a, D, H, W)`` are
    embedded and returns their ``(a, d)`` rows. A caller that finds the encoder idle runs
    at once (a lone query waits for nothing); callers that arrive while a forward runs
    queue, and the next forward embeds all of them that share an encoder (at most
    ``max_volumes`` volumes, whole jobs): ``run(encoder, stacked)`` once. One forward at a
    time, since the cores are shared with the index search. If a batched forward fails,
    each of its jobs is re-run alone, so one bad study fails only its own call.
    ``shareable=False`` (volumes whose ``run`` carries per-volume arguments, e.g. regions
    of interest) runs in a forward of its own, still one forward at a time.
    ``priority``: queued jobs with a lower number go into the next forward first
    (the server gives clinicians 0), equal numbers in arrival order.
    """

    def __init__(self, max_volumes: int = 64) -> None:
        if max_volumes < 1:
            raise ValueError("max_volumes must be >= 1")
        self.max_volumes = int(max_volumes)
        self.stats = EmbedStats()
        self._cond = threading.Condition()
        self._queue: list[_EmbedJob] = []
        self._busy = False

    def embed(
        self,
        encoder: Any,
        volumes: np.ndarray,
        run: EmbedFn,
        *,
        shareable: bool = True,
        priority: int = 1,
    ) -> np.ndarray:
        job = _EmbedJob(encoder, volumes, run, encoder if shareable else object(), int(priority))
        with self._cond:
            self._queue.append(job)
        while True:
            with self._cond:
                while self._busy and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                batch = self._take()
                self._busy = True
            try:
                self._forward(batch)
            finally:
                with self._cond:
                    for j in batch:
                        j.done = True
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _take(self) -> list[_EmbedJob]:
        """The next forward's jobs (called under the lock): the encoder of the oldest job
        of the lowest priority number, by priority then arrival, whole jobs up to
        ``max_volumes`` volumes (at least one job)."""
        self._queue.sort(key=lambda j: j.priority)  # stable: arrival order within a priority
        key = self._queue[0].key
        batch: list[_EmbedJob] = []
        rest: list[_EmbedJob] = []
        total = 0
        for j in self._queue:
            n = len(j.volumes)
            if j.key is key and (not batch or total + n <= self.max_volumes):
                batch.append(j)
                total += n
            else:
                rest.append(j)
        self._queue = rest
        return batch

    def _forward(self, batch: list[_EmbedJob]) -> None:
        run = batch[0].run
        self.stats.forwards += 1
        self.stats.jobs += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            if len(batch) == 1:
                stacked = batch[0].volumes
            else:
                dtype = np.result_type(*(j.volumes.dtype for j in batch))
                stacked = np.concatenate([j.volumes.astype(dtype, copy=False) for j in batch])
            self.stats.volumes += len(stacked)
            out = run(batch[0].encoder, stacked)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for j in batch:  # one bad study must not fail its neighbours in the batch
                self.stats.retried += 1
                try:
                    j.result = j.run(j.encoder, j.volumes)
                except Exception as exc_j:
                    j.error = exc_j
            return
        start = 0
        for j in batch:
            j.result = out[start : start + len(j.volumes)]
            start += len(j.volumes)


def _query_vector(snapshot: Snapshot, query: SearchQuery) -> tuple[np.ndarray | None, int]:
    """The vector a query searches with and how many rows it will exclude (a guess that
    only sizes the batched search); None when it cannot be known before embedding."""
    # normalised exactly as search_similar will, so the prefetched query matches bit for bit
    if query.kind == "embedding":
        try:
            return normalize_queries(query.embedding, snapshot.dimension)[0], 0
        except Exception:  # its own search reports the error
            return None, 0
    if query.kind == "study_uid":
        try:
            row = snapshot.row_of_study(query.study_uid)
            patient = snapshot.metadata.column("patient_id")[row].as_py()
            extra = 1 + len(snapshot.rows_of_patient(patient))
            return normalize_queries(snapshot.vector(row), snapshot.dimension)[0], extra
        except Exception:  # unknown study: its own search reports NOT_FOUND
            return None, 0
    return None, 0


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_WINDOW_S",
    "MAX_WINDOW_S",
    "BatchStats",
    "EmbedBatcher",
    "EmbedStats",
    "SearchBatcher",
    "overloaded",
]
