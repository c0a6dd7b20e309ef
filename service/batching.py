"""Micro-batching of concurrent SearchSimilar calls: many requests, one index search.

Why: an exact search of one query streams the whole cohort through memory; a batch of
``m`` queries costs about one pass (``indexing.exact``: one SGEMM per block). Under load
the service therefore answers the requests that arrived together with one
:meth:`Snapshot.search` call, then runs each request's own post-processing
(:func:`indexing.query.search_similar`: exclusions, prognosis, OOD, diagnostics) on the
rows that search found.

Policy (:class:`SearchBatcher`):

* an idle batcher dispatches a request at once (a lone client pays no window);
* while a batch runs, new requests queue; they leave when a worker frees up, or when
  ``window_s`` (default 1 ms, at most :data:`MAX_WINDOW_S`) has passed since the first
  of them arrived and fewer than ``max_inflight`` batches run; at most ``max_batch``
  requests go together;
* requests are grouped by what one index call can serve: the same snapshot object, the
  same filter text and the same search parameters. Each keeps its own ``k``, exclusions
  (a ``study_uid`` query drops its patient's studies) and query acquisition: the group
  is searched once with the largest depth any member needs, and each member's
  ``search_similar`` reads its prefix (the top ``k'`` of a top ``K >= k'`` exact search
  is its first ``k'`` entries). A member that needs more than was fetched (a patient
  with more studies than expected) falls back to its own search, so answers never
  change - they equal the one-at-a-time answers;
* more than ``max_queue`` waiting requests -> RESOURCE_EXHAUSTED ``OVERLOADED``;
* a request whose caller went away (cancelled, deadline passed) before its batch starts
  is dropped from the batch; a running batch finishes (a search is not interruptible).

DICOM queries are embedded first (``ServiceState.embed_dicom`` on a worker, with its
TTA views) and are not batched here; researcher (governed) answers are not batched
either. :class:`EmbedBatcher` batches concurrent plain embeddings (``EmbedStudy``) into
one encoder forward.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing.query import _CACHE as query_caches
from indexing.query import QueryResult
from indexing.query import _validate_vectors as normalize_queries
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


class PrefetchedSnapshot:
    """A read-only view of a :class:`Snapshot` whose :meth:`search` for one known query
    returns rows fetched earlier by a batched search (its first ``k`` columns).

    Any other search (another query, a deeper ``k``, other filter or parameters, e.g.
    the TTA views of a DICOM query) goes to the real snapshot. Everything else is
    delegated unchanged.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        query: np.ndarray,
        sims: np.ndarray,
        rows: np.ndarray,
        where: str,
        params: SearchParams | None,
    ) -> None:
        self._snapshot = snapshot
        self._query = query
        self._sims = sims
        self._rows = rows
        self._where = where
        self._params = params or SearchParams()
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._snapshot, name)

    # equal to (and hashed as) the snapshot it wraps, so per-snapshot caches keyed by the
    # snapshot (indexing.query's cohort curve, acquisition profile) are shared, not rebuilt
    def __hash__(self) -> int:
        return hash(self._snapshot)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PrefetchedSnapshot):
            other = other._snapshot
        return other is self._snapshot

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: str = "",
        allowed: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries)
        if (
            allowed is None
            and where == self._where
            and (params or SearchParams()) == self._params
            and q.shape == (1, self._query.shape[0])
            and 1 <= k <= self._rows.shape[0]
            and np.array_equal(q[0], self._query)
        ):
            self.hits += 1
            return self._sims[None, :k].copy(), self._rows[None, :k].copy()
        return self._snapshot.search(queries, k, where=where, allowed=allowed, params=params)


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
    sizes: list[int] = field(default_factory=list)  # last 1,000 batch sizes


SearchFn = Callable[[Any, Snapshot, SearchQuery], QueryResult]


class SearchBatcher:
    """Collects concurrent searches on the event loop and runs them batched on ``executor``.

    ``search_one(state, snapshot, query)`` is the per-request search
    (:func:`service.servicer.search`); it receives a :class:`PrefetchedSnapshot`.
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
    ) -> None:
        if not 0 <= window_s <= MAX_WINDOW_S:
            raise ValueError(f"batch window must be within [0, 2] ms, got {window_s * 1e3:g} ms")
        if max_batch < 1 or max_queue < 1 or max_inflight < 1:
            raise ValueError("max_batch, max_queue and max_inflight must be >= 1")
        self.state = state
        self.search_one = search_one
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
            task = loop.run_in_executor(self.executor, functools.partial(self._run, batch, loop))
            task.add_done_callback(self._done)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _done(self, _fut: Any) -> None:
        self._inflight -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._dispatch()

    # the batch (on a worker thread) -------------------------------------------------
    def _run(self, batch: Sequence[_Item], loop: asyncio.AbstractEventLoop) -> None:
        groups: dict[Any, list[_Item]] = {}
        for it in batch:
            groups.setdefault(it.key, []).append(it)
        for items in groups.values():
            try:
                self._run_group(items, loop)
            except BaseException as exc:  # never lose a caller: fail the whole group
                for it in items:
                    _resolve(loop, it.future, exc=exc)

    def _run_group(self, items: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        live = [it for it in items if not it.future.cancelled()]
        self.stats.dropped += len(items) - len(live)
        snapshot = live[0].snapshot if live else None
        if snapshot is None:
            return
        # the per-snapshot cache entry must belong to the snapshot, not to a short-lived view
        query_caches.setdefault(snapshot, {})
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
            view: Any = snapshot
            if i in prefetched:
                vec = vectors[i]
                assert vec is not None
                sims_i, rows_i = prefetched[i]
                view = PrefetchedSnapshot(snapshot, vec, sims_i, rows_i, q0.where, params)
            try:
                result = self.search_one(self.state, view, it.query)
            except Exception as exc:
                _resolve(loop, it.future, exc=exc)
                continue
            if isinstance(view, PrefetchedSnapshot) and view.hits == 0:
                self.stats.fallbacks += 1
            _resolve(loop, it.future, result=result)


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


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    *,
    result: Any = None,
    exc: BaseException | None = None,
) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    loop.call_soon_threadsafe(settle)


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_WINDOW_S",
    "MAX_WINDOW_S",
    "BatchStats",
    "PrefetchedSnapshot",
    "SearchBatcher",
    "overloaded",
]
