"""Prognosis from the k nearest neighbours' outcomes, with honest uncertainty.

Each neighbour counts with a weight (a softmax of its similarity). Weighted estimates use
the weights as given; their uncertainty uses the Kish effective sample size

    n_eff = (sum w)^2 / sum w^2,

i.e. the number of equally weighted neighbours that would carry the same information.

Kaplan-Meier band (log(-log) / exponential Greenwood). Weights are rescaled to
w~_i = w_i * n_eff / sum w, so they sum to n_eff. At each distinct time t_j,

    Y_j = sum_{i: T_i >= t_j} w~_i        (weighted number at risk)
    D_j = sum_{i: T_i == t_j, event} w~_i (weighted number of events)
    S(t) = prod_{t_j <= t} (1 - D_j / Y_j)
    V(t) = sum_{t_j <= t} D_j / (Y_j (Y_j - D_j))   (Greenwood; terms with Y_j == D_j are 0)
    c(t) = z * sqrt(V(t)) / |log S(t)|
    lower = S^exp(+c),  upper = S^exp(-c)

Where S == 0 (everyone still at risk at t_j had the event) the log(-log) band collapses
to [0, 0], although the true curve lies above 0; there the upper bound is the band's upper
bound just before t_j times the Wilson upper bound for a conditional survival observed as
0 on the weighted number at risk Y_j (the mirror of the bound kept at S == 1):

    lower = 0,   upper = upper(t_{j-1}) * z^2 / (Y_j + z^2).

With n equally weighted neighbours and no censoring this is about z^2 / (n + z^2) (0.28
for n = 10), the Wilson bound of a proportion observed as 0 on n.

Where S == 1 (no event yet, time 0 included) Greenwood's variance is 0 and the log(-log)
band collapses to [1, 1], although the true curve lies below 1 for any t > 0; there the lower bound is the Wilson score bound for a proportion
observed as 1 on the weighted number still under observation after t_j (Rothman 1978):

    lower = A_j / (A_j + z^2),   A_j = sum_{i: T_i > t_j} w~_i (Y_j if that is 0),  upper = 1.

With unit weights n_eff = n and, wherever 0 < S < 1, this is exactly lifelines' default
``KaplanMeierFitter`` curve and band (the tests check both; lifelines gives [1, 1] where
S == 1 and [0, 0] where S == 0). Coverage of the pointwise 95 % band, measured by simulation
(``benchmarks/bench_band_coverage.py``, results in ``benchmarks/RESULTS.md``), is at
least ~0.9 for k >= 10 neighbours, with unit and with similarity weights, and at the
tails (true S near 0 and 1, n_eff 5-50; ``--tails``) 0.91-0.99.
S(t) does not depend on the rescaling. Everything is computed here rather than by
lifelines because, with fractional weights, lifelines (0.30) (a) computes the variance on
weights truncated to integers and (b) gets the number at risk by subtraction
(total - cumsum), which at the last step can leave a tiny negative remainder whose NaN
it forward-fills, so a curve that should drop to 0 stays flat. At-risk sums here are
suffix sums over sorted times, so the last step is exact.

Similarity kernel. Neighbour j with cosine similarity s_j gets the weight

    w_j = exp(s_j / T) / sum_l exp(s_l / T)

(a softmax with temperature T > 0; T -> infinity gives equal weights, small T puts the
weight on the closest neighbours). T is chosen on the cohort at index build by
leave-one-out (:mod:`indexing.evaluation`) and stored in the snapshot manifest; 0.1 is
the default where no evaluation was stored.

Labels: weighted share per class with a Wilson score interval on n_eff. Numeric values:
weighted mean with a normal interval, standard error sqrt(s^2 / n_eff) where s^2 is the
weighted variance times n_eff / (n_eff - 1).

Several readers. A label key ``name@reader`` (for example ``response@reader1``,
``response@reader2``; the text after the last ``@`` names the reader) is one reader's
reading of outcome ``name``. Besides each reader's own distribution, ``name`` then gets a
pooled distribution (each neighbour's weight is split equally over its readers' labels)
and a :class:`ReaderAgreement` over the neighbours read by two or more readers:
observed pairwise agreement P = mean_i sum_c n_ic (n_ic - 1) / (n_i (n_i - 1)) and
Fleiss' kappa (P - P_e) / (1 - P_e) with P_e = sum_c p_c^2, p_c the share of all
readings in category c (unweighted by similarity: agreement is about the readers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from indexing.notices import Notice, WarningCode
from indexing.prognosis_types import HorizonEstimate, LabelShare, SurvivalPoint

MIN_EFFECTIVE_N = 5.0
DEFAULT_HORIZONS: tuple[float, ...] = (12.0, 24.0, 60.0)
DEFAULT_TEMPERATURE = 0.1
READER_SEPARATOR = "@"
LOW_READER_KAPPA = 0.4  # below this (Landis & Koch: "fair" or worse) a warning is given


@dataclass
class ValueSummary:
    """Weighted mean of a numeric outcome; bounds None when fewer than two values."""

    mean: float
    lower: float | None
    upper: float | None
    n: int


@dataclass
class ReaderAgreement:
    """Agreement of several readers on one categorical outcome among the neighbours.

    ``readers``: the reader names seen; ``rated_neighbors``: neighbours read by at least
    two readers (the subjects of the agreement figures); ``percent_agreement``: observed
    pairwise agreement in [0, 1]; ``fleiss_kappa``: chance-corrected agreement (None when
    every reading falls in one category, or no neighbour has two readings).
    """

    readers: list[str]
    rated_neighbors: int
    percent_agreement: float | None
    fleiss_kappa: float | None


@dataclass
class Prognosis:
    """What the neighbours' outcomes say. ``effective_n`` is the Kish n of the survival rows.

    ``cohort_*``: the whole cohort's (unweighted) curve, median and horizons, to compare
    with; filled by :mod:`indexing.query`. ``temperature``: the kernel's temperature.
    """

    survival: list[SurvivalPoint]
    median: float | None
    median_lower: float | None
    median_upper: float | None
    at_horizons: list[HorizonEstimate]
    effective_n: float
    n_with_outcome: int
    n_events: int
    label_distributions: dict[str, list[LabelShare]] = field(default_factory=dict)
    value_summaries: dict[str, ValueSummary] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reader_agreement: dict[str, ReaderAgreement] = field(default_factory=dict)
    cohort_survival: list[SurvivalPoint] = field(default_factory=list)
    cohort_median: float | None = None
    cohort_at_horizons: list[HorizonEstimate] = field(default_factory=list)
    temperature: float | None = None


# --------------------------------------------------------------------- basics
def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1.0 - alpha / 2.0)


def similarity_weights(
    sims: Sequence[float] | np.ndarray, *, temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """``(k,)`` similarities -> ``(k,)`` float64 softmax(sims / temperature), summing to 1.

    ``sims`` may be ``(m, k)``: each row is normalised on its own (same shape out).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = np.asarray(sims, dtype=np.float64)
    if x.ndim != 2:
        x = x.ravel()
    if x.size == 0:
        return x
    if not np.isfinite(x).all():
        raise ValueError("similarities must be finite")
    e = np.exp((x - x.max(axis=-1, keepdims=True)) / temperature)
    return e / e.sum(axis=-1, keepdims=True)


def effective_sample_size(weights: Sequence[float] | np.ndarray) -> float:
    """Kish's n_eff = (sum w)^2 / sum w^2 (0 for no weight)."""
    w = np.asarray(weights, dtype=np.float64)
    sq = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / sq if sq > 0 else 0.0


def wilson_interval(share: float, n: float, *, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a proportion observed on (effective) sample size n."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(alpha)
    z2n = z * z / n
    centre = (share + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(share * (1.0 - share) / n + z * z / (4.0 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


#: Similarities closer than this count as equal when ranking a query against the OOD
#: reference. Float32 dot products differ by ~1e-7 between a batched and a single BLAS
#: call; a cohort member queried alone ties exactly with its own reference entry, so
#: without a tolerance that noise moves the percentile by one rank (1 / reference size).
OOD_TIE_TOLERANCE = 1e-6


def ood_percentile(
    query_mean_sim: float,
    reference_sorted: Sequence[float] | np.ndarray,
    *,
    tolerance: float = OOD_TIE_TOLERANCE,
) -> float:
    """Share of cohort members whose mean neighbour similarity exceeds the query's.

    0 = the query sits as close to its neighbours as anyone; 1 = it is less similar to
    its neighbours than every cohort member is to theirs. 0 for an empty reference.
    ``reference_sorted`` is ascending, shape (n,). A member counts as above only when it
    exceeds the query by more than ``tolerance``, so values within float noise of the
    query tie with it and the answer does not depend on how the query was batched.
    """
    ref = np.asarray(reference_sorted, dtype=np.float64)
    if ref.size == 0 or not math.isfinite(query_mean_sim):
        return 0.0 if ref.size == 0 else 1.0
    above = ref.size - int(np.searchsorted(ref, query_mean_sim + tolerance, side="right"))
    return above / ref.size


# --------------------------------------------------------------------- Kaplan-Meier
def _check_survival_inputs(
    times: Any, events: Any, weights: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64).ravel()
    e = np.asarray(events, dtype=bool).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    if not (t.size == e.size == w.size):
        raise ValueError(f"times, events, weights differ in length ({t.size}, {e.size}, {w.size})")
    if not np.isfinite(t).all() or np.any(t < 0):
        raise ValueError("times must be finite and >= 0")
    if not np.isfinite(w).all() or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    if t.size and w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    return t, e, w


def kaplan_meier(
    times: Sequence[float] | np.ndarray,
    events: Sequence[bool] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    *,
    alpha: float = 0.05,
) -> list[SurvivalPoint]:
    """Weighted KM with a log(-log) Greenwood band on the Kish n_eff (module docstring).

    One point at time 0 and at every distinct observed time; ``at_risk`` is the number of
    neighbours (not weights) with ``T >= time``. Each point's band holds until the next.
    """
    t, e, w = _check_survival_inputs(times, events, weights)
    if t.size == 0:
        return []
    grid = np.unique(np.concatenate([[0.0], t]))
    n_eff = effective_sample_size(w)
    ws = w * (n_eff / w.sum())

    pos = np.searchsorted(grid, t)  # grid index of each neighbour's time
    removed_w = np.bincount(pos, weights=ws, minlength=grid.size)
    deaths_w = np.bincount(pos, weights=np.where(e, ws, 0.0), minlength=grid.size)
    censored_w = np.bincount(pos, weights=np.where(e, 0.0, ws), minlength=grid.size)
    removed_n = np.bincount(pos, minlength=grid.size)
    # numbers at risk as suffix sums over the grid (no subtraction from a total)
    at_risk_w = np.cumsum(removed_w[::-1])[::-1]
    at_risk_n = np.cumsum(removed_n[::-1])[::-1]

    # at risk minus deaths from the suffix sums of the *later* removals, so a step where
    # every remaining neighbour dies gives exactly 0 (no cancellation)
    alive = np.append(at_risk_w[1:], 0.0) + censored_w
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(at_risk_w > 0, alive / at_risk_w, 1.0)
        terms = np.where(alive > 0, deaths_w / (at_risk_w * alive), 0.0)
    s = np.cumprod(np.clip(factor, 0.0, 1.0))
    var = np.cumsum(terms)

    z = _z(alpha)
    lower = np.ones_like(s)
    upper = np.ones_like(s)
    dead = s <= 0.0
    lower[dead] = upper[dead] = 0.0
    mid = ~dead & (s < 1.0)
    # no event yet: Wilson bound for an observed proportion of 1 (module docstring)
    flat = s >= 1.0
    after = np.append(at_risk_w[1:], 0.0)  # weight with T > t_j
    observed = np.where(after > 0, after, at_risk_w)[flat]
    lower[flat] = observed / (observed + z * z)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_s = np.log(s[mid])
        c = z * np.sqrt(var[mid]) / np.abs(log_s)
        lower[mid] = np.exp(-np.exp(np.log(-log_s) + c))
        upper[mid] = np.exp(-np.exp(np.log(-log_s) - c))
    # everyone left had the event: keep an upper bound above 0 (module docstring)
    for j in np.flatnonzero(dead & (np.append(1.0, s[:-1]) > 0.0)):
        before = upper[j - 1] if j > 0 else 1.0
        upper[j] = before * z * z / (at_risk_w[j] + z * z)
        upper[j + 1 :][dead[j + 1 :]] = upper[j]
    return [
        SurvivalPoint(
            float(grid[j]), float(s[j]), float(lower[j]), float(upper[j]), int(at_risk_n[j])
        )
        for j in range(grid.size)
    ]


def _first_at_or_below(
    curve: Sequence[SurvivalPoint], attr: str, level: float = 0.5
) -> float | None:
    for p in curve:
        if getattr(p, attr) <= level:
            return p.time
    return None


def _at_horizon(curve: list[SurvivalPoint], horizon: float) -> HorizonEstimate:
    chosen = None
    for p in curve:
        if p.time <= horizon:
            chosen = p
        else:
            break
    if chosen is None or (horizon > curve[-1].time and curve[-1].survival > 0):
        return HorizonEstimate(float(horizon), None, None, None)
    return HorizonEstimate(float(horizon), chosen.survival, chosen.lower, chosen.upper)


def thin_curve(curve: Sequence[SurvivalPoint], max_points: int = 400) -> list[SurvivalPoint]:
    """At most ``max_points`` points of a long curve (evenly spaced steps, first and last kept)."""
    if len(curve) <= max_points:
        return list(curve)
    idx = np.unique(np.linspace(0, len(curve) - 1, max(2, max_points)).round().astype(int))
    return [curve[int(i)] for i in idx]


def cohort_curve(
    times: Sequence[float | None] | np.ndarray,
    events: Sequence[bool | None] | np.ndarray,
    *,
    horizons: Sequence[float] = DEFAULT_HORIZONS,
    alpha: float = 0.05,
    max_points: int = 400,
) -> tuple[list[SurvivalPoint], float | None, list[HorizonEstimate]]:
    """The whole cohort's unweighted KM: ``(curve (thinned), median, at_horizons)``.

    Rows with a missing time or event are left out; empty results when none is left.
    """
    t = np.asarray(times, dtype=np.float64).ravel()  # None -> NaN
    ev = np.asarray(events, dtype=object).ravel()
    known = np.isfinite(t) & np.array([v is not None for v in ev.tolist()], dtype=bool)
    if not known.any():
        return [], None, [HorizonEstimate(float(h), None, None, None) for h in horizons]
    e = ev[known].astype(bool)
    t = t[known]
    curve = kaplan_meier(t, e, np.ones_like(t), alpha=alpha)
    median = _first_at_or_below(curve, "survival")
    return thin_curve(curve, max_points), median, [_at_horizon(curve, h) for h in horizons]


# --------------------------------------------------------------------- readers
def split_reader_key(key: str) -> tuple[str, str] | None:
    """``"response@reader1"`` -> ``("response", "reader1")``; None for a plain key."""
    base, sep, reader = key.rpartition(READER_SEPARATOR)
    if not sep or not base.strip() or not reader.strip():
        return None
    return base, reader


def fleiss_kappa(
    counts: Sequence[Sequence[float]] | np.ndarray,
) -> tuple[float | None, float | None, int]:
    """Agreement of several readers: ``counts`` ``(subjects, categories)`` readings per category.

    Subjects with fewer than two readings are left out; the number of readings may differ
    between subjects. Returns ``(percent_agreement, kappa, subjects)``: the mean pairwise
    agreement P, Fleiss' kappa (P - P_e) / (1 - P_e) (None when P_e == 1, i.e. every
    reading is in one category) and the number of subjects used; ``(None, None, 0)`` when
    no subject has two readings.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be a (subjects, categories) table, got shape {c.shape}")
    if c.size and (not np.isfinite(c).all() or np.any(c < 0)):
        raise ValueError("counts must be finite and >= 0")
    n_i = c.sum(axis=1) if c.size else np.zeros(c.shape[0])
    keep = n_i >= 2
    c, n_i = c[keep], n_i[keep]
    if c.shape[0] == 0:
        return None, None, 0
    p_i = (c * (c - 1.0)).sum(axis=1) / (n_i * (n_i - 1.0))
    agreement = float(p_i.mean())
    p_c = c.sum(axis=0) / c.sum()
    p_e = float(np.sum(p_c * p_c))
    kappa = None if p_e >= 1.0 - 1e-12 else (agreement - p_e) / (1.0 - p_e)
    return agreement, (None if kappa is None else float(kappa)), int(c.shape[0])


def _reader_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Base outcome name -> its ``name@reader`` keys (only names with a reader suffix)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        split = split_reader_key(key)
        if split is not None:
            groups.setdefault(split[0], []).append(key)
    return groups


def reader_agreement(labels: Sequence[dict[str, Any] | None]) -> dict[str, ReaderAgreement]:
    """Agreement per outcome among the readers' labels of the neighbours (module docstring)."""
    keys = sorted({k for d in labels if d for k, v in d.items() if v is not None})
    out: dict[str, ReaderAgreement] = {}
    for base, reader_keys in sorted(_reader_groups(keys).items()):
        readings = [[str(d[k]) for k in reader_keys if d and d.get(k) is not None] for d in labels]
        cats = sorted({lab for r in readings for lab in r})
        table = np.array([[r.count(cat) for cat in cats] for r in readings], dtype=np.float64)
        agreement, kappa, rated = fleiss_kappa(table.reshape(len(readings), len(cats)))
        readers = [split_reader_key(k)[1] for k in reader_keys]  # type: ignore[index]
        out[base] = ReaderAgreement(readers, rated, agreement, kappa)
    return out


# --------------------------------------------------------------------- summary
def _shares(rows: list[tuple[list[str], float]], alpha: float) -> list[LabelShare]:
    """Weighted shares of ``rows`` = (labels of one neighbour, its weight); a neighbour's
    weight is split equally over its labels (one label: the plain case)."""
    total = sum(wi for labs, wi in rows if labs)
    n_eff = effective_sample_size([wi for labs, wi in rows if labs])
    shares: list[LabelShare] = []
    for label in sorted({lab for labs, _ in rows for lab in labs}):
        mass = sum(wi * labs.count(label) / len(labs) for labs, wi in rows if labs)
        share = float(mass / total) if total > 0 else 0.0
        lo, hi = wilson_interval(share, n_eff, alpha=alpha)
        count = sum(1 for labs, _ in rows if label in labs)
        shares.append(LabelShare(label, share, lo, hi, count))
    shares.sort(key=lambda s: (-s.share, s.label))
    return shares


def _label_distributions(
    labels: Sequence[dict[str, Any] | None], w: np.ndarray, alpha: float
) -> dict[str, list[LabelShare]]:
    keys = sorted({k for d in labels if d for k, v in d.items() if v is not None})
    out: dict[str, list[LabelShare]] = {}
    for key in keys:
        rows = [([str(d[key])], w[i]) for i, d in enumerate(labels) if d and d.get(key) is not None]
        out[key] = _shares(rows, alpha)
    # several readers: a pooled distribution under the outcome's own name (if it is free)
    for base, reader_keys in _reader_groups(keys).items():
        if base in out:
            continue
        pooled = [
            ([str(d[k]) for k in reader_keys if d.get(k) is not None], w[i])
            for i, d in enumerate(labels)
            if d
        ]
        out[base] = _shares(pooled, alpha)
    return dict(sorted(out.items()))


def _value_summaries(
    values: Sequence[dict[str, Any] | None], w: np.ndarray, alpha: float
) -> dict[str, ValueSummary]:
    keys = sorted({k for d in values if d for k in d})
    out: dict[str, ValueSummary] = {}
    z = _z(alpha)
    for key in keys:
        pairs = [
            (float(d[key]), w[i])
            for i, d in enumerate(values)
            if d and d.get(key) is not None and math.isfinite(float(d[key]))
        ]
        if not pairs:
            continue
        x = np.array([p[0] for p in pairs])
        wi = np.array([p[1] for p in pairs])
        if wi.sum() <= 0:
            continue
        mean = float(np.average(x, weights=wi))
        n_eff = effective_sample_size(wi)
        lower = upper = None
        if len(pairs) >= 2 and n_eff > 1.0:
            var = float(np.average((x - mean) ** 2, weights=wi)) * n_eff / (n_eff - 1.0)
            half = z * math.sqrt(var / n_eff)
            lower, upper = mean - half, mean + half
        out[key] = ValueSummary(mean, lower, upper, len(pairs))
    return out


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def summarize(
    times: Sequence[float | None],
    events: Sequence[bool | None],
    weights: Sequence[float] | np.ndarray,
    labels: Sequence[dict[str, Any] | None],
    values: Sequence[dict[str, Any] | None],
    *,
    horizons: Sequence[float] = DEFAULT_HORIZONS,
    alpha: float = 0.05,
) -> Prognosis:
    """Prognosis of k neighbours; all inputs are per neighbour, best first.

    Neighbours with a null ``time`` or ``event`` are left out of the survival part (and
    counted in the warnings); labels and values use every neighbour that has them.
    """
    w = np.asarray(weights, dtype=np.float64).ravel()
    k = w.size
    if not (len(times) == len(events) == len(labels) == len(values) == k):
        raise ValueError("times, events, weights, labels and values must have one entry each")
    if not np.isfinite(w).all() or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    keep = [i for i in range(k) if not _is_missing(times[i]) and not _is_missing(events[i])]
    t = np.array([float(times[i]) for i in keep], dtype=np.float64)  # type: ignore[arg-type]
    e = np.array([bool(events[i]) for i in keep], dtype=bool)
    ws = w[keep] if keep else np.zeros(0)
    notes: list[str] = []
    agreement = reader_agreement(labels)
    for name, ra in agreement.items():
        if ra.fleiss_kappa is not None and ra.fleiss_kappa < LOW_READER_KAPPA:
            notes.append(Notice(
                WarningCode.READERS_DISAGREE,
                f"readers disagree on {name} among these neighbours (Fleiss' kappa "
                f"{ra.fleiss_kappa:.2f} over {ra.rated_neighbors} neighbours); read its "
                "distribution with care",
            ))

    curve: list[SurvivalPoint] = []
    n_eff = 0.0
    if keep and ws.sum() > 0:
        curve = kaplan_meier(t, e, ws, alpha=alpha)
        n_eff = effective_sample_size(ws)
    n_events = int(e.sum())
    if not keep:
        notes.append(Notice(
            WarningCode.NO_SURVIVAL_OUTCOMES,
            f"none of the {k} neighbours has a survival outcome; no survival estimate",
        ))
    elif len(keep) < k:
        notes.append(Notice(
            WarningCode.PARTIAL_SURVIVAL_OUTCOMES,
            f"only {len(keep)} of {k} neighbours have survival outcomes; the curve uses those",
        ))
    if keep and n_eff < MIN_EFFECTIVE_N:
        notes.append(Notice(
            WarningCode.SMALL_EFFECTIVE_SAMPLE,
            f"effective sample size {n_eff:.1f} is small (the weights rest on few neighbours); "
            "intervals are wide and approximate - ask for more neighbours (a larger k)",
        ))
    if keep and n_events == 0:
        notes.append(Notice(
            WarningCode.NO_EVENTS,
            "no events among the neighbours with outcomes; median survival not reached",
        ))

    at_horizons = (
        [_at_horizon(curve, h) for h in horizons]
        if curve
        else [HorizonEstimate(float(h), None, None, None) for h in horizons]
    )
    if curve:
        beyond = [h.time for h in at_horizons if h.survival is None]
        if beyond:
            notes.append(Notice(
                WarningCode.HORIZON_BEYOND_FOLLOW_UP,
                "survival at "
                + ", ".join(f"{b:g}" for b in beyond)
                + f" is beyond the longest follow-up ({curve[-1].time:g}); not estimated",
            ))
    return Prognosis(
        survival=curve,
        median=_first_at_or_below(curve, "survival"),
        median_lower=_first_at_or_below(curve, "lower"),
        median_upper=_first_at_or_below(curve, "upper"),
        at_horizons=at_horizons,
        effective_n=n_eff,
        n_with_outcome=len(keep),
        n_events=n_events,
        label_distributions=_label_distributions(labels, w, alpha),
        value_summaries=_value_summaries(values, w, alpha),
        warnings=notes,
        reader_agreement=agreement,
    )
