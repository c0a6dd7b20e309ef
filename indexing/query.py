"""Validated similarity search: neighbours with outcomes, prognosis and diagnostics.

``search_similar`` answers queries in process: it validates the vectors, runs one
batched FAISS search for all queries, attaches each neighbour's metadata and outcome,
weights the neighbours, summarises their outcomes (:mod:`indexing.prognosis`) and says
how far the query lies from the cohort. It is the composition of the engine's three
steps (:mod:`indexing.engine`: plan -> search -> assemble); this module holds the result
types, the diagnostics and the per-snapshot caches they use.

Diagnostics (:class:`Diagnostics`):

* ``ood_percentile``: where the query's mean similarity to its ``k_ood`` nearest studies
  falls among the cohort's own leave-one-out values (stored in the snapshot).
* acquisition checks (when the query's acquisition is known, i.e. DICOM queries): for the
  scanner (manufacturer + model), the reconstruction kernel and the slice thickness, the
  share of neighbours that share the query's value beside the cohort's share. A warning
  when the scanner or kernel does not occur in the cohort, when the slice thickness lies
  outside the cohort's range, or when neighbours share the query's scanner / kernel far
  above its base rate (excess > ``SCANNER_EXCESS_WARN`` and a binomial tail probability
  at the base rate below ``SCANNER_P_WARN``): similarity may then reflect the scanner.
* stability (:func:`attach_stability`): the neighbours found for re-embedded,
  scanner-augmented copies of the query (test-time augmentation, done by the server for
  DICOM queries) compared with the query's own: overlap of the neighbour sets and the
  spread of the median survival.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import binom

from indexing.errors import DimensionError, QueryError
from indexing.evaluation import EVALUATION_KEY
from indexing.notices import Notice, WarningCode, skill_notices
from indexing.prognosis import (
    DEFAULT_TEMPERATURE,
    Prognosis,
    cohort_curve,
    ood_percentile,
)
from indexing.snapshot import SearchParams, Snapshot
from indexing.store import ACQUISITION_COLUMNS
from indexing.thumbnails import BOX_COLUMN, SLICE_COLUMN, SOURCE_COLUMN, Region
from indexing.thumbnails import COLUMN as THUMBNAIL_COLUMN

if TYPE_CHECKING:
    from indexing.engine import Prefetched

DEFAULT_MAX_K = 1000
OOD_WARN_PERCENTILE = 0.99
SCANNER_EXCESS_WARN = 0.3
SCANNER_P_WARN = 0.01
STABILITY_WARN_OVERLAP = 0.5
OOD_WARNING = Notice(
    WarningCode.OUT_OF_DISTRIBUTION,
    "the cohort holds no one like this patient; treat neighbours and prognosis with caution",
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
    thumbnail: bytes | None = None  # PNG, set by the caller when asked (see thumbnails())
    region: Region | None = None  # where its embedding was cut, set with the thumbnail
    explanation: Explanation | None = None  # set by the caller when asked


@dataclass
class Explanation:
    """Why one neighbour is similar to the query (:mod:`encoders.explain`): a ``rows`` x
    ``cols`` occlusion map over the query's region (``weights`` row-major, largest 1), its
    overlay on the query's slice (PNG) and the unoccluded similarity."""

    rows: int
    cols: int
    weights: list[float]
    overlay_png: bytes | None
    similarity: float


@dataclass
class AcquisitionCheck:
    """One acquisition attribute of the query against its neighbours and the cohort.

    ``attribute``: "scanner" (manufacturer + model), "kernel" or "slice_thickness";
    ``neighbor_share`` / ``cohort_share``: share of neighbours / of the cohort with the
    query's value; ``seen``: whether the value occurs in the cohort at all.
    """

    attribute: str
    query_value: str
    neighbor_share: float
    cohort_share: float
    seen: bool


@dataclass
class Stability:
    """Neighbours of scanner-augmented copies of the query against the query's own.

    ``views``: augmented copies; ``mean_overlap`` / ``min_overlap``: share of the query's
    neighbours that a copy also finds (1 = the same set); ``median_min`` /
    ``median_max``: range of the median survival over the copies whose curve reaches
    0.5 (``medians_reached`` of them; None when none does).
    """

    views: int
    mean_overlap: float
    min_overlap: float
    median_min: float | None
    median_max: float | None
    medians_reached: int


@dataclass
class RegionResult:
    """The answer for one region of interest of a query (e.g. one observer's contour).

    ``prognosis``: from this region's own neighbours; ``neighbor_overlap``: share of the
    first region's neighbours this region also finds (1.0 for the first region).
    """

    observer: str
    prognosis: Prognosis
    neighbor_overlap: float


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
    acquisition_checks: list[AcquisitionCheck] = field(default_factory=list)
    stability: Stability | None = None
    regions: list[RegionResult] = field(default_factory=list)
    region_spread: Stability | None = None


@dataclass
class QueryResult:
    neighbors: list[NeighborResult]
    prognosis: Prognosis
    diagnostics: Diagnostics
    index_version: str
    model_version: str
    query_thumbnail: bytes | None = None  # PNG, set by the caller when asked
    query_region: Region | None = None  # where the query's embedding was cut, idem


def normalize_queries(vectors: Any, dimension: int) -> np.ndarray:
    """Validated, L2-normalised query vectors ``(m, dimension)`` float32 from ``(m, d)``
    or ``(d,)`` input; :class:`DimensionError` / :class:`QueryError` on bad input.

    The one normalisation every search path uses, so a caller that searches on
    :func:`search_similar`'s behalf (the service's micro-batcher) gets identical bits.
    """
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
    temperature: float | None = None,
    where: str = "",
    search_params: SearchParams | None = None,
    prefetched: Prefetched | None = None,
) -> list[QueryResult]:
    """The k nearest cohort studies of each of ``m`` query vectors ``(m, d)`` (or ``(d,)``).

    ``exclude_rows[i]`` drops one row from query i's neighbours (a study_uid query
    excludes the study itself); ``exclude_patients[i]`` drops every study of a patient
    pseudonym (so a patient's own follow-up scans do not predict their outcome).
    ``k`` must lie in [1, max_k]; it is clamped to the studies available.
    ``query_acquisition[i]`` (manufacturer, model, ...) enables the scanner check.
    ``temperature``: the similarity kernel's; None takes the one chosen at build
    (manifest ``prognosis_evaluation``), else 0.1. Each prognosis carries the whole
    cohort's curve beside the neighbours'.
    ``where``: a filter over the cohort metadata (:mod:`indexing.filter`; FilterError on
    bad syntax or unknown columns) restricting the neighbours; the OOD percentile still
    ranks the query against the whole cohort. ``search_params``: per-query nprobe /
    efSearch of approximate indexes. Withdrawn patients never appear (the snapshot
    drops tombstoned rows). ``prefetched``: rows a batched search already fetched for
    these queries (:class:`indexing.engine.Prefetched`; the service's micro-batcher).
    Raises :class:`DimensionError` / :class:`QueryError` on bad input.
    """
    # the engine's three steps (indexing.engine); imported here because the engine builds
    # on this module's result types
    from indexing import engine

    p = engine.plan(
        snapshot,
        vectors,
        k,
        max_k=max_k,
        exclude_rows=exclude_rows,
        exclude_patients=exclude_patients,
        where=where,
        search_params=search_params,
        per_query=(("query_acquisition", query_acquisition),),
    )
    hits = engine.search(snapshot, p, prefetched=prefetched)
    return engine.assemble(
        snapshot,
        p,
        hits,
        horizons=horizons,
        query_acquisition=query_acquisition,
        temperature=temperature,
    )


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
        notes.append(Notice(
            WarningCode.NO_OOD_REFERENCE,
            "the index has no out-of-distribution reference (cohort too small)",
        ))
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
            notes.append(Notice(
                WarningCode.SCANNER_NOT_IN_COHORT,
                f"the query's scanner ({label}) does not occur in the cohort; similarities "
                "may be lower and neighbours chosen partly by scanner differences",
            ))
        elif same_share - cohort_share > SCANNER_EXCESS_WARN and _far_above(
            same, len(neighbors), cohort_share
        ):
            notes.append(Notice(
                WarningCode.SCANNER_DRIVEN,
                f"{same_share:.0%} of neighbours come from the query's scanner ({label}) "
                f"against {cohort_share:.0%} of the cohort; similarity may reflect the "
                "scanner rather than the anatomy",
            ))
    return Diagnostics(pct, mean_sim, same_share, cohort_share, notes)


def _far_above(same: int, n: int, base_rate: float) -> bool:
    """Binomial tail: P(X >= same | n, base_rate) < SCANNER_P_WARN."""
    return bool(binom.sf(same - 1, n, min(max(base_rate, 0.0), 1.0)) < SCANNER_P_WARN)


# --------------------------------------------------------------------- per-snapshot caches
_CACHE: weakref.WeakKeyDictionary[Snapshot, dict[Any, Any]] = weakref.WeakKeyDictionary()


def snapshot_cache(snapshot: Snapshot) -> dict[Any, Any]:
    """The per-snapshot cache of derived constants (cohort curve, acquisition profile),
    created on first use and dropped with the snapshot.

    Keyed by the snapshot object: a caller that passes :func:`search_similar` a view
    comparing equal to the snapshot (the service's prefetched view) creates the entry with
    the real snapshot first, so it lives as long as the snapshot, not the view.
    """
    return _CACHE.setdefault(snapshot, {})


def _cached(snapshot: Snapshot, key: Any, make: Any) -> Any:
    slot = snapshot_cache(snapshot)
    if key not in slot:
        slot[key] = make()
    return slot[key]


def snapshot_temperature(snapshot: Snapshot) -> float:
    """The kernel temperature chosen at build (manifest), else the default 0.1."""
    evaluation = snapshot.manifest.get(EVALUATION_KEY) or {}
    t = evaluation.get("temperature")
    return float(t) if isinstance(t, int | float) and t > 0 else DEFAULT_TEMPERATURE


def index_warnings(snapshot: Any) -> list[Notice]:
    """The index-level warnings (:func:`indexing.notices.skill_notices` of the manifest's
    evaluation) that head every prognosis of ``snapshot``; computed once per snapshot."""
    manifest = getattr(snapshot, "manifest", None) or {}
    return list(_cached(snapshot, "skill_notices", lambda: skill_notices(manifest.get(EVALUATION_KEY))))


def _cohort_summary(snapshot: Snapshot, horizons: tuple[float, ...]) -> Any:
    # withdrawn patients' rows leave the curve at once (keyed by the tombstoned rows)
    deleted = snapshot.deleted_rows()

    def make() -> Any:
        meta = snapshot.metadata
        if "time" not in meta.column_names or "event" not in meta.column_names:
            return [], None, []
        time = meta.column("time").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
        event = meta.column("event").to_numpy(zero_copy_only=False)  # nulls -> None
        if deleted:
            keep = np.ones(len(time), dtype=bool)
            keep[np.fromiter(deleted, dtype=np.int64)] = False
            time, event = time[keep], event[keep]
        return cohort_curve(time, event, horizons=horizons)

    return _cached(snapshot, ("cohort_curve", horizons, deleted), make)


_NEIGHBOR_COLUMNS = ("patient_id", "study_uid", "site", *ACQUISITION_COLUMNS, "time", "event", "labels", "values")


def _neighbor_table(snapshot: Snapshot) -> Any:
    """The metadata columns a neighbour carries (selected once per snapshot)."""

    def make() -> Any:
        meta = snapshot.metadata
        names = set(meta.column_names)
        return meta.select([c for c in _NEIGHBOR_COLUMNS if c in names])

    return _cached(snapshot, "neighbor_table", make)


def _thickness(v: Any) -> str:
    first = str(v).split("\\")[0]  # DICOM multi-values are backslash-separated
    try:
        return f"{float(first):g}"
    except ValueError:
        return _norm(v)


_ATTRIBUTES: dict[str, tuple[str, Any]] = {
    # attribute -> (words for the warning, key of an acquisition dict)
    "scanner": ("scanner", lambda a: _scanner_key(a)),
    "kernel": ("reconstruction kernel", lambda a: _norm(a.get("kernel")) or None),
    "slice_thickness": (
        "slice thickness",
        lambda a: _thickness(a["slice_thickness"]) if a.get("slice_thickness") else None,
    ),
}


_ATTRIBUTE_COLUMNS = {
    "scanner": ("manufacturer", "model"),
    "kernel": ("kernel",),
    "slice_thickness": ("slice_thickness",),
}


def _acquisition_profile(snapshot: Snapshot) -> dict[str, dict[Any, float]]:
    """Cohort share of each value of each attribute (normalised values; None = unknown)."""

    def make() -> dict[str, dict[Any, float]]:
        meta = snapshot.metadata
        n = max(meta.num_rows, 1)
        out: dict[str, dict[Any, float]] = {}
        for attr, (_, key) in _ATTRIBUTES.items():
            cols = [c for c in _ATTRIBUTE_COLUMNS[attr] if c in meta.column_names]
            counts: dict[Any, float] = {}
            if cols:  # count distinct raw values in Arrow, normalise only those
                grouped = meta.select(cols).group_by(cols).aggregate([([], "count_all")])
                for r in grouped.to_pylist():
                    v = key(r)
                    counts[v] = counts.get(v, 0.0) + r["count_all"] / n
            out[attr] = counts
        return out

    return _cached(snapshot, "acquisition_profile", make)


def _acquisition_checks(
    diagnostics: Diagnostics,
    snapshot: Snapshot,
    neighbors: list[NeighborResult],
    acquisition: dict[str, Any],
) -> None:
    """Add kernel and slice-thickness checks (and the scanner's) to ``diagnostics``."""
    profile = _acquisition_profile(snapshot)
    for attr, (words, key) in _ATTRIBUTES.items():
        value = key(acquisition)
        if value is None or not neighbors:
            continue
        shares = profile.get(attr, {})
        cohort_share = float(shares.get(value, 0.0))
        same = sum(1 for nb in neighbors if key(nb.acquisition) == value)
        shown = (
            " ".join(str(acquisition.get(c)) for c in ("manufacturer", "model") if acquisition.get(c))
            if attr == "scanner"
            else str(acquisition.get(attr))
        )
        diagnostics.acquisition_checks.append(
            AcquisitionCheck(attr, shown, same / len(neighbors), cohort_share, cohort_share > 0)
        )
        if attr == "scanner":
            continue  # warned about in _diagnostics
        known = {v for v in shares if v is not None}
        if attr == "kernel":
            if known and cohort_share == 0:
                diagnostics.warnings.append(Notice(
                    WarningCode.KERNEL_NOT_IN_COHORT,
                    f"the query's {words} ({shown}) does not occur in the cohort; "
                    "neighbours may be chosen partly by protocol differences",
                ))
            elif same / len(neighbors) - cohort_share > SCANNER_EXCESS_WARN and _far_above(
                same, len(neighbors), cohort_share
            ):
                diagnostics.warnings.append(Notice(
                    WarningCode.KERNEL_DRIVEN,
                    f"{same / len(neighbors):.0%} of neighbours share the query's {words} "
                    f"({shown}) against {cohort_share:.0%} of the cohort; similarity may "
                    "reflect the protocol rather than the anatomy",
                ))
        else:  # slice thickness: warn when outside the cohort's range
            numbers = sorted(float(v) for v in known if _is_number(v))
            if numbers and _is_number(value):
                lo, hi = numbers[0], numbers[-1]
                if not lo <= float(value) <= hi:
                    diagnostics.warnings.append(Notice(
                        WarningCode.SLICE_THICKNESS_OUT_OF_RANGE,
                        f"the query's {words} ({float(value):g} mm) lies outside the cohort's "
                        f"range ({lo:g}-{hi:g} mm); neighbours may be chosen partly by protocol",
                    ))


def _is_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------- stability, thumbnails
def _overlap(a: list[NeighborResult], b: list[NeighborResult]) -> float:
    rows = {nb.row for nb in a}
    return len(rows & {nb.row for nb in b}) / len(rows) if rows else 1.0


def stability(base: QueryResult, views: Sequence[QueryResult]) -> Stability | None:
    """Compare a query's result with those of augmented copies of it (same k, same
    exclusions); None without copies. Also used for several regions of one query."""
    if not views:
        return None
    overlaps = [_overlap(base.neighbors, v.neighbors) for v in views]
    medians = [v.prognosis.median for v in views if v.prognosis.median is not None]
    return Stability(
        views=len(views),
        mean_overlap=float(np.mean(overlaps)),
        min_overlap=float(np.min(overlaps)),
        median_min=min(medians) if medians else None,
        median_max=max(medians) if medians else None,
        medians_reached=len(medians),
    )


def attach_stability(result: QueryResult, views: Sequence[QueryResult]) -> QueryResult:
    """Set ``result.diagnostics.stability`` from ``views`` (and warn when it is low)."""
    st = stability(result, views)
    result.diagnostics.stability = st
    if st is not None and st.mean_overlap < STABILITY_WARN_OVERLAP:
        result.diagnostics.warnings.append(Notice(
            WarningCode.UNSTABLE_NEIGHBOURS,
            f"under scanner-like perturbations of the query only {st.mean_overlap:.0%} of its "
            "neighbours stay on average; neighbours and prognosis are unstable",
        ))
    return result


def attach_regions(
    result: QueryResult, observers: Sequence[str], per_region: Sequence[QueryResult]
) -> QueryResult:
    """Record the prognosis of each region of interest of one query on ``result`` (the
    first region's answer) and their spread; warn when the regions disagree.

    ``per_region[i]`` is the answer for the region of ``observers[i]`` (same k, filter and
    exclusions). The spread is :func:`stability` of the first region's answer against the
    others' (how many neighbours they share; ``views`` = the other regions) with the
    median survival's range taken over all regions.
    """
    if len(observers) != len(per_region):
        raise ValueError("one observer per region result")
    d = result.diagnostics
    d.regions = [
        RegionResult(str(o), r.prognosis, _overlap(per_region[0].neighbors, r.neighbors))
        for o, r in zip(observers, per_region, strict=True)
    ]
    spread = stability(per_region[0], per_region[1:]) if len(per_region) > 1 else None
    if spread is None:
        return result
    medians = [r.prognosis.median for r in per_region if r.prognosis.median is not None]
    spread.median_min = min(medians) if medians else None  # over all regions, the first too
    spread.median_max = max(medians) if medians else None
    spread.medians_reached = len(medians)
    d.region_spread = spread
    notes = []
    if spread.mean_overlap < STABILITY_WARN_OVERLAP:
        notes.append(f"they share only {spread.mean_overlap:.0%} of their neighbours on average")
    if spread.medians_reached and spread.medians_reached < len(per_region):
        notes.append(
            f"the median survival is reached for {spread.medians_reached} of "
            f"{len(per_region)} regions"
        )
    elif spread.median_min is not None and spread.median_max is not None:
        lo, hi = spread.median_min, spread.median_max
        if hi - lo > 0.25 * max(hi, 1e-9):
            notes.append(f"their median survival ranges {lo:.1f}-{hi:.1f}")
    if notes:
        d.warnings.append(Notice(
            WarningCode.REGIONS_DISAGREE,
            f"the {len(per_region)} regions of interest (observers) give different answers: "
            + "; ".join(notes)
            + "; the prognosis depends on where the lesion is drawn",
        ))
    return result


def thumbnails(snapshot: Snapshot, rows: Sequence[int]) -> list[bytes | None]:
    """The stored PNG thumbnails of ``rows`` (None where the snapshot has none)."""
    if THUMBNAIL_COLUMN not in snapshot.metadata.column_names or not rows:
        return [None] * len(rows)
    col = snapshot.metadata.column(THUMBNAIL_COLUMN).take(np.asarray(rows, dtype=np.int64))
    return [None if v is None else bytes(v) for v in col.to_pylist()]


def regions(snapshot: Snapshot, rows: Sequence[int]) -> list[Region | None]:
    """The stored embedded regions of ``rows`` (None where the snapshot has none)."""
    meta = snapshot.metadata
    if SLICE_COLUMN not in meta.column_names or not rows:
        return [None] * len(rows)
    take = np.asarray(rows, dtype=np.int64)
    z = meta.column(SLICE_COLUMN).take(take).to_pylist()
    box = meta.column(BOX_COLUMN).take(take).to_pylist()
    src = meta.column(SOURCE_COLUMN).take(take).to_pylist()
    return [
        None if zi is None or b is None else Region(int(zi), tuple(int(v) for v in b), str(si or ""))  # type: ignore[arg-type]
        for zi, b, si in zip(z, box, src, strict=True)
    ]
