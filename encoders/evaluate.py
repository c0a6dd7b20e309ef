"""Retrieval evaluation: are a query's nearest studies near because of disease, not scanner?

Free functions over arrays (in the style of ``faiss.contrib.evaluation``), used by
``cohortsim eval`` and ``benchmarks/eval_retrieval.py``. Every metric compares held-out
*query* studies with a *reference* cohort (the index), by exact cosine search:

* **P@k** (:func:`precision_at_k`): share of a query's ``k`` neighbours that carry the
  query's label (e.g. the lesion phenotype), averaged over queries.
* **scanner excess** (:func:`scanner_excess`): share of a query's neighbours acquired on
  the query's scanner minus that scanner's share of the reference cohort, averaged over
  queries. 0 means scanner-blind retrieval; ``1 - share`` means neighbours only from the
  query's own scanner.
* **kNN C-index** (:func:`knn_c_index`): each query's risk is the Nelson–Aalen cumulative
  hazard at ``horizon`` (24 months by default) estimated from its ``k`` neighbours' (time,
  event); Harrell's concordance (``lifelines.utils.concordance_index``) of that risk with
  the queries' own observed survival. 0.5 is chance.

:func:`run_retrieval_eval` is the whole protocol: split patients into reference and
queries (seeded), train the encoder(s) on the reference volumes only (self-supervised, no
labels), embed everything, and score cohortsim next to baselines computed in the same
run: random vectors, HU-histogram kNN and a randomly initialised backbone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Values = Sequence[Any] | np.ndarray  # one value per study

__all__ = [
    "TARGETS",
    "EvalConfig",
    "EvalRow",
    "RetrievalMetrics",
    "bootstrap_resamples",
    "check_targets",
    "cohort_columns",
    "evaluate_retrieval",
    "hu_histogram_features",
    "knn_c_index",
    "metric_cells",
    "nearest_neighbours",
    "nelson_aalen_at",
    "percentile_interval",
    "precision_at_k",
    "random_vectors",
    "run_retrieval_eval",
    "scanner_excess",
    "split_queries",
]

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """Bad input to the retrieval evaluation (shapes, too few studies, missing labels)."""


# --------------------------------------------------------------------------- metrics


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-``k``: ``queries (m, d)``, ``reference (n, d)`` -> ``(m, k)`` int64
    row indices into ``reference``, best first (ties broken by the lower index)."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise EvalError(
            f"queries and reference must be (m, d) and (n, d) with the same d, got "
            f"{q.shape} and {r.shape}"
        )
    if not 1 <= k <= r.shape[0]:
        raise EvalError(f"k must be in 1..{r.shape[0]} (the reference size), got {k}")
    if not (np.isfinite(q).all() and np.isfinite(r).all()):
        raise EvalError("embeddings contain NaN or infinite values")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    sims = q @ r.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k].astype(np.int64)


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Mean share of neighbours with the query's label: ``(m, k)``, ``(m,)`` -> float."""
    nl = np.asarray(neighbour_labels)
    ql = np.asarray(query_labels)
    if nl.ndim != 2 or ql.shape != (nl.shape[0],):
        raise EvalError(f"expected (m, k) and (m,) labels, got {nl.shape} and {ql.shape}")
    return float((nl == ql[:, None]).mean())


def _scanner_excess_per_query(ns: np.ndarray, qs: np.ndarray, rs: np.ndarray) -> np.ndarray:
    keys, counts = np.unique(rs, return_counts=True)
    share = dict(zip(keys.tolist(), (counts / rs.size).tolist(), strict=True))
    base = np.array([share.get(s, 0.0) for s in qs.tolist()])
    return np.asarray((ns == qs[:, None]).mean(axis=1) - base, dtype=np.float64)


def scanner_excess(
    neighbour_scanners: np.ndarray, query_scanners: np.ndarray, reference_scanners: np.ndarray
) -> float:
    """Mean over queries of (share of neighbours from the query's scanner) minus (that
    scanner's share of the reference cohort). ``(m, k)``, ``(m,)``, ``(n,)`` -> float."""
    ns = np.asarray(neighbour_scanners)
    qs = np.asarray(query_scanners)
    rs = np.asarray(reference_scanners)
    if ns.ndim != 2 or qs.shape != (ns.shape[0],) or rs.ndim != 1 or rs.size == 0:
        raise EvalError(
            f"expected (m, k), (m,) and (n,) scanner keys, got {ns.shape}, {qs.shape}, {rs.shape}"
        )
    return float(_scanner_excess_per_query(ns, qs, rs).mean())


def nelson_aalen_at(times: np.ndarray, events: np.ndarray, horizon: float) -> float:
    """Nelson–Aalen cumulative hazard ``H(horizon) = sum_{t_j <= horizon} d_j / n_j`` of one
    sample ``(k,)``; entries with a NaN time are ignored. 0 when no event by ``horizon``."""
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=bool)
    ok = np.isfinite(t)
    t, e = t[ok], e[ok]
    h = 0.0
    for tj in np.unique(t[e & (t <= horizon)]):
        h += float(((t == tj) & e).sum()) / float((t >= tj).sum())
    return h


def _neighbour_risk(neighbour_times: np.ndarray, neighbour_events: np.ndarray,
                    horizon: float) -> np.ndarray:
    """Each query's Nelson–Aalen cumulative hazard at ``horizon`` over its neighbours."""
    return np.array([nelson_aalen_at(t, e, horizon)
                     for t, e in zip(neighbour_times, neighbour_events, strict=True)])


def _concordance(risk: np.ndarray, query_times: np.ndarray, query_events: np.ndarray) -> float:
    """Harrell's C of ``risk`` (higher = shorter survival) against observed survival; NaN
    when no pair is comparable."""
    from lifelines.utils import concordance_index

    ok = np.isfinite(query_times)
    if ok.sum() < 2 or not query_events[ok].any():
        return float("nan")
    try:  # higher predicted value = longer survival for lifelines, so pass -risk
        return float(concordance_index(query_times[ok], -risk[ok], query_events[ok]))
    except ZeroDivisionError:  # no admissible pairs
        return float("nan")


def knn_c_index(
    neighbour_times: np.ndarray,
    neighbour_events: np.ndarray,
    query_times: np.ndarray,
    query_events: np.ndarray,
    *,
    horizon: float = 24.0,
) -> float:
    """Harrell's C of the neighbours' Nelson–Aalen risk at ``horizon`` against the queries'
    observed survival. ``(m, k)``, ``(m, k)``, ``(m,)``, ``(m,)`` -> float in [0, 1]
    (NaN when no pair of queries is comparable)."""
    nt = np.asarray(neighbour_times, dtype=np.float64)
    ne = np.asarray(neighbour_events, dtype=bool)
    qt = np.asarray(query_times, dtype=np.float64)
    qe = np.asarray(query_events, dtype=bool)
    if nt.ndim != 2 or ne.shape != nt.shape or qt.shape != (nt.shape[0],) or qe.shape != qt.shape:
        raise EvalError(
            f"expected (m, k) neighbour and (m,) query outcomes, got {nt.shape}, {ne.shape}, "
            f"{qt.shape}, {qe.shape}"
        )
    return _concordance(_neighbour_risk(nt, ne, horizon), qt, qe)


def bootstrap_resamples(groups: Values, n_boot: int, *, seed: int = 0) -> list[np.ndarray]:
    """``n_boot`` bootstrap resamples of the queries, as index arrays: whole *groups*
    (patients) are drawn with replacement, as many as there are, and each brings all its
    queries (a cluster bootstrap: two studies of one patient are not two independent
    observations)."""
    g = np.asarray([str(v) for v in groups], dtype=object)
    if g.ndim != 1 or g.size == 0:
        raise EvalError(f"bootstrap needs one group per query, got shape {g.shape}")
    if n_boot < 0:
        raise EvalError(f"the number of bootstrap resamples must be >= 0, got {n_boot}")
    _keys, inverse = np.unique(g, return_inverse=True)
    members = [np.nonzero(inverse == j)[0] for j in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[j] for j in row]) for row in draws]


def percentile_interval(values: Sequence[float] | np.ndarray,
                        level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of the finite ``values`` (NaN, NaN when
    none is finite)."""
    if not 0.0 < level < 1.0:
        raise EvalError(f"the interval level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(v, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return (float(lo), float(hi))


@dataclass
class RetrievalMetrics:
    """The three figures for one embedding, plus the counts they rest on.

    The ``*_ci`` pairs are percentile bootstrap intervals at ``ci_level`` over the query
    *patients* (``n_boot`` resamples; ``None`` when ``n_boot`` is 0). They show how much
    the figure would move with another draw of query patients from the same cohort; they
    do not include the spread between training runs or between cohorts.
    """

    precision_at_k: float
    scanner_excess: float
    c_index: float
    k: int
    n_queries: int
    n_reference: int
    precision_ci: tuple[float, float] | None = None
    scanner_excess_ci: tuple[float, float] | None = None
    c_index_ci: tuple[float, float] | None = None
    ci_level: float = 0.95
    n_boot: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_cells(m: RetrievalMetrics) -> tuple[str, str, str]:
    """P@k, scanner excess and C-index as report cells, each with its interval when there
    is one: ``0.640 [0.583, 0.697]``."""

    def cell(value: float, ci: tuple[float, float] | None, fmt: str) -> str:
        text = format(value, fmt)
        return text if ci is None else f"{text} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"

    return (cell(m.precision_at_k, m.precision_ci, ".3f"),
            cell(m.scanner_excess, m.scanner_excess_ci, "+.3f"),
            cell(m.c_index, m.c_index_ci, ".3f"))


def evaluate_retrieval(
    queries: np.ndarray,
    reference: np.ndarray,
    *,
    query_labels: Values,
    reference_labels: Values,
    query_scanners: Values,
    reference_scanners: Values,
    query_times: Values,
    query_events: Values,
    reference_times: Values,
    reference_events: Values,
    k: int = 10,
    horizon: float = 24.0,
    query_groups: Values | None = None,
    n_boot: int = 0,
    ci_level: float = 0.95,
    seed: int = 0,
) -> RetrievalMetrics:
    """P@k, scanner excess and kNN C-index of ``queries (m, d)`` against ``reference (n, d)``.

    With ``n_boot`` > 0, each figure also gets a ``ci_level`` percentile bootstrap interval
    (:func:`bootstrap_resamples`, seeded by ``seed``) over ``query_groups`` (the queries'
    patient ids; default: every query its own patient). The neighbours are found once; a
    resample only re-averages them.
    """
    nb = nearest_neighbours(queries, reference, k)
    rl = np.asarray([str(v) for v in reference_labels], dtype=object)
    ql = np.asarray([str(v) for v in query_labels], dtype=object)
    rs = np.asarray([str(v) for v in reference_scanners], dtype=object)
    qs = np.asarray([str(v) for v in query_scanners], dtype=object)
    rt = np.asarray(reference_times, dtype=np.float64)
    re_ = np.asarray(reference_events, dtype=bool)
    n, m = np.asarray(reference).shape[0], nb.shape[0]
    qt = np.asarray(query_times, dtype=np.float64)
    qe = np.asarray(query_events, dtype=bool)
    if not 0.0 < ci_level < 1.0:
        raise EvalError(f"the interval level must be in (0, 1), got {ci_level}")
    qg = np.arange(m) if query_groups is None else np.asarray(
        [str(v) for v in query_groups], dtype=object)
    for name, arr, size in (
        ("reference labels", rl, n),
        ("reference scanners", rs, n),
        ("reference times", rt, n),
        ("reference events", re_, n),
        ("query labels", ql, m),
        ("query scanners", qs, m),
        ("query times", qt, m),
        ("query events", qe, m),
        ("query groups", qg, m),
    ):
        if arr.shape != (size,):
            raise EvalError(f"{name}: expected {size} values, got {arr.shape[0]}")
    # per-query values: a figure is their mean (the C-index their concordance), and a
    # bootstrap resample re-averages them over its indices
    hits = (rl[nb] == ql[:, None]).mean(axis=1)
    own = _scanner_excess_per_query(rs[nb], qs, rs)
    risk = _neighbour_risk(rt[nb], re_[nb], horizon)
    metrics = RetrievalMetrics(
        precision_at_k=float(hits.mean()),
        scanner_excess=float(own.mean()),
        c_index=_concordance(risk, qt, qe),
        k=int(k),
        n_queries=int(m),
        n_reference=int(n),
        ci_level=float(ci_level),
        n_boot=int(n_boot),
    )
    resamples = bootstrap_resamples(qg, n_boot, seed=seed)
    if resamples:
        metrics.precision_ci = percentile_interval([hits[i].mean() for i in resamples], ci_level)
        metrics.scanner_excess_ci = percentile_interval([own[i].mean() for i in resamples],
                                                        ci_level)
        metrics.c_index_ci = percentile_interval(
            [_concordance(risk[i], qt[i], qe[i]) for i in resamples], ci_level)
    return metrics


# --------------------------------------------------------------------------- baselines


def random_vectors(n: int, dim: int = 128, *, seed: int = 0) -> np.ndarray:
    """``(n, dim)`` float32 standard-normal vectors (the chance baseline)."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def hu_histogram_features(
    volumes: np.ndarray, *, bins: int = 64, hu_range: tuple[float, float] = (-1100.0, 400.0)
) -> np.ndarray:
    """The naive similarity: a normalised HU histogram of each whole volume.

    ``(n, D, H, W)`` -> ``(n, bins)`` float32: square roots of the bin frequencies (so the
    cosine of two vectors is the Bhattacharyya coefficient of the two histograms).
    """
    v = np.asarray(volumes)
    if v.ndim != 4:
        raise EvalError(f"volumes must be (n, D, H, W), got {v.shape}")
    out = np.empty((v.shape[0], bins), dtype=np.float32)
    for i in range(v.shape[0]):
        h, _ = np.histogram(v[i], bins=bins, range=hu_range)
        out[i] = np.sqrt(h / max(h.sum(), 1))
    return out


# --------------------------------------------------------------------------- cohort


def cohort_columns(
    rows: Sequence[dict[str, Any]],
    *,
    label: str,
    scanner_keys: Sequence[str] = ("manufacturer", "model"),
) -> dict[str, np.ndarray]:
    """Per-study arrays for :func:`run_retrieval_eval` from cohort-table rows (dicts with
    ``patient_id``, ``time``, ``event``, ``labels`` (a map or list of pairs) and the
    acquisition columns, e.g. ``CohortStore.cohort_table().to_pylist()`` in volume order).

    ``label`` names the categorical outcome to score P@k on; the scanner key joins
    ``scanner_keys``. Raises :class:`EvalError` when a study lacks the label.
    """
    pids, labels, scanners, times, events = [], [], [], [], []
    missing = 0
    for r in rows:
        raw = r.get("labels") or {}
        lab = dict(raw) if not isinstance(raw, dict) else raw
        if label not in lab or lab[label] in (None, ""):
            missing += 1
        labels.append(str(lab.get(label, "")))
        pids.append(str(r.get("patient_id", "")))
        scanners.append(" / ".join(str(r.get(k) or "?") for k in scanner_keys))
        t = r.get("time")
        times.append(np.nan if t is None else float(t))
        events.append(bool(r.get("event")) if r.get("event") is not None else False)
    if missing:
        known = sorted({k for r in rows for k in dict(r.get("labels") or {})})
        raise EvalError(
            f"{missing} of {len(rows)} studies have no outcome label {label!r} (labels present: "
            f"{', '.join(known) or 'none'}); load outcomes with that column or pick another"
        )
    return {
        "patient_ids": np.asarray(pids, dtype=object),
        "labels": np.asarray(labels, dtype=object),
        "scanners": np.asarray(scanners, dtype=object),
        "times": np.asarray(times, dtype=np.float64),
        "events": np.asarray(events, dtype=bool),
    }


# The targets for cohortsim's own row.
TARGETS: dict[str, float] = {
    "precision_at_k": 0.70,
    "margin_over_hu_histogram": 0.15,
    "scanner_excess_max": 0.10,
    "c_index": 0.60,
}


def check_targets(rows: Sequence[EvalRow], method: str) -> dict[str, bool]:
    """Which :data:`TARGETS` the row named ``method`` meets (P@k against the plain
    HU-histogram row of the same run)."""
    by = {r.method: r.metrics for r in rows}
    if method not in by or "HU histogram" not in by:
        raise EvalError(f"no row {method!r} (or no HU histogram row) in this evaluation")
    m, hu = by[method], by["HU histogram"]
    return {
        "P@k >= 0.70": m.precision_at_k >= TARGETS["precision_at_k"],
        "P@k >= HU histogram + 0.15": m.precision_at_k
        >= hu.precision_at_k + TARGETS["margin_over_hu_histogram"],
        "scanner excess <= 0.10": m.scanner_excess <= TARGETS["scanner_excess_max"],
        "C-index >= 0.60": bool(m.c_index >= TARGETS["c_index"]),
    }


# --------------------------------------------------------------------------- protocol


def split_queries(patient_ids: Values, query_fraction: float, *, seed: int = 0) -> np.ndarray:
    """Boolean ``(n,)`` mask of query studies: a seeded ``query_fraction`` of the *patients*
    (all studies of a patient fall on the same side)."""
    if not 0.0 < query_fraction < 1.0:
        raise EvalError(f"query_fraction must be in (0, 1), got {query_fraction}")
    pids = np.asarray([str(p) for p in patient_ids], dtype=object)
    unique = np.unique(pids)
    if unique.size < 2:
        raise EvalError(f"need at least 2 patients to hold some out, got {unique.size}")
    n_q = min(unique.size - 1, max(1, round(query_fraction * unique.size)))
    chosen = set(np.random.default_rng(seed).permutation(unique)[:n_q].tolist())
    return np.array([p in chosen for p in pids.tolist()])


@dataclass
class EvalConfig:
    """Options of :func:`run_retrieval_eval`. ``regions`` lists the encoder variants to
    train (``"lesion"``, ``"whole"``); a lesion encoder trains ``epochs`` epochs, a
    whole-volume one ``whole_epochs`` (each epoch costs ~10x more), both stopped early by
    ``time_budget_s`` if set (then the figures depend on the machine's speed and load);
    ``train_kw`` goes to ``train_ssl`` as is. ``bootstrap`` resamples of the query patients
    give each figure a 95 % interval (0: none)."""

    k: int = 10
    horizon: float = 24.0
    query_fraction: float = 0.25
    seed: int = 0
    backbone: str = "resnet10t"
    method: str = "simclr"
    regions: tuple[str, ...] = ("lesion", "whole")
    pooling: str = "attention"
    calibration: str = "tissue"
    harmonize: bool = True
    epochs: int = 100
    whole_epochs: int = 8
    time_budget_s: float | None = None
    device: str = "auto"
    train_kw: dict[str, Any] = field(default_factory=dict)
    bootstrap: int = 1000


@dataclass
class EvalRow:
    """One method's line of the report."""

    method: str
    metrics: RetrievalMetrics
    seconds: float
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            **self.metrics.to_dict(),
            "seconds": self.seconds,
            "notes": self.notes,
        }


def run_retrieval_eval(
    volumes: np.ndarray,
    *,
    patient_ids: Values,
    labels: Values,
    scanners: Values,
    times: Values,
    events: Values,
    spec: Any,
    config: EvalConfig | None = None,
    encoders: Sequence[tuple[str, Any]] = (),
    progress: Callable[[str], None] | None = None,
    patches: np.ndarray | None = None,
) -> list[EvalRow]:
    """The whole protocol on ``volumes (n, D, H, W)`` int16 HU with per-study metadata.
    On the whole-study grid (``spec.has_patches``) lesion encoders train on and embed
    ``patches`` ``(n,) + spec.patch_shape`` (each study's detail patch) instead.

    Returns one :class:`EvalRow` per method, in order: random vectors, HU histogram,
    then per region of ``config.regions`` a randomly initialised backbone and cohortsim
    trained on the reference studies only; then any ready ``encoders`` given as
    ``(name, StudyEncoder)``. Rows of the HU histogram and of every trained encoder are
    followed by a ``+ ComBat`` row (harmonisation fitted on the reference studies).
    """
    import torch

    from encoders.harmonize import ComBat, HarmonizeError
    from encoders.model import create_encoder, embed
    from encoders.train import train_ssl

    cfg = config or EvalConfig()
    say = progress or (lambda _m: None)
    vols = np.asarray(volumes)
    n = vols.shape[0]
    meta = {
        "patient_ids": np.asarray([str(p) for p in patient_ids], dtype=object),
        "labels": np.asarray([str(v) for v in labels], dtype=object),
        "scanners": np.asarray([str(v) for v in scanners], dtype=object),
        "times": np.asarray(times, dtype=np.float64),
        "events": np.asarray(events, dtype=bool),
    }
    for name, arr in meta.items():
        if arr.shape != (n,):
            raise EvalError(f"{name}: expected one value per study ({n}), got {arr.shape}")
    is_q = split_queries(meta["patient_ids"], cfg.query_fraction, seed=cfg.seed)
    qi, ri = np.nonzero(is_q)[0], np.nonzero(~is_q)[0]
    if ri.size <= cfg.k:
        raise EvalError(f"the reference set ({ri.size} studies) must be larger than k={cfg.k}")
    log.info("retrieval eval: %d reference, %d query studies", ri.size, qi.size)

    def score(x: np.ndarray) -> RetrievalMetrics:
        return evaluate_retrieval(
            x[qi],
            x[ri],
            query_labels=meta["labels"][qi],
            reference_labels=meta["labels"][ri],
            query_scanners=meta["scanners"][qi],
            reference_scanners=meta["scanners"][ri],
            query_times=meta["times"][qi],
            query_events=meta["events"][qi],
            reference_times=meta["times"][ri],
            reference_events=meta["events"][ri],
            k=cfg.k,
            horizon=cfg.horizon,
            query_groups=meta["patient_ids"][qi],
            n_boot=cfg.bootstrap,
            seed=cfg.seed,
        )

    rows: list[EvalRow] = []

    def add(name: str, x: np.ndarray, seconds: float, notes: str = "", harm: bool = False) -> None:
        rows.append(EvalRow(name, score(x), round(seconds, 1), notes))
        if harm and cfg.harmonize:
            try:  # fitted on the reference studies only, applied to all
                cb = ComBat().fit(x[ri], meta["scanners"][ri])
                y, _unknown = cb.transform(x, meta["scanners"])
            except HarmonizeError as exc:
                log.warning("ComBat skipped for %s: %s", name, exc)
                return
            rows.append(EvalRow(f"{name} + ComBat", score(y), round(seconds, 1), notes))

    def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
        t0 = time.monotonic()
        x = fn()
        return x, time.monotonic() - t0

    say("baselines: random vectors, HU histogram")
    add("random vectors", *timed(lambda: random_vectors(n, seed=cfg.seed)))
    x, secs = timed(lambda: hu_histogram_features(vols))
    add("HU histogram", x, secs, harm=True)
    def inputs_for(region: str) -> np.ndarray:
        if region != "lesion" or not getattr(spec, "has_patches", False):
            return vols
        if patches is None or len(patches) != n:
            raise EvalError("a lesion encoder on the whole-study grid needs one detail patch "
                            "per study (patches=)")
        return patches

    for region in cfg.regions:
        data = inputs_for(region)
        say(f"random-init {cfg.backbone} ({region})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            rand = create_encoder(
                cfg.backbone,
                spec=spec,
                region=region,
                pooling=cfg.pooling,
                calibration=cfg.calibration,
                embedding_dim=int(cfg.train_kw.get("embedding_dim", 128)),
            )
        x, secs = timed(functools.partial(embed, rand, data, batch_size=16, device=cfg.device))
        add(f"random-init {cfg.backbone} ({region})", x, secs)
        say(f"training cohortsim {cfg.method} ({region}) on {ri.size} reference studies")
        t0 = time.monotonic()
        enc, card = train_ssl(
            data,
            indices=ri,
            backbone=cfg.backbone,
            spec=spec,
            method=cfg.method,
            epochs=cfg.whole_epochs if region == "whole" else cfg.epochs,
            seed=cfg.seed,
            device=cfg.device,
            time_budget_s=cfg.time_budget_s,
            region=region,
            pooling=cfg.pooling,
            calibration=cfg.calibration,
            **cfg.train_kw,
        )
        x = embed(enc, data, batch_size=16, device=cfg.device)
        add(f"cohortsim {cfg.method} ({region})", x, time.monotonic() - t0,
            f"{card.epochs} epochs; {card.notes}", harm=True)
    for name, enc in encoders:
        say(f"embedding with {name}")
        data = inputs_for(enc.region.mode)
        x, secs = timed(functools.partial(embed, enc, data, batch_size=16, device=cfg.device))
        add(name, x, secs, harm=True)
    return rows
