from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lifelines.utils import concordance_index

from indexing.build import build_from_embeddings
from indexing.evaluation import (
    DEFAULT_TEMPERATURES,
    EVALUATION_KEY,
    batched_km,
    c_index,
    evaluate_prognosis,
    ipcw_brier,
    loo_neighbours,
    restricted_mean,
    survival_at,
)
from indexing.prognosis import kaplan_meier, similarity_weights
from indexing.snapshot import load_snapshot


def clustered_cohort(
    n: int = 240, seed: int = 0, *, signal: bool = True
) -> tuple[np.ndarray, pa.Table]:
    """Clusters in embedding space; survival depends on the cluster (if ``signal``)."""
    rng = np.random.default_rng(seed)
    d, clusters = 24, 6
    centres = rng.normal(size=(clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cl = rng.integers(0, clusters, n)
    x = (centres[cl] + 0.2 * rng.normal(size=(n, d))).astype(np.float32)
    scale = 4.0 + 10.0 * cl if signal else np.full(n, 25.0)
    death = rng.exponential(scale)
    censor = rng.uniform(8, 90, n)
    time = np.round(np.minimum(death, censor), 1)  # rounding makes ties
    meta = pa.table(
        {
            "patient_id": [f"P-{i // 2:04d}" for i in range(n)],  # two studies per patient
            "study_uid": [f"S-{i:04d}" for i in range(n)],
            "time": time,
            "event": death <= censor,
        }
    )
    return x, meta


def brute_harrell(t: np.ndarray, e: np.ndarray, score: np.ndarray) -> float:
    """Harrell's C by definition: pairs (i, j) where i is an event and j outlived it
    (t_i < t_j, or t_i == t_j with j censored); concordant when i's predicted survival is
    lower; ties in the prediction count 1/2."""
    num = den = 0.0
    for i in range(t.size):
        if not e[i]:
            continue
        for j in range(t.size):
            if t[i] < t[j] or (t[i] == t[j] and not e[j]):
                den += 1
                num += 1.0 if score[i] < score[j] else 0.5 if score[i] == score[j] else 0.0
    return num / den


def test_batched_km_equals_kaplan_meier() -> None:
    rng = np.random.default_rng(1)
    m, k = 40, 12
    times = np.round(rng.exponential(15, (m, k)))  # ties
    events = rng.random((m, k)) < 0.7
    weights = similarity_weights(rng.uniform(0.3, 0.9, (m, k)), temperature=0.1)
    weights[rng.random((m, k)) < 0.15] = 0.0  # neighbours without outcome
    t_sorted, s_after, last = batched_km(times, events, weights)
    for i in range(m):
        keep = weights[i] > 0
        curve = kaplan_meier(times[i, keep], events[i, keep], weights[i, keep])
        for p in curve[1:]:
            j = np.searchsorted(t_sorted[i], p.time, side="right") - 1
            assert s_after[i, j] == pytest.approx(p.survival, abs=1e-12)
        assert last[i] == curve[-1].time
        for h in (5.0, 20.0, 200.0):
            got = survival_at(t_sorted[i : i + 1], s_after[i : i + 1], last[i : i + 1], h)[0]
            ref = [q for q in curve if q.time <= h][-1]
            if h > curve[-1].time and curve[-1].survival > 0:
                assert np.isnan(got)
            else:
                assert got == pytest.approx(ref.survival, abs=1e-12)
        # restricted mean: the integral of the step function up to tau
        tau = 30.0
        ts = [q.time for q in curve if q.time < tau] + [tau]
        ss = [q.survival for q in curve if q.time < tau]
        area = sum(s * (b - a) for s, a, b in zip(ss, ts[:-1], ts[1:], strict=True))
        got = restricted_mean(t_sorted[i : i + 1], s_after[i : i + 1], last[i : i + 1], tau)
        assert got[0] == pytest.approx(area, abs=1e-9)


def test_c_index_agrees_with_reference_and_lifelines() -> None:
    rng = np.random.default_rng(2)
    t = np.round(rng.exponential(10, 80))
    e = rng.random(80) < 0.6
    score = np.round(t + rng.normal(0, 8, 80))  # informative, with ties
    got = c_index(t, e, score)
    assert got == pytest.approx(brute_harrell(t, e, score), abs=1e-6)
    assert got == pytest.approx(concordance_index(t, score, e), abs=1e-12)
    assert c_index(t, np.zeros(80, bool), score) is None
    nan_score = score.copy()
    nan_score[:5] = np.nan  # rows without a prediction are left out
    assert c_index(t, e, nan_score) == pytest.approx(brute_harrell(t[5:], e[5:], score[5:]))


def test_ipcw_brier_without_censoring_is_the_plain_brier_score() -> None:
    rng = np.random.default_rng(3)
    t = rng.exponential(10, 50)
    e = np.ones(50, bool)
    pred = rng.uniform(0, 1, 50)
    plain = np.mean(((t > 8.0).astype(float) - pred) ** 2)
    assert ipcw_brier(pred, t, e, 8.0) == pytest.approx(plain, abs=1e-12)


def test_loo_neighbours_exclude_the_patient() -> None:
    x, meta = clustered_cohort(60)
    sims, nbrs = loo_neighbours(x, meta["patient_id"].to_pylist(), 5)
    pid = np.array(meta["patient_id"].to_pylist())
    assert nbrs.shape == (60, 5) and (nbrs >= 0).all()
    for i in range(60):
        assert pid[i] not in set(pid[nbrs[i]])
        assert np.all(np.diff(sims[i]) <= 1e-6)


def test_evaluation_on_a_cohort_with_signal() -> None:
    x, meta = clustered_cohort()
    ev = evaluate_prognosis(x, meta)
    json.dumps(ev, allow_nan=False)  # JSON-able, no NaN
    assert ev["k"] == 10 and ev["evaluated_studies"] == 240
    assert ev["temperature"] in DEFAULT_TEMPERATURES
    assert ev["temperature_source"].startswith("leave-one-out")
    assert len(ev["temperature_scores"]) == len(DEFAULT_TEMPERATURES)
    best = min(s["brier"] for s in ev["temperature_scores"])
    chosen = next(s for s in ev["temperature_scores"] if s["temperature"] == ev["temperature"])
    assert chosen["brier"] == best
    assert ev["c_index"] > 0.65
    assert [c["time"] for c in ev["calibration"]] == [12.0, 24.0, 60.0]
    for cal in ev["calibration"]:
        groups = cal["groups"]
        assert 1 <= len(groups) <= 10
        preds = [g["predicted"] for g in groups]
        assert preds == sorted(preds)
        assert sum(g["study_count"] for g in groups) <= 240
    cal12 = ev["calibration"][0]
    assert len(cal12["groups"]) == 10 and cal12["mean_absolute_error"] < 0.2
    # the observed survival of a group is the plain KM of its members at the horizon
    assert all(
        g["observed"] is None or g["observed_lower"] <= g["observed"] <= g["observed_upper"]
        for g in cal12["groups"]
    )


def test_evaluation_without_signal_is_near_chance() -> None:
    x, meta = clustered_cohort(signal=False, seed=4)
    ev = evaluate_prognosis(x, meta)
    assert ev["c_index"] == pytest.approx(0.5, abs=0.08)


def test_evaluation_with_too_few_outcomes_keeps_the_default() -> None:
    x, meta = clustered_cohort(30)
    meta = meta.set_column(2, "time", pa.array([None] * 20 + meta["time"].to_pylist()[20:]))
    ev = evaluate_prognosis(x, meta)
    assert ev["temperature"] == 0.1 and ev["c_index"] is None
    assert ev["temperature_source"].startswith("default")
    ev = evaluate_prognosis(x, meta.drop_columns(["time", "event"]))
    assert ev["evaluated_studies"] == 0
    with pytest.raises(ValueError):
        evaluate_prognosis(x, meta, k=0)


def test_build_stores_the_evaluation_in_the_manifest(tmp_path: Path) -> None:
    x, meta = clustered_cohort(120, seed=5)
    table = meta.append_column("embedding", pa.array(x.tolist(), pa.list_(pa.float32())))
    pq.write_table(table, tmp_path / "emb.parquet")
    version = build_from_embeddings(tmp_path / "emb.parquet", tmp_path / "index")
    snap = load_snapshot(tmp_path / "index", version=version, device="cpu")
    ev = snap.manifest[EVALUATION_KEY]
    assert ev == evaluate_prognosis(x, meta)
    assert ev["evaluated_studies"] == 120 and ev["c_index"] is not None


def test_c_index_interval_excludes_chance_with_signal_and_includes_it_without() -> None:
    from indexing.notices import WarningCode, skill_notices

    x, meta = clustered_cohort()
    ev = evaluate_prognosis(x, meta)
    lo, hi = ev["c_index_interval"]
    assert 0.5 < lo < ev["c_index"] < hi < 1.0
    for cal in ev["calibration"]:
        if cal["mean_absolute_error"] is not None:
            a, b = cal["mean_absolute_error_interval"]
            assert 0.0 <= a <= b and a < cal["mean_absolute_error"] + 0.05
    assert skill_notices(ev) == []  # shown skill: no index-level warning

    x, meta = clustered_cohort(signal=False, seed=4)
    ev = evaluate_prognosis(x, meta)
    lo, hi = ev["c_index_interval"]
    assert lo <= 0.5 <= hi
    notes = skill_notices(ev)
    assert [n.code for n in notes] == [WarningCode.NO_PROGNOSTIC_SKILL]
    assert "includes 0.5" in notes[0]


def test_skill_notices_for_few_outcomes_few_events_and_no_evaluation() -> None:
    from indexing.notices import MIN_OUTCOMES, WarningCode, skill_notices

    x, meta = clustered_cohort(30)
    notes = skill_notices(evaluate_prognosis(x, meta))  # 30 outcomes: skill cannot be shown
    assert WarningCode.FEW_OUTCOMES in [n.code for n in notes]
    assert any(str(MIN_OUTCOMES) in n and "30 studies" in n for n in notes)
    meta = meta.set_column(2, "time", pa.array([None] * 20 + meta["time"].to_pylist()[20:]))
    codes = [n.code for n in skill_notices(evaluate_prognosis(x, meta))]  # 10: not evaluated
    assert codes == [WarningCode.NO_PROGNOSTIC_SKILL, WarningCode.FEW_OUTCOMES]
    assert next(n.code for n in skill_notices(None)) == WarningCode.NO_PROGNOSTIC_SKILL
    few_events = {"evaluated_studies": 400, "evaluated_events": 3, "c_index": 0.9,
                  "c_index_interval": [0.8, 0.95]}
    assert "only 3 events" in skill_notices(few_events)[0]
    old = {"evaluated_studies": 400, "evaluated_events": 90, "c_index": 0.7}
    assert "without an interval" in skill_notices(old)[0]


def test_harrell_pairs_give_the_c_index_of_any_resample() -> None:
    from indexing.evaluation import harrell_pairs

    rng = np.random.default_rng(8)
    t = np.round(rng.exponential(10, 60), 0)  # rounding makes ties in time
    e = rng.random(60) < 0.6
    p = np.round(rng.random(60), 1)  # and ties in the prediction
    p[3] = np.nan
    a, b = harrell_pairs(t, e, p)
    ok = np.isfinite(p)
    ones = np.ones(60)
    ones[~ok] = 0
    assert (ones @ a @ ones) / (ones @ b @ ones) == pytest.approx(brute_harrell(t[ok], e[ok], p[ok]))
    idx = rng.integers(0, 60, 60)  # a resample with repeats
    idx = idx[ok[idx]]
    m = np.bincount(idx, minlength=60).astype(float)
    assert (m @ a @ m) / (m @ b @ m) == pytest.approx(brute_harrell(t[idx], e[idx], p[idx]))
