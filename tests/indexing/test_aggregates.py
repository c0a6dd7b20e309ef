"""Additive aggregates (indexing.aggregates): parts pool to the whole, the pooled binned
Kaplan-Meier equals lifelines' on the concatenated binned data, small cells are withheld."""

from __future__ import annotations

import numpy as np
import pytest

from indexing.aggregates import DEFAULT_BIN_EDGES, aggregate, binned_km, pool, suppress

EDGES = (0.0, 12.0, 24.0, 48.0, 96.0)


def _site(seed: int, n: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    times = rng.exponential(30.0, n).round(1).tolist()
    events = (rng.random(n) < 0.7).tolist()
    sims = rng.uniform(0.5, 1.0, n).tolist()
    labels = [{"histology": ["adeno", "squamous"][int(i % 2)]} for i in range(n)]
    times[0], events[0] = None, None  # no outcome: labels only
    times[1] = 150.0  # beyond the last edge: at risk throughout, censored there
    return {"times": times, "events": events, "sims": sims, "labels": labels}


def _agg(site: dict[str, list]) -> object:
    return aggregate(site["times"], site["events"], site["sims"], site["labels"], edges=EDGES)


def test_parts_pool_to_the_whole() -> None:
    sites = [_site(s, n) for s, n in ((1, 80), (2, 60), (3, 70))]
    whole = {key: [v for s in sites for v in s[key]] for key in sites[0]}
    pooled = pool([_agg(s) for s in sites])
    direct = _agg(whole)
    np.testing.assert_array_equal(pooled.at_risk, direct.at_risk)
    np.testing.assert_array_equal(pooled.events, direct.events)
    np.testing.assert_allclose(pooled.w_at_risk, direct.w_at_risk, rtol=1e-12)
    np.testing.assert_allclose(pooled.w_events, direct.w_events, rtol=1e-12)
    assert pooled.labels == direct.labels and pooled.patients == direct.patients == 207


def test_pooled_km_equals_lifelines_on_concatenated_binned_data() -> None:
    lifelines = pytest.importorskip("lifelines")
    sites = [_site(s, n) for s, n in ((4, 90), (5, 75), (6, 85))]
    km = binned_km(suppress(pool([_agg(s) for s in sites]), 11))
    assert len(km) == len(EDGES) - 1  # every cell is large enough: the whole curve
    # the concatenated data, each time moved to the end of its bin (beyond: censored at
    # the last edge)
    t_all, d_all = [], []
    for s in sites:
        for t, d in zip(s["times"], s["events"], strict=True):
            if t is None or d is None:
                continue
            j = int(np.searchsorted(EDGES, t, side="right")) - 1
            if j >= len(EDGES) - 1:
                t_all.append(EDGES[-1])
                d_all.append(False)
            else:
                t_all.append(EDGES[j + 1])
                d_all.append(bool(d))
    fit = lifelines.KaplanMeierFitter().fit(t_all, d_all)
    expected = fit.survival_function_at_times([t for t, _, _ in km]).to_numpy()
    np.testing.assert_allclose([s for _, s, _ in km], expected, atol=1e-12)
    at_risk = fit.event_table["at_risk"]
    assert [n for _, _, n in km] == [int(at_risk.loc[t]) for t, _, _ in km]


@pytest.mark.parametrize(("min_cell", "released"), [(10, True), (11, False)])
def test_a_cell_of_ten_is_released_at_min_cell_10_and_withheld_at_11(min_cell: int, released: bool) -> None:
    # 30 patients: 10 events in the first bin, 20 beyond the last edge
    times = [5.0] * 10 + [200.0] * 20
    agg = suppress(aggregate(times, [True] * 30, [0.9] * 30, [None] * 30, edges=EDGES), min_cell)
    assert bool(agg.events[0] == 10) is released
    assert ("events[0]" in agg.withheld) is not released
    km = binned_km(agg)
    assert (len(km) == len(EDGES) - 1) is released  # the curve stops at a withheld bin


def test_withheld_at_one_site_stays_withheld_after_pooling() -> None:
    big = aggregate([5.0] * 40, [True] * 40, [0.9] * 40, [None] * 40, edges=EDGES)
    small = aggregate([5.0] * 3, [True] * 3, [0.9] * 3, [None] * 3, edges=EDGES)
    pooled = suppress(pool([suppress(big, 11), suppress(small, 11)]), 11)
    assert "events[0]" in pooled.withheld and pooled.events[0] == 0
    assert binned_km(pooled) == []


def test_bad_edges_and_mixed_edges_are_refused() -> None:
    with pytest.raises(ValueError, match="increasing"):
        aggregate([], [], [], [], edges=(0.0, 0.0))
    a = aggregate([1.0], [True], [1.0], [None], edges=EDGES)
    b = aggregate([1.0], [True], [1.0], [None], edges=DEFAULT_BIN_EDGES)
    with pytest.raises(ValueError, match="different bin edges"):
        pool([a, b])
