from __future__ import annotations

import numpy as np
import pytest
from lifelines import KaplanMeierFitter

from indexing.prognosis import (
    cohort_curve,
    effective_sample_size,
    fleiss_kappa,
    kaplan_meier,
    ood_percentile,
    reader_agreement,
    similarity_weights,
    split_reader_key,
    summarize,
    thin_curve,
    wilson_interval,
)

Z95 = 1.959963984540054

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


@pytest.mark.parametrize("seed", [0, 11])
def test_unit_weights_match_lifelines(seed: int) -> None:
    t, e = random_cohort(seed=seed)
    t = t + 1.0  # no time 0, and the first three censored: the curve starts flat at 1
    e[np.argsort(t, kind="stable")[:3]] = False
    kmf = KaplanMeierFitter().fit(t, e)  # default band: exponential Greenwood (log(-log))
    got = curve_arrays(kaplan_meier(t, e, np.ones_like(t)))
    np.testing.assert_array_equal(got["time"], kmf.survival_function_.index.to_numpy())
    np.testing.assert_allclose(
        got["survival"], kmf.survival_function_.to_numpy()[:, 0], rtol=0, atol=1e-9
    )
    ci = kmf.confidence_interval_.to_numpy()
    below = (got["survival"] < 1.0) & (got["survival"] > 0.0)  # 0 < S < 1: lifelines' band
    assert below.sum() > 10
    np.testing.assert_allclose(got["lower"][below], ci[below, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["upper"][below], ci[below, 1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["at_risk"], kmf.event_table["at_risk"].to_numpy())
    # before the first event lifelines gives [1, 1]; here the Wilson bound on those still
    # observed after each time: n / (n + z^2)
    flat = got["survival"] >= 1.0
    assert flat.sum() >= 2 and np.all(ci[flat, 0] == 1.0)
    still = np.array([(t > x).sum() for x in got["time"][flat]], dtype=float)
    np.testing.assert_allclose(got["lower"][flat], still / (still + Z95**2), atol=1e-12)
    np.testing.assert_array_equal(got["upper"][flat], 1.0)


def greenwood_reference(t, e, w, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """The module docstring's formulas, one time at a time (an independent reference)."""
    t, e, w = np.asarray(t, float), np.asarray(e, bool), np.asarray(w, float)
    n_eff = w.sum() ** 2 / (w * w).sum()
    ws = w * n_eff / w.sum()
    z = Z95
    times = np.unique(np.concatenate([[0.0], t]))
    s, var, out = 1.0, 0.0, {k: [] for k in ("survival", "lower", "upper")}
    hi = 1.0
    for x in times:
        y = ws[t >= x].sum()
        d = ws[(t == x) & e].sum()
        if y > 0:
            s *= 1 - d / y
            if y - d > 1e-12:
                var += d / (y * (y - d))
        if s <= 1e-15:  # at the drop to 0: the bound before times the Wilson bound on Y
            first = not out["survival"] or out["survival"][-1] > 0
            lo, hi = 0.0, (hi * z * z / (y + z * z) if first else hi)
        elif s >= 1.0:
            a = ws[t > x].sum() or ws[t >= x].sum()
            lo, hi = a / (a + z * z), 1.0
        else:
            c = z * np.sqrt(var) / abs(np.log(s))
            lo, hi = s ** np.exp(c), s ** np.exp(-c)
        out["survival"].append(max(s, 0.0))
        out["lower"].append(lo)
        out["upper"].append(hi)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_band_matches_the_reference(seed: int) -> None:
    t, e = random_cohort(25, seed=seed)
    sims = np.random.default_rng(seed + 10).uniform(0.4, 0.95, t.size)
    w = similarity_weights(sims, temperature=0.1)
    got = curve_arrays(kaplan_meier(t, e, w))
    ref = greenwood_reference(t, e, w)
    for key in ("survival", "lower", "upper"):
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-9)


def band_coverage(k: int, weighted: bool, reps: int, seed: int) -> np.ndarray:
    """Share of simulated cohorts whose pointwise 95% band covers the true S(t)."""
    rng = np.random.default_rng(seed)
    checks = np.array([3.0, 6.0, 12.0, 24.0])
    covered, estimable = np.zeros(checks.size), np.zeros(checks.size)
    for _ in range(reps):
        sims = rng.uniform(0.5, 0.9, k)
        w = similarity_weights(sims, temperature=0.1) if weighted else np.ones(k)
        rate = np.full(k, 1 / 20.0) * np.exp(2.0 * (sims - 0.7))  # closer -> other risk
        death = rng.exponential(1 / rate)
        censor = np.minimum(rng.uniform(10, 60, k), rng.exponential(80, k))
        time, event = np.minimum(death, censor), death <= censor
        curve = curve_arrays(kaplan_meier(time, event, w))
        truth = [(w / w.sum() * np.exp(-rate * x)).sum() for x in checks]  # weighted mixture
        for j, x in enumerate(checks):
            if x > time.max():
                continue
            i = np.searchsorted(curve["time"], x, side="right") - 1
            estimable[j] += 1
            covered[j] += curve["lower"][i] <= truth[j] <= curve["upper"][i]
    return covered / estimable


@pytest.mark.parametrize("weighted", [False, True])
def test_band_coverage_by_simulation(weighted: bool) -> None:
    # nominal 95%: covered in >= 90% of simulated cohorts at each time (benchmarks/
    # bench_band_coverage.py runs this with more cohorts and sizes)
    cov = band_coverage(k=15, weighted=weighted, reps=1000, seed=7)
    assert np.all(cov >= 0.90), cov


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
        assert curve[-1].survival == 0.0 and curve[-1].lower == 0.0
        # no false certainty: the upper bound stays above 0 (below the bound just before)
        assert 0.0 < curve[-1].upper < curve[-2].upper


def test_upper_bound_at_zero_mirrors_the_wilson_bound_at_one() -> None:
    # n neighbours, all dead, no censoring: about the Wilson bound of 0 observed on n
    for n in (5, 10, 50):
        curve = kaplan_meier(np.arange(1.0, n + 1), np.ones(n, bool), np.ones(n))
        wilson = Z95**2 / (n + Z95**2)
        assert curve[-1].survival == 0.0
        assert curve[-1].upper == pytest.approx(wilson, rel=0.25)
    # everyone dies at once: exactly the mirror of the lower bound kept at S = 1
    curve = kaplan_meier([5.0] * 4, [True] * 4, [1.0] * 4)
    assert curve[-1].upper == pytest.approx(1.0 - curve[0].lower)
    # a horizon past the last death reports survival 0 with that upper bound, not [0, 0]
    p = summarize([1.0, 2.0, 3.0], [True] * 3, np.ones(3), [None] * 3, [None] * 3, horizons=[12.0])
    assert p.at_horizons[0].survival == 0.0 and p.at_horizons[0].upper > 0.3


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


def test_ood_percentile_is_stable_to_float_noise_at_a_tie() -> None:
    # a cohort member queried alone ties with its own reference entry; the batched BLAS
    # call gives a mean similarity ~1e-7 off, which must not move the percentile a rank
    ref = np.sort(np.random.default_rng(3).uniform(0.2, 0.9, 400))
    tie = float(ref[200])
    exact = ood_percentile(tie, ref)
    assert exact == 199 / 400
    for noise in (-1e-7, -3e-8, 3e-8, 1e-7, float(np.float32(tie)) - tie):
        assert ood_percentile(tie + noise, ref) == exact
    # a real difference still moves it
    assert ood_percentile(tie - 1e-3, ref) > exact


def test_similarity_weights_rowwise() -> None:
    sims = np.array([[0.9, 0.8, 0.1], [0.5, 0.5, 0.5]])
    w = similarity_weights(sims, temperature=0.2)
    assert w.shape == (2, 3)
    np.testing.assert_allclose(w[0], similarity_weights(sims[0], temperature=0.2), atol=1e-15)
    np.testing.assert_allclose(w[1], 1 / 3, atol=1e-15)


def test_fleiss_kappa_textbook_example() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    agreement, kappa, n = fleiss_kappa(table)
    assert n == 10
    assert agreement == pytest.approx(0.378022, abs=1e-6)
    assert kappa == pytest.approx(0.209931, abs=1e-6)
    assert fleiss_kappa([[2, 0], [1, 0]]) == (1.0, None, 1)  # one category: kappa undefined
    assert fleiss_kappa(np.zeros((0, 3))) == (None, None, 0)
    with pytest.raises(ValueError):
        fleiss_kappa([1, 2, 3])


def test_reader_agreement_hand_example() -> None:
    # two readers on four neighbours: agree on 3 of 4 (CR/CR, PD/PD, PR/PR; PR/CR differ)
    # P = 3/4; category shares CR 3/8, PR 3/8, PD 2/8 -> P_e = 22/64; kappa = 13/21
    labels = [
        {"response@reader1": "CR", "response@reader2": "CR", "grade": "G1"},
        {"response@reader1": "PR", "response@reader2": "CR"},
        {"response@reader1": "PD", "response@reader2": "PD"},
        {"response@reader1": "PR", "response@reader2": "PR"},
        {"response@reader1": "PR"},  # one reading: pooled, but not an agreement subject
    ]
    ra = reader_agreement(labels)
    assert list(ra) == ["response"]
    r = ra["response"]
    assert r.readers == ["reader1", "reader2"] and r.rated_neighbors == 4
    assert r.percent_agreement == pytest.approx(0.75, abs=1e-12)
    assert r.fleiss_kappa == pytest.approx(13 / 21, abs=1e-12)
    assert split_reader_key("response@reader1") == ("response", "reader1")
    assert split_reader_key("response") is None and split_reader_key("@x") is None

    w = np.array([0.3, 0.2, 0.2, 0.2, 0.1])
    p = summarize([None] * 5, [None] * 5, w, labels, [{}] * 5)
    assert set(p.label_distributions) == {"grade", "response", "response@reader1", "response@reader2"}
    pooled = {s.label: s for s in p.label_distributions["response"]}
    # each neighbour's weight split over its readers' labels
    assert pooled["CR"].share == pytest.approx(0.3 + 0.1)
    assert pooled["PR"].share == pytest.approx(0.1 + 0.2 + 0.1)
    assert pooled["PD"].share == pytest.approx(0.2)
    assert pooled["PR"].count == 3 and pooled["CR"].count == 2
    lo, hi = wilson_interval(0.4, effective_sample_size(w))
    assert (pooled["CR"].lower, pooled["CR"].upper) == pytest.approx((lo, hi))
    assert p.reader_agreement["response"].fleiss_kappa == pytest.approx(13 / 21)
    assert not any("readers disagree" in m for m in p.warnings)


def test_low_reader_agreement_warns() -> None:
    labels = [{"r@a": x, "r@b": y} for x, y in [("A", "B"), ("B", "A"), ("A", "A"), ("B", "B")]]
    p = summarize([None] * 4, [None] * 4, [0.25] * 4, labels, [{}] * 4)
    assert p.reader_agreement["r"].fleiss_kappa == pytest.approx(0.0)
    assert any("readers disagree on r" in m for m in p.warnings)


def test_cohort_curve_and_thinning() -> None:
    t, e = random_cohort(300, seed=9)
    t = t + np.arange(t.size) * 1e-3  # all distinct: a long curve
    times = [*t.tolist(), None]
    events = [*e.tolist(), True]
    curve, median, horizons = cohort_curve(times, events, horizons=(12, 24), max_points=50)
    full = kaplan_meier(t, e, np.ones_like(t))
    assert len(full) > 50 and len(curve) <= 50
    assert curve[0] == full[0] and curve[-1] == full[-1]
    assert median == next(p.time for p in full if p.survival <= 0.5)
    kmf = KaplanMeierFitter().fit(t, e)
    assert horizons[0].survival == pytest.approx(float(kmf.predict(12.0)), abs=1e-9)
    assert thin_curve(full, 10_000) == full
    assert cohort_curve([None], [None]) == ([], None, cohort_curve([None], [None])[2])
