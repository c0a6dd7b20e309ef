from __future__ import annotations

import numpy as np
import pytest
from lifelines import KaplanMeierFitter

from indexing.prognosis import (
    effective_sample_size,
    kaplan_meier,
    ood_percentile,
    similarity_weights,
    summarize,
    wilson_interval,
)

HAND_T = [3.0, 5.0, 5.0, 8.0, 10.0, 12.0]
HAND_E = [True, False, True, True, False, True]


def random_cohort(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.round(rng.exponential(20.0, n))  # rounding makes ties
    e = rng.random(n) < 0.7
    return t, e


def curve_arrays(points) -> dict[str, np.ndarray]:
    return {
        f: np.array([getattr(p, f) for p in points])
        for f in ("time", "survival", "lower", "upper", "at_risk")
    }


def test_unit_weights_match_lifelines() -> None:
    t, e = random_cohort()
    kmf = KaplanMeierFitter().fit(t, e)  # default band: exponential Greenwood (log(-log))
    got = curve_arrays(kaplan_meier(t, e, np.ones_like(t)))
    np.testing.assert_array_equal(got["time"], kmf.survival_function_.index.to_numpy())
    np.testing.assert_allclose(
        got["survival"], kmf.survival_function_.to_numpy()[:, 0], rtol=0, atol=1e-9
    )
    ci = kmf.confidence_interval_.to_numpy()
    np.testing.assert_allclose(got["lower"], ci[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["upper"], ci[:, 1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["at_risk"], kmf.event_table["at_risk"].to_numpy())


def test_hand_example_median_and_horizons() -> None:
    w = np.ones(6)
    curve = curve_arrays(kaplan_meier(HAND_T, HAND_E, w))
    np.testing.assert_allclose(curve["survival"], [1, 5 / 6, 2 / 3, 4 / 9, 4 / 9, 0], atol=1e-12)
    np.testing.assert_array_equal(curve["at_risk"], [6, 6, 5, 3, 2, 1])
    p = summarize(HAND_T, HAND_E, w / 6, [{}] * 6, [{}] * 6, horizons=(4, 9, 12, 20))
    assert p.median == 8.0
    assert p.median_lower is not None and p.median_lower <= 8.0
    assert p.median_upper is None or p.median_upper >= 8.0
    surv = [h.survival for h in p.at_horizons]
    np.testing.assert_allclose(surv, [5 / 6, 4 / 9, 0.0, 0.0], atol=1e-12)  # S=0 stays 0
    assert p.n_with_outcome == 6 and p.n_events == 4
    assert p.effective_n == pytest.approx(6.0)


def test_horizon_beyond_censored_follow_up_is_not_estimated() -> None:
    p = summarize(
        [3.0, 5.0, 8.0], [True, False, False], [1 / 3] * 3, [{}] * 3, [{}] * 3, horizons=(4, 10)
    )
    assert p.at_horizons[0].survival == pytest.approx(2 / 3)
    assert p.at_horizons[1].survival is None and p.at_horizons[1].lower is None
    assert p.median is None
    assert any("beyond the longest follow-up" in w for w in p.warnings)


def test_weights_scale_free_and_integer_weights_replicate_rows() -> None:
    t, e = random_cohort(30, seed=1)
    w = np.random.default_rng(2).integers(1, 4, size=t.size).astype(float)
    a = curve_arrays(kaplan_meier(t, e, w))
    b = curve_arrays(kaplan_meier(t, e, w / w.sum()))  # normalising changes nothing
    for key in ("survival", "lower", "upper"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-12)
    rep = KaplanMeierFitter().fit(np.repeat(t, w.astype(int)), np.repeat(e, w.astype(int)))
    np.testing.assert_allclose(a["survival"], rep.survival_function_.to_numpy()[:, 0], atol=1e-9)
    # the band uses n_eff < sum(w): wider than the replicated-rows band
    band_rep = rep.confidence_interval_.to_numpy()
    assert np.all(a["upper"] - a["lower"] >= band_rep[:, 1] - band_rep[:, 0] - 1e-12)


def test_fractional_weights_match_lifelines_point_estimate() -> None:
    t, e = random_cohort(40, seed=6)
    t = t + np.arange(t.size) * 1e-3  # distinct times
    e[np.argmax(t)] = False  # last one censored: lifelines' tail is then reliable too
    w = similarity_weights(np.random.default_rng(7).uniform(0.3, 0.9, t.size))
    with pytest.warns(Warning):  # lifelines warns that non-integer weights bias its variance
        kmf = KaplanMeierFitter().fit(t, e, weights=w)
    got = curve_arrays(kaplan_meier(t, e, w))
    np.testing.assert_allclose(got["survival"], kmf.survival_function_.to_numpy()[:, 0], atol=1e-9)


def test_last_death_drops_to_zero_with_fractional_weights() -> None:
    # every remaining neighbour dies at the last time: S must be exactly 0 there, whatever
    # rounding the weights carry (lifelines 0.30 leaves the curve flat in this case)
    t, e = random_cohort(40, seed=3)
    e[t == t.max()] = True
    for w in (np.full_like(t, 0.025), np.full_like(t, 1 / 3), similarity_weights(t / 100)):
        curve = kaplan_meier(t, e, w)
        assert curve[-1].survival == 0.0 and curve[-1].lower == curve[-1].upper == 0.0


def test_constant_weights_give_the_unit_band() -> None:
    t, e = random_cohort(40, seed=3)
    a = curve_arrays(kaplan_meier(t, e, np.ones_like(t)))
    b = curve_arrays(kaplan_meier(t, e, np.full_like(t, 0.025)))
    for key in ("survival", "lower", "upper"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-12)


def test_float32_weights_match_float64() -> None:
    # float32 softmax weights carry ~1e-7 relative error; everything is computed in float64,
    # so the curve moves by that much at most and never by the float32 sum's drift from 1.
    t, e = random_cohort(50, seed=4)
    sims = np.random.default_rng(5).uniform(0.5, 0.9, t.size)
    w64 = similarity_weights(sims)
    w32 = w64.astype(np.float32)
    a = curve_arrays(kaplan_meier(t, e, w64))
    b = curve_arrays(kaplan_meier(t, e, w32))
    for key in ("survival", "lower", "upper"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)


def test_similarity_weights() -> None:
    sims = np.array([0.9, 0.8, 0.8, 0.1], dtype=np.float32)
    w = similarity_weights(sims, temperature=0.1)
    assert w.dtype == np.float64 and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[0] > w[1] == w[2] > w[3]
    assert w[0] / w[1] == pytest.approx(np.exp(1.0), rel=1e-5)
    flat = similarity_weights(sims, temperature=1e6)
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)
    assert similarity_weights([]).size == 0
    with pytest.raises(ValueError):
        similarity_weights(sims, temperature=0)
    assert effective_sample_size(np.ones(8)) == pytest.approx(8.0)
    assert effective_sample_size([1.0, 0.0, 0.0]) == pytest.approx(1.0)


def test_wilson_hand_example() -> None:
    lo, hi = wilson_interval(0.5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0.0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_labels_values_and_missing_outcomes() -> None:
    times = [5.0, None, 7.0, 9.0]
    events = [True, True, None, False]
    w = np.array([0.4, 0.3, 0.2, 0.1])
    labels = [{"hist": "adeno"}, {"hist": "squamous"}, {"hist": "adeno"}, {}]
    values = [{"suv": 2.0}, {"suv": 4.0}, {}, {"suv": float("nan")}]
    p = summarize(times, events, w, labels, values)
    assert p.n_with_outcome == 2 and p.n_events == 1
    assert any("only 2 of 4 neighbours" in msg for msg in p.warnings)
    assert any("effective sample size" in msg for msg in p.warnings)
    shares = {s.label: s for s in p.label_distributions["hist"]}
    assert shares["adeno"].share == pytest.approx(0.6 / 0.9)
    assert shares["adeno"].count == 2 and shares["squamous"].count == 1
    n_eff = effective_sample_size([0.4, 0.3, 0.2])
    lo, hi = wilson_interval(0.6 / 0.9, n_eff)
    assert (shares["adeno"].lower, shares["adeno"].upper) == pytest.approx((lo, hi))
    assert p.label_distributions["hist"][0].label == "adeno"  # sorted by share
    suv = p.value_summaries["suv"]
    assert suv.n == 2 and suv.mean == pytest.approx((0.4 * 2 + 0.3 * 4) / 0.7)
    assert suv.lower is not None and suv.lower < suv.mean < suv.upper


def test_no_outcomes_at_all() -> None:
    p = summarize([None, None], [None, None], [0.5, 0.5], [{}, {}], [{}, {}])
    assert p.survival == [] and p.median is None and p.n_with_outcome == 0
    assert all(h.survival is None for h in p.at_horizons)
    assert any("none of the 2 neighbours" in msg for msg in p.warnings)


def test_ood_percentile() -> None:
    ref = np.array([0.1, 0.2, 0.3, 0.4])
    assert ood_percentile(0.25, ref) == 0.5
    assert ood_percentile(0.05, ref) == 1.0
    assert ood_percentile(0.4, ref) == 0.0  # strictly greater
    assert ood_percentile(0.3, ref) == 0.25
    assert ood_percentile(0.3, []) == 0.0
