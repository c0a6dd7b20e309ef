"""The search engine in three steps: *plan -> search -> assemble* (no gRPC here).

Every front end calls these pieces: :func:`indexing.query.search_similar` (in process),
the service's micro-batcher (one index search shared by a group, then each member's own
assembly), a federated site (top-k scores and rows leave the site, nothing is assembled
there) and a coordinator (merges the sites' neighbours and summarises them with
:func:`prognose`).

* :func:`plan` validates a query (dimension, finite, non-zero, ``k`` range, filter
  syntax, per-query lists) and fixes what the search must fetch: a :class:`Plan`.
* :func:`search` runs the index search (or reuses rows a batched search already fetched,
  :class:`Prefetched`) and drops excluded rows: a :class:`Hits` value of top scores with
  their rows, plus the whole-cohort similarities the out-of-distribution check ranks.
* :func:`assemble` turns hits into answers: neighbours with metadata and outcomes,
  similarity weights, the prognosis (:func:`prognose`) and diagnostics.

Partial results are plain values: a site returns ``Hits`` rows gathered with
:func:`gather_neighbors`, and the coordinator's merged neighbours go through the same
:func:`prognose` as a single server's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing.errors import QueryError
from indexing.prognosis import Prognosis, ood_percentile, similarity_weights, summarize
from indexing.query import (
    DEFAULT_MAX_K,
    NeighborResult,
    QueryResult,
    _acquisition_checks,
    _as_dict,
    _cohort_summary,
    _diagnostics,
    _neighbor_table,
    index_warnings,
    normalize_queries,
    snapshot_temperature,
)
from indexing.snapshot import SearchParams, Snapshot
from indexing.store import ACQUISITION_COLUMNS


@dataclass(frozen=True)
class Plan:
    """A validated query of ``m`` vectors and what its search must fetch.

    ``queries``: ``(m, d)`` float32, L2-normalised; ``excluded[i]``: rows dropped from
    query i's neighbours; ``depth``: rows searched per query (``max(k, k_ood)`` plus the
    largest exclusion, at most the cohort); ``ood_depth``: rows of the unfiltered search
    that the OOD check needs when a filter restricts the neighbours (0 without a filter).
    """

    queries: np.ndarray
    k: int
    excluded: tuple[frozenset[int], ...]
    where: str
    params: SearchParams | None
    k_ood: int
    depth: int
    ood_depth: int

    @property
    def m(self) -> int:
        return int(self.queries.shape[0])


@dataclass
class Hits:
    """Top scores with their rows per query (best first, exclusions dropped).

    ``sims[i]`` ``(<= depth,)`` float32 and ``rows[i]`` ``(<= depth,)`` int64;
    ``ood_sims[i]``: the query's similarities to its nearest studies of the whole cohort
    (filter ignored), the first ``k_ood`` of which the OOD check ranks.
    """

    sims: list[np.ndarray]
    rows: list[np.ndarray]
    ood_sims: list[np.ndarray]

    def top(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Query i's first ``k`` (similarities ``(k',)``, rows ``(k',)``), ``k' <= k``."""
        return self.sims[i][:k], self.rows[i][:k]


@dataclass
class Prefetched:
    """Rows a batched search already fetched for a plan's queries: ``sims`` / ``rows``
    ``(m, K)`` from :meth:`Snapshot.search` with the plan's filter and parameters.

    :func:`search` reads their first ``depth`` columns when ``K >= depth`` (the top
    ``k'`` of an exact top ``K`` is its prefix) and sets ``used``; otherwise it searches.
    """

    sims: np.ndarray
    rows: np.ndarray
    used: bool = False


def plan(
    snapshot: Snapshot,
    vectors: Any,
    k: int,
    *,
    max_k: int = DEFAULT_MAX_K,
    exclude_rows: Sequence[int | None] | None = None,
    exclude_patients: Sequence[str | None] | None = None,
    where: str = "",
    search_params: SearchParams | None = None,
    per_query: Sequence[tuple[str, Sequence[Any] | None]] = (),
) -> Plan:
    """Validate a query against ``snapshot`` and size its search.

    ``vectors``: ``(m, d)`` or ``(d,)``; ``exclude_rows`` / ``exclude_patients``: one entry
    per query (None = nothing); ``per_query``: other ``(name, list)`` arguments that must
    also hold one entry per query. Raises :class:`DimensionError` / :class:`QueryError`
    (and :class:`FilterError` for a bad ``where``) before any search runs.
    """
    q = normalize_queries(vectors, snapshot.dimension)
    m = q.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
        raise QueryError(f"k must be an integer between 1 and {max_k}; got {k!r}")
    for name, seq in (
        ("exclude_rows", exclude_rows),
        ("exclude_patients", exclude_patients),
        *per_query,
    ):
        if seq is not None and len(seq) != m:
            raise QueryError(f"{name} has {len(seq)} entries for {m} queries")
    where = where or ""
    if where.strip():
        snapshot.filter_mask(where)  # a bad filter fails here, before any search
    excluded: list[set[int]] = [set() for _ in range(m)]
    for i in range(m):
        if exclude_rows is not None and exclude_rows[i] is not None:
            excluded[i].add(int(exclude_rows[i]))  # type: ignore[arg-type]
        if exclude_patients is not None and exclude_patients[i] is not None:
            excluded[i].update(snapshot.rows_of_patient(exclude_patients[i]))  # type: ignore[arg-type]
    n = snapshot.num_studies
    k_ood = snapshot.k_ood
    most = max(len(s) for s in excluded)
    depth = min(n, max(int(k), k_ood) + most)
    ood_depth = min(n, k_ood + most) if where.strip() else 0
    return Plan(
        q, int(k), tuple(frozenset(s) for s in excluded), where, search_params, k_ood, depth, ood_depth
    )


def _drop(sims: np.ndarray, rows: np.ndarray, excluded: frozenset[int]) -> tuple[np.ndarray, np.ndarray]:
    ok = rows >= 0
    if excluded:
        ok &= ~np.isin(rows, list(excluded))
    return sims[ok], rows[ok]


def search(snapshot: Snapshot, p: Plan, *, prefetched: Prefetched | None = None) -> Hits:
    """Run ``p``'s index search (one call for all its queries, or ``prefetched`` rows)
    and, with a filter, the unfiltered search the OOD check needs."""
    if p.depth < 1:
        empty = [np.zeros(0, np.float32) for _ in range(p.m)]
        return Hits(empty, [np.zeros(0, np.int64) for _ in range(p.m)], list(empty))
    if prefetched is not None and prefetched.rows.shape == (p.m, prefetched.rows.shape[1]) and (
        prefetched.rows.shape[1] >= p.depth
    ):
        sims, rows = prefetched.sims[:, : p.depth], prefetched.rows[:, : p.depth]
        prefetched.used = True
    else:
        sims, rows = snapshot.search(p.queries, p.depth, where=p.where, params=p.params)
    kept = [_drop(sims[i], rows[i], p.excluded[i]) for i in range(p.m)]
    ood = [s for s, _ in kept]
    if p.ood_depth:  # OOD is about the whole cohort: search it again without the filter
        all_sims, all_rows = snapshot.search(p.queries, p.ood_depth, params=p.params)
        ood = [_drop(all_sims[i], all_rows[i], p.excluded[i])[0] for i in range(p.m)]
    return Hits([s for s, _ in kept], [r for _, r in kept], ood)


@dataclass
class SitePart:
    """What a federated site returns for one query: its top-k neighbours (best first,
    ``weight`` 0), its out-of-distribution percentile of the query and its kernel
    temperature; the coordinator merges parts and weights the merged neighbours."""

    neighbors: list[NeighborResult]
    ood_percentile: float
    temperature: float


def ood_of(snapshot: Snapshot, p: Plan, hits: Hits, i: int) -> float:
    """Query i's out-of-distribution percentile against ``snapshot``'s cohort (0 when the
    index has no reference)."""
    reference = snapshot.ood_reference
    sims = hits.ood_sims[i][: p.k_ood]
    if reference.size == 0 or sims.size == 0:
        return 0.0
    return float(ood_percentile(float(np.mean(sims, dtype=np.float64)), reference))


def gather_neighbors(
    snapshot: Snapshot, sims: Sequence[np.ndarray], rows: Sequence[np.ndarray]
) -> list[list[NeighborResult]]:
    """Neighbours (metadata, outcome; ``weight`` 0 until :func:`prognose`) of each
    query's ``rows[i]`` ``(k_i,)`` with similarities ``sims[i]``; one metadata gather."""
    sizes = [int(r.size) for r in rows]
    wanted = np.concatenate(list(rows)).astype(np.int64) if rows else np.zeros(0, np.int64)
    gathered = _neighbor_table(snapshot).take(wanted).to_pydict()
    none = [None] * len(wanted)
    acq_cols = [(c, gathered[c]) for c in ACQUISITION_COLUMNS if c in gathered]
    patient_ids, study_uids, sites, times, events, labels_col, values_col = (
        gathered.get(c, none)
        for c in ("patient_id", "study_uid", "site", "time", "event", "labels", "values")
    )
    out: list[list[NeighborResult]] = []
    offset = 0
    for qs, qr, kk in zip(sims, rows, sizes, strict=True):
        neighbors: list[NeighborResult] = []
        for j in range(kk):
            g = offset + j
            time = times[g]
            neighbors.append(
                NeighborResult(
                    row=int(qr[j]),
                    patient_id=patient_ids[g],
                    study_uid=study_uids[g],
                    similarity=float(qs[j]),
                    site=sites[g],
                    acquisition={c: str(v[g]) for c, v in acq_cols if v[g] not in (None, "")},
                    time=None if time is None or math.isnan(time) else float(time),
                    event=events[g],
                    labels=_as_dict(labels_col[g]),
                    values=_as_dict(values_col[g]),
                    weight=0.0,
                )
            )
        offset += kk
        out.append(neighbors)
    return out


def prognose(
    neighbors: Sequence[NeighborResult],
    *,
    temperature: float,
    horizons: Sequence[float] = (12, 24, 60),
) -> Prognosis:
    """Weight ``neighbors`` (best first) by similarity (sets each ``weight``) and summarise
    their outcomes: the prognosis of a single index and of merged federated neighbours."""
    weights = similarity_weights(
        np.asarray([nb.similarity for nb in neighbors], dtype=np.float64), temperature=temperature
    )
    for nb, w in zip(neighbors, weights, strict=True):
        nb.weight = float(w)
    prognosis = summarize(
        [nb.time for nb in neighbors],
        [nb.event for nb in neighbors],
        weights,
        [nb.labels for nb in neighbors],
        [nb.values for nb in neighbors],
        horizons=horizons,
    )
    prognosis.temperature = float(temperature)
    return prognosis


def assemble(
    snapshot: Snapshot,
    p: Plan,
    hits: Hits,
    *,
    horizons: Sequence[float] = (12, 24, 60),
    query_acquisition: Sequence[dict[str, Any] | None] | None = None,
    temperature: float | None = None,
) -> list[QueryResult]:
    """One answer per query of ``p`` from its ``hits``: the first ``k`` neighbours, their
    prognosis (with the cohort's curve and the index's warnings) and diagnostics."""
    if query_acquisition is not None and len(query_acquisition) != p.m:
        raise QueryError(f"query_acquisition has {len(query_acquisition)} entries for {p.m} queries")
    tops = [hits.top(i, p.k) for i in range(p.m)]
    all_neighbors = gather_neighbors(snapshot, [s for s, _ in tops], [r for _, r in tops])
    reference = snapshot.ood_reference
    shares = snapshot.scanner_shares() if query_acquisition is not None else {}
    if temperature is None:
        temperature = snapshot_temperature(snapshot)
    cohort = _cohort_summary(snapshot, tuple(float(h) for h in horizons))
    results: list[QueryResult] = []
    for i, neighbors in enumerate(all_neighbors):
        prognosis = prognose(neighbors, temperature=temperature, horizons=horizons)
        prognosis.cohort_survival, prognosis.cohort_median, prognosis.cohort_at_horizons = cohort
        prognosis.warnings[:0] = index_warnings(snapshot)  # the index's skill comes first
        query_acq = None if query_acquisition is None else query_acquisition[i]
        diagnostics = _diagnostics(hits.ood_sims[i][: p.k_ood], reference, neighbors, query_acq, shares)
        if query_acq:
            _acquisition_checks(diagnostics, snapshot, neighbors, query_acq)
        results.append(
            QueryResult(neighbors, prognosis, diagnostics, snapshot.version, snapshot.model_version)
        )
    return results


__all__ = [
    "Hits",
    "Plan",
    "Prefetched",
    "SitePart",
    "assemble",
    "gather_neighbors",
    "ood_of",
    "plan",
    "prognose",
    "search",
]
