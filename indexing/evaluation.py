"""How good have neighbour-based prognoses been on this cohort? Leave-one-out at index build.

Each evaluated cohort member (all of them, or a seeded sample of ``sample`` members) is
treated as a new query: its ``k`` nearest *other patients'* studies (exact cosine search;
studies of the same patient are excluded, as a ``study_uid`` query excludes them) give a
similarity-weighted Kaplan–Meier curve exactly as :func:`indexing.prognosis.kaplan_meier`
computes it (neighbours without a survival outcome are left out). From these held-out
predictions:

* **temperature**: the kernel's temperature T (:func:`indexing.prognosis.similarity_weights`)
  is the value of ``temperatures`` with the lowest integrated Brier score (Graf et al.
  1999; inverse-probability-of-censoring weights from the cohort's censoring KM), averaged
  over the horizons that the cohort's follow-up supports; ties go to the larger T (the
  smoother weights). With fewer than ``MIN_EVALUATED`` members with outcomes the default
  T is kept and ``temperature_source`` says so.
* **C-index** (Harrell, via ``lifelines.utils.concordance_index``) of the predicted
  restricted mean survival time up to ``tau`` (the largest horizon, or the 90th percentile
  of follow-up if shorter) against the members' observed outcomes, with a 95 % percentile
  bootstrap interval (``c_index_interval``): ``n_boot`` resamples of the evaluated
  *patients* (all of a patient's studies together, as ``cohort eval`` does,
  :func:`encoders.evaluate.bootstrap_resamples`), the held-out predictions kept fixed.
  An interval that includes 0.5 means the index has shown no prognostic skill
  (:func:`indexing.notices.skill_notices` turns that into a warning on every answer).
* **calibration** at each horizon: members are sorted by their predicted survival at the
  horizon and cut into (up to) ten groups of equal size (deciles); per group, the mean
  predicted survival beside the group's observed (unweighted) Kaplan–Meier survival with
  its 95 % interval. ``mean_absolute_error`` is the size-weighted mean |predicted -
  observed| over the groups whose follow-up reaches the horizon, with a bootstrap interval
  over patients (``mean_absolute_error_interval``, the first ``CALIBRATION_BOOTSTRAP`` of
  the same resamples: each re-groups and re-fits ten KM curves). Predictions whose
  neighbours' follow-up ends before the horizon are not estimable (as in a query) and
  are left out there.

The result is a JSON-able dict stored under ``prognosis_evaluation`` in the snapshot
manifest; counts carry explicit names (``evaluated_studies``, ``study_count``...) so that
small cells can be suppressed downstream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from lifelines.utils import concordance_index

from encoders.evaluate import bootstrap_resamples, percentile_interval
from indexing.prognosis import (
    DEFAULT_HORIZONS,
    DEFAULT_TEMPERATURE,
    _at_horizon,
    kaplan_meier,
    similarity_weights,
)
from indexing.snapshot import normalize_rows

log = logging.getLogger(__name__)

EVALUATION_KEY = "prognosis_evaluation"
DEFAULT_K = 10
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_SAMPLE = 2000
MIN_EVALUATED = 20
CALIBRATION_GROUPS = 10
MIN_EVENTS_PER_HORIZON = 5
DEFAULT_BOOTSTRAP = 200
CALIBRATION_BOOTSTRAP = 50  # resamples (the first of the C-index's) for the calibration interval
MAX_PAIR_MATRIX = 4000  # evaluated studies up to which the C-index bootstrap uses pair matrices


# --------------------------------------------------------------------- neighbours
def loo_neighbours(
    vectors: np.ndarray,
    patient_ids: Sequence[Any],
    k: int,
    *,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours of ``rows`` among the other patients' studies.

    Cost: brute force, O(len(rows) * n * d) (``evaluate_prognosis`` samples the rows).

    ``vectors`` ``(n, d)`` (normalised here). Returns ``(sims (m, k) float64, nbrs (m, k)
    int64)``, best first; where fewer than k other-patient studies exist the row is padded
    with ``-1`` / NaN.
    """
    x = normalize_rows(vectors)
    n = x.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    pid = np.asarray([str(p) for p in patient_ids], dtype=object)
    _, inverse, counts = np.unique(pid, return_inverse=True, return_counts=True)
    k_search = int(min(n, k + int(counts.max())))
    # brute force without building an index (no second copy of the cohort)
    sims, nbrs = faiss.knn(
        np.ascontiguousarray(x[rows]), x, k_search, metric=faiss.METRIC_INNER_PRODUCT
    )
    out_s = np.full((rows.size, k), np.nan)
    out_n = np.full((rows.size, k), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        ok = (nbrs[i] >= 0) & (inverse[np.maximum(nbrs[i], 0)] != inverse[row])
        s, r = sims[i][ok][:k], nbrs[i][ok][:k]
        out_s[i, : s.size] = s
        out_n[i, : r.size] = r
    return out_s, out_n


# --------------------------------------------------------------------- weighted KM, batched
def batched_km(
    times: np.ndarray, events: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One weighted KM per row: ``(m, k)`` times/events/weights (weight 0 = left out).

    Returns ``(t_sorted (m, k), s_after (m, k), s_last_time (m,))``: each row's times in
    order (events before censorings at ties; left-out entries last as +inf) and the
    survival just after each; the last finite time per row (NaN when none). Equal to
    :func:`indexing.prognosis.kaplan_meier` at every observed time.
    """
    t = np.where(weights > 0, times, np.inf).astype(np.float64)
    e = np.asarray(events, dtype=bool) & (weights > 0)
    w = np.where(weights > 0, weights, 0.0).astype(np.float64)
    order = np.lexsort((~e, t), axis=1)
    t = np.take_along_axis(t, order, axis=1)
    e = np.take_along_axis(e, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    at_risk = np.cumsum(w[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(e & (at_risk > 0), 1.0 - w / at_risk, 1.0)
    s = np.cumprod(np.clip(factor, 0.0, 1.0), axis=1)
    finite = np.isfinite(t)
    last = np.where(finite.any(axis=1), np.where(finite, t, -np.inf).max(axis=1), np.nan)
    return t, s, last


def survival_at(
    t_sorted: np.ndarray,
    s_after: np.ndarray,
    last: np.ndarray,
    horizon: float,
    *,
    carry_forward: bool = False,
) -> np.ndarray:
    """``(m,)`` survival at ``horizon`` from :func:`batched_km`; NaN for rows without
    outcomes and, unless ``carry_forward``, where the follow-up ends before the horizon
    with survival still > 0 (not estimable, as in a query)."""
    c = (t_sorted <= horizon).sum(axis=1)
    idx = np.maximum(c - 1, 0)
    s = np.where(c > 0, np.take_along_axis(s_after, idx[:, None], axis=1)[:, 0], 1.0)
    beyond = np.isnan(last) if carry_forward else ~(horizon <= last) & (s > 0)
    return np.where(beyond, np.nan, s)


def restricted_mean(
    t_sorted: np.ndarray, s_after: np.ndarray, last: np.ndarray, tau: float
) -> np.ndarray:
    """``(m,)`` area under each curve on [0, tau] (the last value carried beyond the
    follow-up); NaN for rows without outcomes."""
    tt = np.minimum(np.where(np.isfinite(t_sorted), t_sorted, tau), tau)
    prev_t = np.concatenate([np.zeros((tt.shape[0], 1)), tt], axis=1)
    prev_s = np.concatenate([np.ones((s_after.shape[0], 1)), s_after], axis=1)
    area = np.sum(prev_s[:, :-1] * (prev_t[:, 1:] - prev_t[:, :-1]), axis=1)
    area += prev_s[:, -1] * (tau - prev_t[:, -1])
    return np.where(np.isnan(last), np.nan, area)


# --------------------------------------------------------------------- scores
def _step_value(curve_t: np.ndarray, curve_s: np.ndarray, x: np.ndarray, *, left: bool) -> np.ndarray:
    """Value of a right-continuous step function at ``x`` (its left limit when ``left``)."""
    pos = np.searchsorted(curve_t, x, side="left" if left else "right") - 1
    return np.where(pos >= 0, curve_s[np.maximum(pos, 0)], 1.0)


def ipcw_brier(
    pred: np.ndarray, times: np.ndarray, events: np.ndarray, horizon: float
) -> float:
    """Brier score at ``horizon`` with inverse-probability-of-censoring weights (Graf 1999).

    ``pred`` ``(m,)`` predicted survival at the horizon (NaN rows are left out).
    """
    ok = np.isfinite(pred)
    p, t, e = pred[ok], times[ok], events[ok]
    if p.size == 0:
        return float("nan")
    cens = kaplan_meier(t, ~e, np.ones_like(t))
    ct = np.array([c.time for c in cens])
    cs = np.array([c.survival for c in cens])
    g_t = _step_value(ct, cs, t, left=True)
    g_h = float(_step_value(ct, cs, np.array([horizon]), left=False)[0])
    died = (t <= horizon) & e
    alive = t > horizon
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(died, p**2 / g_t, 0.0) + np.where(alive, (1 - p) ** 2 / g_h, 0.0)
    score = np.where(np.isfinite(score), score, 0.0)
    return float(score.mean())


def c_index(times: np.ndarray, events: np.ndarray, predicted_survival: np.ndarray) -> float | None:
    """Harrell's C of a predicted survival summary (higher = longer) against outcomes."""
    ok = np.isfinite(predicted_survival)
    if ok.sum() < 2 or not events[ok].any():
        return None
    try:
        return float(concordance_index(times[ok], predicted_survival[ok], events[ok]))
    except ZeroDivisionError:  # no admissible pairs
        return None


def harrell_pairs(
    times: np.ndarray, events: np.ndarray, predicted_survival: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Harrell's pairs as ``(m, m)`` matrices: ``b[i, j] = 1`` where the pair is comparable
    (i had the event and j outlived it: t_i < t_j, or t_i == t_j with j censored) and
    ``a[i, j]`` its concordance (1 when i's predicted survival is lower, 1/2 on a tie).
    For a bootstrap resample with multiplicities ``m``, C = m a m / m b m, the C-index of
    the resampled studies (a study is never comparable with itself or its copies); rows
    with a non-finite prediction take part in no pair."""
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=bool)
    p = np.asarray(predicted_survival, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(t)
    comparable = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
    comparable &= ok[:, None] & ok[None, :]
    b = comparable.astype(np.float32)
    with np.errstate(invalid="ignore"):
        score = np.where(p[:, None] < p[None, :], 1.0, np.where(p[:, None] == p[None, :], 0.5, 0.0))
    return (b * score).astype(np.float32), b


def calibration(
    pred: np.ndarray,
    times: np.ndarray,
    events: np.ndarray,
    horizon: float,
    *,
    groups: int = CALIBRATION_GROUPS,
) -> dict[str, Any]:
    """Predicted vs observed survival at ``horizon`` by groups of predicted survival."""
    ok = np.flatnonzero(np.isfinite(pred))
    out: dict[str, Any] = {"time": float(horizon), "groups": [], "mean_absolute_error": None}
    if ok.size == 0:
        return out
    order = ok[np.argsort(pred[ok], kind="stable")]
    errors, sizes = [], []
    for part in np.array_split(order, min(groups, order.size)):
        if part.size == 0:
            continue
        curve = kaplan_meier(times[part], events[part], np.ones(part.size))
        obs = _at_horizon(curve, horizon)
        predicted = float(np.mean(pred[part]))
        out["groups"].append(
            {
                "predicted": predicted,
                "observed": obs.survival,
                "observed_lower": obs.lower,
                "observed_upper": obs.upper,
                "study_count": int(part.size),
            }
        )
        if obs.survival is not None:
            errors.append(abs(predicted - obs.survival))
            sizes.append(part.size)
    if errors:
        out["mean_absolute_error"] = float(np.average(errors, weights=sizes))
    return out


# --------------------------------------------------------------------- the evaluation
def _outcome_arrays(metadata: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = metadata.num_rows
    if "time" not in metadata.column_names or "event" not in metadata.column_names:
        return np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, bool)
    t = np.array([np.nan if v is None else float(v) for v in metadata["time"].to_pylist()])
    ev = metadata["event"].to_pylist()
    known = np.isfinite(t) & np.array([v is not None for v in ev])
    e = np.array([bool(v) for v in ev]) & known
    return t, e, known


def evaluate_prognosis(
    vectors: np.ndarray,
    metadata: pa.Table,
    *,
    k: int = DEFAULT_K,
    horizons: Sequence[float] = DEFAULT_HORIZONS,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    n_boot: int = DEFAULT_BOOTSTRAP,
) -> dict[str, Any]:
    """Leave-one-out prognostic quality of the cohort (module docstring); JSON-able dict.

    ``vectors`` ``(n, d)``, ``metadata`` the cohort table (row i <-> vector i) with
    ``patient_id`` and, for anything to evaluate, ``time`` and ``event``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError("temperatures must be a non-empty list of values > 0")
    n = metadata.num_rows
    times, events, known = _outcome_arrays(metadata)
    result: dict[str, Any] = {
        "method": "leave-one-out over the cohort, exact cosine neighbours of other patients",
        "k": int(k),
        "horizons": [float(h) for h in horizons],
        "temperature": DEFAULT_TEMPERATURE,
        "temperature_source": "default",
        "temperature_scores": [],
        "c_index": None,
        "c_index_interval": None,
        "n_boot": int(n_boot),
        "tau": None,
        "evaluated_studies": 0,
        "evaluated_events": 0,
        "calibration": [],
    }
    members = np.flatnonzero(known)
    if members.size > sample:
        members = np.sort(np.random.default_rng(seed).choice(members, sample, replace=False))
    if members.size < MIN_EVALUATED or n < 2:
        result["temperature_source"] = (
            f"default: {members.size} studies with outcomes, fewer than {MIN_EVALUATED} needed"
        )
        return result
    sims, nbrs = loo_neighbours(vectors, metadata["patient_id"].to_pylist(), k, rows=members)
    valid = nbrs >= 0
    nb = np.maximum(nbrs, 0)
    nb_t, nb_e = times[nb], events[nb]
    nb_known = valid & known[nb]
    t_m, e_m = times[members], events[members]
    fu = t_m[np.isfinite(t_m)]
    tau = float(min(max(horizons), np.quantile(fu, 0.9))) if fu.size else float(max(horizons))
    # horizons the follow-up supports (enough events before them, someone still followed)
    usable = [
        h for h in horizons if ((t_m <= h) & e_m).sum() >= MIN_EVENTS_PER_HORIZON and (t_m > h).any()
    ]

    filled = np.where(valid, sims, 0.0)  # padding slots get weight 0 below
    best: tuple[float, float] | None = None
    chosen = DEFAULT_TEMPERATURE
    by_t: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for temp in sorted(temperatures):
        w = np.where(nb_known, similarity_weights(filled, temperature=temp), 0.0)
        km = batched_km(np.where(nb_known, nb_t, np.inf), nb_e, w)
        by_t[temp] = km
        # Brier: carry the last value past the follow-up so every temperature scores the
        # same members; the integrated score is the mean over the usable horizons
        briers = [
            ipcw_brier(survival_at(*km, h, carry_forward=True), t_m, e_m, h) for h in usable
        ]
        brier = float(np.mean(briers)) if briers else float("nan")
        c = c_index(t_m, e_m, restricted_mean(*km, tau))
        result["temperature_scores"].append(
            {"temperature": temp, "brier": brier if np.isfinite(brier) else None, "c_index": c}
        )
        if np.isfinite(brier) and (best is None or brier <= best[0] + 1e-12):
            best, chosen = (brier, temp), temp
    if best is not None:
        result["temperature"] = chosen
        result["temperature_source"] = (
            "leave-one-out: lowest integrated Brier score at "
            + ", ".join(f"{h:g}" for h in usable)
        )
    else:
        result["temperature_source"] = "default: no horizon with enough events to score"
    if chosen in by_t:
        km = by_t[chosen]
    else:  # the default temperature was not on the grid
        w = np.where(nb_known, similarity_weights(filled, temperature=chosen), 0.0)
        km = batched_km(np.where(nb_known, nb_t, np.inf), nb_e, w)
    result["tau"] = tau
    rmst = restricted_mean(*km, tau)
    result["c_index"] = c_index(t_m, e_m, rmst)
    result["evaluated_studies"] = int(members.size)
    result["evaluated_events"] = int(e_m.sum())
    preds = [survival_at(*km, h) for h in horizons]
    result["calibration"] = [calibration(p, t_m, e_m, h) for p, h in zip(preds, horizons, strict=True)]
    patients = [str(v) for v in np.asarray(metadata["patient_id"].to_pylist(), dtype=object)[members]]
    _bootstrap(result, patients, rmst, preds, t_m, e_m, n_boot=n_boot, seed=seed)
    log.info(
        "evaluation: %d studies, temperature %g, C-index %s",
        members.size,
        chosen,
        "n/a" if result["c_index"] is None else f"{result['c_index']:.3f}",
    )
    return result


def _bootstrap(
    result: dict[str, Any],
    patients: Sequence[str],
    rmst: np.ndarray,
    preds: Sequence[np.ndarray],
    times: np.ndarray,
    events: np.ndarray,
    *,
    n_boot: int,
    seed: int,
) -> None:
    """Percentile intervals of the C-index and of each horizon's calibration error over
    ``n_boot`` resamples of the evaluated patients (held-out predictions fixed)."""
    if n_boot < 1 or not patients:
        return
    resamples = bootstrap_resamples(patients, n_boot, seed=seed)

    def interval(values: list[float | None]) -> list[float] | None:
        lo, hi = percentile_interval([np.nan if v is None else v for v in values])
        return None if not (np.isfinite(lo) and np.isfinite(hi)) else [lo, hi]

    if result["c_index"] is not None:
        if len(times) <= MAX_PAIR_MATRIX:
            a, b = harrell_pairs(times, events, rmst)
            m = np.stack([np.bincount(i, minlength=len(times)) for i in resamples]).astype(np.float32)
            num = np.einsum("ri,ri->r", m @ a, m, dtype=np.float64)  # one matmul for all
            den = np.einsum("ri,ri->r", m @ b, m, dtype=np.float64)
            values = [float(x / y) if y > 0 else None for x, y in zip(num, den, strict=True)]
        else:  # too many studies for the pair matrices: lifelines per resample
            values = [c_index(times[i], events[i], rmst[i]) for i in resamples]
        result["c_index_interval"] = interval(values)
    for cal, pred in zip(result["calibration"], preds, strict=True):
        if cal["mean_absolute_error"] is None:
            cal["mean_absolute_error_interval"] = None
            continue
        cal["mean_absolute_error_interval"] = interval(
            [
                calibration(pred[i], times[i], events[i], cal["time"])["mean_absolute_error"]
                for i in resamples[:CALIBRATION_BOOTSTRAP]  # ~16 ms each at 2000 studies
            ]
        )


__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_K",
    "DEFAULT_TEMPERATURES",
    "EVALUATION_KEY",
    "batched_km",
    "c_index",
    "calibration",
    "evaluate_prognosis",
    "harrell_pairs",
    "ipcw_brier",
    "loo_neighbours",
    "restricted_mean",
    "survival_at",
]
