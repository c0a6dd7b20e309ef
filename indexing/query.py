"""Validated similarity search: neighbours with outcomes, prognosis and diagnostics.

``search_similar`` is the one function the service calls for a query: it validates the
vectors, runs one batched FAISS search for all queries, attaches each neighbour's
metadata and outcome, weights the neighbours, summarises their outcomes
(:mod:`indexing.prognosis`) and says how far the query lies from the cohort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing.errors import DimensionError, QueryError
from indexing.prognosis import Prognosis, ood_percentile, similarity_weights, summarize
from indexing.snapshot import Snapshot
from indexing.store import ACQUISITION_COLUMNS

DEFAULT_MAX_K = 1000
OOD_WARN_PERCENTILE = 0.99
SCANNER_EXCESS_WARN = 0.3
OOD_WARNING = (
    "the cohort holds no one like this patient; treat neighbours and prognosis with caution"
)


@dataclass
class NeighborResult:
    """One neighbour, best first; ``weight`` is what it counted for in the prognosis."""

    row: int
    patient_id: str
    study_uid: str
    similarity: float
    site: str | None
    acquisition: dict[str, str]
    time: float | None
    event: bool | None
    labels: dict[str, str]
    values: dict[str, float]
    weight: float


@dataclass
class Diagnostics:
    """How much to trust the answer.

    ``mean_similarity``: mean similarity of the query to its first ``k_ood`` neighbours,
    the quantity ranked against the cohort's leave-one-out reference to give
    ``ood_percentile`` (1.0 = less similar to its neighbours than any cohort member).
    The scanner shares are None when the query's scanner is unknown.
    """

    ood_percentile: float
    mean_similarity: float
    same_scanner_share: float | None = None
    cohort_scanner_share: float | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class QueryResult:
    neighbors: list[NeighborResult]
    prognosis: Prognosis
    diagnostics: Diagnostics
    index_version: str
    model_version: str


def _validate_vectors(vectors: Any, dimension: int) -> np.ndarray:
    try:
        q = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DimensionError(f"query vectors are not numeric: {exc}") from exc
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise DimensionError(f"query vectors must be (m, {dimension}); got shape {q.shape}")
    if q.shape[0] == 0:
        raise QueryError("no query vectors given")
    if q.shape[1] != dimension:
        raise DimensionError(
            f"query vectors have dimension {q.shape[1]}; the index expects {dimension}"
        )
    bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
    if bad.size:
        raise DimensionError(f"query {int(bad[0])} holds NaN or infinite values")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise DimensionError(f"query {int(zero[0])} is the zero vector; it has no direction")
    return np.ascontiguousarray(q / norms, dtype=np.float32)


def _scanner_key(acq: dict[str, Any] | None) -> tuple[str, str] | None:
    if not acq:
        return None
    manufacturer, model = acq.get("manufacturer"), acq.get("model")
    if not manufacturer and not model:
        return None
    return _norm(manufacturer), _norm(model)


def _norm(v: Any) -> str:
    return "" if v is None else str(v).strip().casefold()


def _as_dict(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    return dict(v)  # map columns come back as lists of (key, value) pairs


def search_similar(
    snapshot: Snapshot,
    vectors: np.ndarray | Sequence[Sequence[float]],
    k: int,
    *,
    max_k: int = DEFAULT_MAX_K,
    exclude_rows: Sequence[int | None] | None = None,
    exclude_patients: Sequence[str | None] | None = None,
    horizons: Sequence[float] = (12, 24, 60),
    query_acquisition: Sequence[dict[str, Any] | None] | None = None,
    temperature: float = 0.1,
) -> list[QueryResult]:
    """The k nearest cohort studies of each of ``m`` query vectors ``(m, d)`` (or ``(d,)``).

    ``exclude_rows[i]`` drops one row from query i's neighbours (a study_uid query
    excludes the study itself); ``exclude_patients[i]`` drops every study of a patient
    pseudonym (so a patient's own follow-up scans do not predict their outcome).
    ``k`` must lie in [1, max_k]; it is clamped to the studies available.
    ``query_acquisition[i]`` (manufacturer, model, ...) enables the scanner check.
    Raises :class:`DimensionError` / :class:`QueryError` on bad input.
    """
    q = _validate_vectors(vectors, snapshot.dimension)
    m = q.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
        raise QueryError(f"k must be an integer between 1 and {max_k}; got {k!r}")
    for name, seq in (
        ("exclude_rows", exclude_rows),
        ("exclude_patients", exclude_patients),
        ("query_acquisition", query_acquisition),
    ):
        if seq is not None and len(seq) != m:
            raise QueryError(f"{name} has {len(seq)} entries for {m} queries")

    excluded: list[set[int]] = [set() for _ in range(m)]
    for i in range(m):
        if exclude_rows is not None and exclude_rows[i] is not None:
            excluded[i].add(int(exclude_rows[i]))  # type: ignore[arg-type]
        if exclude_patients is not None and exclude_patients[i] is not None:
            excluded[i].update(snapshot.rows_of_patient(exclude_patients[i]))  # type: ignore[arg-type]
    n = snapshot.num_studies
    k_ood = snapshot.k_ood
    k_search = min(n, max(int(k), k_ood) + max(len(s) for s in excluded))
    sims, rows = snapshot.search(q, k_search)

    per_query: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(m):
        ok = rows[i] >= 0
        if excluded[i]:
            ok &= ~np.isin(rows[i], list(excluded[i]))
        per_query.append((sims[i][ok], rows[i][ok]))

    # one metadata gather for every neighbour of every query
    wanted = np.concatenate([r[: int(k)] for _, r in per_query]) if m else np.zeros(0, np.int64)
    cols = [
        c
        for c in (
            "patient_id",
            "study_uid",
            "site",
            *ACQUISITION_COLUMNS,
            "time",
            "event",
            "labels",
            "values",
        )
        if c in snapshot.metadata.column_names
    ]
    gathered = snapshot.metadata.select(cols).take(wanted).to_pydict()

    reference = snapshot.ood_reference
    shares = snapshot.scanner_shares() if query_acquisition is not None else {}
    results: list[QueryResult] = []
    offset = 0
    for i in range(m):
        qs, qr = per_query[i]
        kk = min(int(k), qr.size)
        nsims = qs[:kk].astype(np.float64)
        weights = similarity_weights(nsims, temperature=temperature)
        neighbors: list[NeighborResult] = []
        for j in range(kk):
            g = offset + j

            def col(name: str, g: int = g) -> Any:
                return gathered[name][g] if name in gathered else None

            acquisition = {c: str(col(c)) for c in ACQUISITION_COLUMNS if col(c) not in (None, "")}
            time = col("time")
            neighbors.append(
                NeighborResult(
                    row=int(qr[j]),
                    patient_id=col("patient_id"),
                    study_uid=col("study_uid"),
                    similarity=float(qs[j]),
                    site=col("site"),
                    acquisition=acquisition,
                    time=None if time is None or math.isnan(time) else float(time),
                    event=col("event"),
                    labels=_as_dict(col("labels")),
                    values=_as_dict(col("values")),
                    weight=float(weights[j]),
                )
            )
        offset += kk

        prognosis = summarize(
            [nb.time for nb in neighbors],
            [nb.event for nb in neighbors],
            weights,
            [nb.labels for nb in neighbors],
            [nb.values for nb in neighbors],
            horizons=horizons,
        )
        diagnostics = _diagnostics(
            qs[:k_ood],
            reference,
            neighbors,
            None if query_acquisition is None else query_acquisition[i],
            shares,
        )
        results.append(
            QueryResult(neighbors, prognosis, diagnostics, snapshot.version, snapshot.model_version)
        )
    return results


def _diagnostics(
    ood_sims: np.ndarray,
    reference: np.ndarray,
    neighbors: list[NeighborResult],
    acquisition: dict[str, Any] | None,
    shares: dict[tuple[str | None, str | None], float],
) -> Diagnostics:
    notes: list[str] = []
    mean_sim = float(np.mean(ood_sims, dtype=np.float64)) if ood_sims.size else float("nan")
    if reference.size == 0:
        pct = 0.0
        notes.append("the index has no out-of-distribution reference (cohort too small)")
    else:
        pct = ood_percentile(mean_sim, reference)
    if pct >= OOD_WARN_PERCENTILE:
        notes.append(OOD_WARNING)

    same_share = cohort_share = None
    key = _scanner_key(acquisition)
    if key is not None and shares and neighbors:
        cohort_share = sum(s for (mf, md), s in shares.items() if (_norm(mf), _norm(md)) == key)
        same = sum(1 for nb in neighbors if _scanner_key(nb.acquisition) == key)
        same_share = same / len(neighbors)
        label = " ".join(
            str(acquisition.get(c))
            for c in ("manufacturer", "model")
            if acquisition and acquisition.get(c)
        )
        if cohort_share == 0:
            notes.append(
                f"the query's scanner ({label}) does not occur in the cohort; similarities "
                "may be lower and neighbours chosen partly by scanner differences"
            )
        elif same_share - cohort_share > SCANNER_EXCESS_WARN:
            notes.append(
                f"{same_share:.0%} of neighbours come from the query's scanner ({label}) "
                f"against {cohort_share:.0%} of the cohort; similarity may reflect the "
                "scanner rather than the anatomy"
            )
    return Diagnostics(pct, mean_sim, same_share, cohort_share, notes)
