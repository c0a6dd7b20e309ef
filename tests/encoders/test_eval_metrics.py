"""Retrieval metrics on hand-made inputs (values worked out by hand), and ComBat."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index

from encoders.evaluate import (
    EvalError,
    bootstrap_resamples,
    evaluate_retrieval,
    hu_histogram_features,
    knn_c_index,
    metric_cells,
    nearest_neighbours,
    nelson_aalen_at,
    percentile_interval,
    precision_at_k,
    random_vectors,
    scanner_excess,
    split_queries,
)
from encoders.harmonize import ComBat, HarmonizeError


def test_nearest_neighbours_cosine_order() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    q = np.array([[2.0, 0.1], [0.0, -3.0]])  # scale does not matter (cosine)
    nb = nearest_neighbours(q, ref, 2)
    assert nb[0].tolist() == [0, 2]
    # q2 = (0, -1): cos with ref0 = 0, ref1 = -1, ref2 = -0.707, ref3 = 0 -> ties by index
    assert nb[1].tolist() == [0, 3]
    with pytest.raises(EvalError, match="k must be"):
        nearest_neighbours(q, ref, 5)
    with pytest.raises(EvalError, match="same d"):
        nearest_neighbours(q, ref[:, :1], 1)


def test_precision_at_k_by_hand() -> None:
    nl = np.array([["a", "a", "b", "c"], ["b", "b", "b", "b"]])
    assert precision_at_k(nl, np.array(["a", "c"])) == pytest.approx((2 / 4 + 0 / 4) / 2)
    with pytest.raises(EvalError):
        precision_at_k(nl, np.array(["a"]))


def test_scanner_excess_by_hand() -> None:
    ref = np.array(["s1"] * 3 + ["s2"] * 1)  # shares 0.75 / 0.25
    ns = np.array([["s1", "s1"], ["s2", "s1"]])
    qs = np.array(["s1", "s2"])
    # query 1: 2/2 from s1 - 0.75 = 0.25; query 2: 1/2 from s2 - 0.25 = 0.25
    assert scanner_excess(ns, qs, ref) == pytest.approx(0.25)
    # scanner-blind neighbours drawn in proportion give 0
    ns_blind = np.array([["s1", "s1", "s1", "s2"], ["s1", "s1", "s1", "s2"]])
    assert scanner_excess(ns_blind, qs, ref) == pytest.approx(0.0)
    # a query scanner unseen in the reference has share 0
    assert scanner_excess(np.array([["s1"]]), np.array(["s9"]), ref) == pytest.approx(0.0)


def test_nelson_aalen_by_hand() -> None:
    t = np.array([5.0, 10.0, 10.0, 20.0, 30.0])
    e = np.array([True, True, False, True, True])
    # at 5: 1/5; at 10: 1/4 (the censoring at 10 is still at risk); at 20: 1/2
    assert nelson_aalen_at(t, e, 24.0) == pytest.approx(1 / 5 + 1 / 4 + 1 / 2)
    assert nelson_aalen_at(t, e, 4.0) == 0.0
    assert nelson_aalen_at(t, e, 10.0) == pytest.approx(1 / 5 + 1 / 4)
    # NaN times are ignored
    assert nelson_aalen_at(np.array([5.0, np.nan]), np.array([True, True]), 24) == 1.0


def test_knn_c_index_matches_lifelines_on_risks() -> None:
    # three queries; neighbour sets make risks 1.0 (all die at 1), 0.5, 0 (no event)
    nt = np.array([[1.0, 1.0], [1.0, 50.0], [50.0, 60.0]])
    ne = np.array([[True, True], [True, False], [False, False]])
    qt = np.array([2.0, 10.0, 40.0])
    qe = np.array([True, True, False])
    c = knn_c_index(nt, ne, qt, qe)
    # NA at 24 months: 2 of 2 die at t=1 -> 1.0; 1 of 2 at t=1 -> 0.5; no event -> 0
    assert [nelson_aalen_at(t, e, 24) for t, e in zip(nt, ne, strict=True)] == [1.0, 0.5, 0.0]
    assert c == pytest.approx(concordance_index(qt, -np.array([1.0, 0.5, 0.0]), qe))
    assert c == 1.0  # higher risk died earlier in every comparable pair
    assert knn_c_index(nt, ne, qt[::-1].copy(), qe) < 0.5


def test_evaluate_retrieval_end_to_end_by_hand() -> None:
    # two phenotype clusters along x/y, scanner encoded in a small z offset
    ref = np.array([[1, 0, 0.1], [1, 0.05, -0.1], [0, 1, 0.1], [0.05, 1, -0.1]], float)
    q = np.array([[1, 0.01, 0.0], [0.02, 1, 0.0]], float)
    m = evaluate_retrieval(
        q, ref,
        query_labels=["A", "B"], reference_labels=["A", "A", "B", "B"],
        query_scanners=["s1", "s2"], reference_scanners=["s1", "s2", "s1", "s2"],
        query_times=[5.0, 40.0], query_events=[True, False],
        reference_times=[3.0, 6.0, 60.0, 70.0], reference_events=[True, True, False, False],
        k=2,
    )
    assert m.precision_at_k == 1.0
    assert m.scanner_excess == pytest.approx(0.0)  # each gets one s1 and one s2 neighbour
    assert m.c_index == 1.0
    assert (m.k, m.n_queries, m.n_reference) == (2, 2, 4)
    with pytest.raises(EvalError, match="reference labels"):
        evaluate_retrieval(
            q, ref, query_labels=["A", "B"], reference_labels=["A"],
            query_scanners=["s1", "s2"], reference_scanners=["s1", "s2", "s1", "s2"],
            query_times=[1, 2], query_events=[1, 0], reference_times=[1, 2, 3, 4],
            reference_events=[1, 1, 1, 1], k=2,
        )


def _two_cluster_case(m: int, hit_share: float, groups: list[str] | None = None,
                      n_boot: int = 500):  # type: ignore[no-untyped-def]
    """``m`` queries; a share ``hit_share`` of them lie in the cluster of their label (all
    neighbours right), the rest in the other (all wrong): P@k = hit_share exactly."""
    ref = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    ref_lab = ["A"] * 4 + ["B"] * 4
    hits = round(m * hit_share)
    q = np.array([[1.0, 0.05]] * hits + [[0.05, 1.0]] * (m - hits))
    return evaluate_retrieval(
        q, ref, query_labels=["A"] * m, reference_labels=ref_lab,
        query_scanners=["s1"] * m, reference_scanners=["s1", "s2"] * 4,
        query_times=np.linspace(1, 30, m), query_events=[True] * m,
        reference_times=[5.0] * 4 + [50.0] * 4, reference_events=[True] * 8,
        k=4, query_groups=groups, n_boot=n_boot, seed=3,
    )


def test_bootstrap_intervals_bracket_the_figure_and_narrow_with_more_queries() -> None:
    small, large = _two_cluster_case(20, 0.5), _two_cluster_case(320, 0.5)
    for m in (small, large):
        assert m.precision_at_k == pytest.approx(0.5)
        lo, hi = m.precision_ci  # type: ignore[misc]
        assert lo < 0.5 < hi
        assert m.scanner_excess_ci is not None and m.c_index_ci is not None
        assert m.c_index_ci[0] <= m.c_index <= m.c_index_ci[1]
        assert (m.n_boot, m.ci_level) == (500, 0.95)
    w_small = small.precision_ci[1] - small.precision_ci[0]  # type: ignore[index]
    w_large = large.precision_ci[1] - large.precision_ci[0]  # type: ignore[index]
    # the width of a mean's interval falls as 1/sqrt(m): 16x the queries, ~1/4 the width
    assert 0.15 < w_large / w_small < 0.35
    # every query right: nothing to resample but ones
    perfect = _two_cluster_case(20, 1.0)
    assert perfect.precision_ci == (1.0, 1.0)
    # the same seed gives the same interval; n_boot 0 gives none
    assert _two_cluster_case(20, 0.5).precision_ci == small.precision_ci
    none = _two_cluster_case(20, 0.5, n_boot=0)
    assert none.precision_ci is none.scanner_excess_ci is none.c_index_ci is None
    assert metric_cells(none) == ("0.500", "+0.000", format(none.c_index, ".3f"))
    assert metric_cells(small)[0] == (
        f"0.500 [{small.precision_ci[0]:.3f}, {small.precision_ci[1]:.3f}]"  # type: ignore[index]
    )


def test_bootstrap_resamples_whole_patients() -> None:
    """Studies of one patient go in and out of a resample together, so 40 queries from 8
    patients give a wider interval than 40 independent patients."""
    groups = [f"p{i // 5}" for i in range(40)]
    for idx in bootstrap_resamples(groups, 50, seed=1):
        assert len(idx) == 40
        counts = np.bincount(idx, minlength=40)
        for p in range(8):  # all five studies of a patient appear equally often
            assert len(set(counts[5 * p: 5 * p + 5].tolist())) == 1
    # patient p has all-right or all-wrong queries (the hit queries come first)
    clustered = _two_cluster_case(40, 0.5, groups=groups)
    independent = _two_cluster_case(40, 0.5)
    width = lambda m: m.precision_ci[1] - m.precision_ci[0]  # noqa: E731
    assert width(clustered) > 1.5 * width(independent)
    with pytest.raises(EvalError, match=">= 0"):
        bootstrap_resamples(groups, -1)
    with pytest.raises(EvalError, match="query groups"):
        _two_cluster_case(40, 0.5, groups=groups[:-1])


def test_bootstrap_interval_covers_the_true_share() -> None:
    """Coverage: per-query hit rates drawn around a true P@10 of 0.7; the 95 % interval
    of 60 queries holds 0.7 in about 95 % of 200 seeded draws."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        hits = rng.binomial(10, 0.7, size=60) / 10.0
        lo, hi = percentile_interval(
            [hits[i].mean() for i in bootstrap_resamples(np.arange(60), 400, seed=trial)])
        covered += lo <= 0.7 <= hi
    assert 0.88 <= covered / 200 <= 0.99
    assert np.isnan(percentile_interval([np.nan, np.nan])).all()  # no finite value, no interval
    with pytest.raises(EvalError, match="level"):
        percentile_interval([0.5], 1.5)
    with pytest.raises(EvalError, match="level"):
        evaluate_retrieval(
            np.ones((2, 2)), np.ones((3, 2)), query_labels=["a", "a"], reference_labels=["a"] * 3,
            query_scanners=["s"] * 2, reference_scanners=["s"] * 3, query_times=[1, 2],
            query_events=[1, 1], reference_times=[1, 2, 3], reference_events=[1, 1, 1], k=1,
            ci_level=1.0,
        )


def test_baselines_and_split() -> None:
    r = random_vectors(5, 8, seed=1)
    assert r.shape == (5, 8) and np.array_equal(r, random_vectors(5, 8, seed=1))
    vols = np.full((2, 2, 4, 4), -1000, np.int16)
    vols[1] = 40
    h = hu_histogram_features(vols, bins=10)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, atol=1e-6)
    assert float(h[0] @ h[1]) == 0.0  # disjoint histograms
    pids = ["p1", "p1", "p2", "p3", "p4"]
    mask = split_queries(pids, 0.5, seed=0)
    assert mask[0] == mask[1]  # a patient's studies stay together
    assert 1 <= len({p for p, m in zip(pids, mask, strict=True) if m}) <= 3
    with pytest.raises(EvalError):
        split_queries(pids, 1.5)


def test_combat_removes_scanner_shift_and_scale() -> None:
    rng = np.random.default_rng(0)
    n, d = 200, 6
    signal = rng.normal(0, 1, (n, d))
    scanner = np.array(["a", "b"] * (n // 2))
    x = signal.copy()
    x[scanner == "b"] = x[scanner == "b"] * 2.0 + 3.0  # scanner b: scale 2, shift 3
    cb = ComBat().fit(x, scanner)
    y, unknown = cb.transform(x, scanner)
    assert unknown == 0
    for s in ("a", "b"):
        np.testing.assert_allclose(y[scanner == s].mean(0), y.mean(0), atol=0.3)
    ratio = y[scanner == "b"].std(0) / y[scanner == "a"].std(0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.25)
    # round trip through JSON, unknown scanners untouched
    again = ComBat.from_dict(cb.to_dict())
    np.testing.assert_allclose(again.transform(x, scanner)[0], y, atol=1e-5)
    z, unk = cb.transform(x[:3], ["zz", "zz", "a"])
    assert unk == 2
    np.testing.assert_allclose(z[:2], x[:2], atol=1e-5)


def test_combat_errors() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(HarmonizeError, match="at least 2 scanners"):
        ComBat().fit(x, ["a"] * 4)
    with pytest.raises(HarmonizeError, match="at least 2 studies"):
        ComBat().fit(x, ["a", "a", "a", "b"])
    with pytest.raises(HarmonizeError, match="not fitted"):
        ComBat().transform(x, ["a"] * 4)
    with pytest.raises(HarmonizeError, match="NaN"):
        ComBat().fit(np.full((4, 2), np.nan), ["a", "a", "b", "b"])


def test_calibrate_hu_undoes_scanner_offset_and_gain() -> None:
    from encoders.harmonize import calibrate_hu, hu_reference_levels

    rng = np.random.default_rng(0)
    true = np.full((8, 48, 48), -1000.0)
    true[:, 8:40, 6:42] = 40.0  # soft tissue
    true[:, 14:34, 12:22] = -850.0  # lung
    true[:, 20:24, 30:34] = 10.0  # a lesion
    true += rng.normal(0, 8, true.shape)
    out = []
    for gain, offset in ((1.0, 0.0), (1.03, 25.0), (0.97, -20.0)):
        obs = (true * gain + offset).astype(np.int16)
        obs[0, 0, :5] = -1024  # pad voxels stay pad voxels
        cal = calibrate_hu(obs)
        assert cal.dtype == np.int16 and (cal[0, 0, :5] == -1024).all()
        soft, air = hu_reference_levels(cal)
        assert soft == pytest.approx(40.0, abs=3) and air == pytest.approx(-1000.0, abs=3)
        out.append(cal[:, 20:24, 30:34].mean())
    # the lesion's HU agrees across "scanners" after calibration (it differed by ~45 HU)
    assert max(out) - min(out) < 4.0
    batch = calibrate_hu(np.stack([true.astype(np.int16)] * 2))
    assert batch.shape == (2, *true.shape)
    flat = np.full((2, 4, 4), -500, np.int16)  # no soft tissue: unchanged
    np.testing.assert_array_equal(calibrate_hu(flat), flat)


def test_calibrate_with_maps_a_patch_by_its_study_references() -> None:
    """A patch cut from a study has no outside air and may be mostly lesion: calibrated
    with the whole study's references it lands where the study's own calibration puts
    it; calibrated on itself it does not."""
    from encoders.harmonize import calibrate_hu, calibrate_with, calibration_params

    rng = np.random.default_rng(1)
    true = np.full((8, 48, 48), -1000.0)
    true[:, 8:40, 6:42] = 40.0
    true[:, 14:34, 12:22] = -850.0
    true[:, 18:26, 14:20] = 120.0  # a dense lesion filling the patch below
    true += rng.normal(0, 8, true.shape)
    obs = (true * 1.03 + 25.0).astype(np.int16)
    params = calibration_params(obs)
    assert params is not None
    patch = obs[:, 16:28, 12:22]
    by_study = calibrate_with(patch, params)
    assert by_study.dtype == np.int16 and by_study.shape == patch.shape
    np.testing.assert_array_equal(by_study, calibrate_hu(obs)[:, 16:28, 12:22])
    lesion = by_study[:, 2:10, 2:8].mean()
    assert lesion == pytest.approx(120.0, abs=6)
    float_patch = calibrate_with(patch.astype(np.float32), params)
    assert float_patch.dtype == np.float32
    assert float(np.abs(float_patch - by_study).max()) <= 0.5 + 1e-3  # int16 rounds
    np.testing.assert_array_equal(calibrate_with(patch, None), patch)
