from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import DimensionError, QueryError
from indexing.evaluation import EVALUATION_KEY
from indexing.prognosis import cohort_curve, similarity_weights
from indexing.query import OOD_WARNING, attach_stability, search_similar, thumbnails
from indexing.snapshot import Snapshot, build_snapshot, load_snapshot
from indexing.thumbnails import thumbnail_array, thumbnail_png

D, CLUSTERS, PER_CLUSTER = 32, 8, 50
N = CLUSTERS * PER_CLUSTER
SCANNERS = [("ACME", "CT-1"), ("Bolt", "B2"), ("Cora", "C3"), ("Dyna", "D4")]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Snapshot, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(CLUSTERS, D)))
    cluster = np.repeat(np.arange(CLUSTERS), PER_CLUSTER)
    x = unit(centres[cluster] + 0.08 * rng.normal(size=(N, D))).astype(np.float32)
    # cluster 0 is scanned on ACME only; the others on a mix of the other scanners
    scanner = [SCANNERS[0] if c == 0 else SCANNERS[1 + i % 3] for i, c in enumerate(cluster)]
    time = rng.exponential(10.0 + 10.0 * cluster)
    event = rng.random(N) < 0.8
    has_outcome = rng.random(N) < 0.9
    meta = pa.table(
        {
            "patient_id": [f"P-{i // 2:04d}" for i in range(N)],  # two studies per patient
            "study_uid": [f"S-{i:04d}" for i in range(N)],
            "site": ["north" if i % 2 else "south" for i in range(N)],
            "manufacturer": [s[0] for s in scanner],
            "model": [s[1] for s in scanner],
            "kernel": [None] * N,
            "time": pa.array(np.where(has_outcome, time, np.nan), pa.float64(), from_pandas=True),
            "event": pa.array(
                [bool(ev) if h else None for ev, h in zip(event, has_outcome, strict=True)]
            ),
            "labels": pa.array(
                [[("phenotype", f"c{c}")] for c in cluster], pa.map_(pa.string(), pa.string())
            ),
            "values": pa.array(
                [[("size", float(c))] for c in cluster], pa.map_(pa.string(), pa.float64())
            ),
        }
    )
    root = tmp_path_factory.mktemp("idx")
    build_snapshot(root, x, meta, model_version="enc-q")
    return load_snapshot(root, device="cpu"), x, centres


def test_neighbours_best_first_with_metadata(cohort) -> None:
    snap, x, _ = cohort
    (res,) = search_similar(snap, x[5], 12)
    assert len(res.neighbors) == 12
    sims = [nb.similarity for nb in res.neighbors]
    assert sims == sorted(sims, reverse=True)
    assert res.neighbors[0].row == 5 and res.neighbors[0].similarity == pytest.approx(1.0)
    assert sum(nb.weight for nb in res.neighbors) == pytest.approx(1.0)
    nb = res.neighbors[3]
    row = snap.metadata.slice(nb.row, 1).to_pylist()[0]
    assert (nb.patient_id, nb.study_uid, nb.site) == (
        row["patient_id"],
        row["study_uid"],
        row["site"],
    )
    assert nb.acquisition == {"manufacturer": row["manufacturer"], "model": row["model"]}
    assert nb.labels == {"phenotype": "c0"} and nb.values == {"size": 0.0}
    assert res.index_version == snap.version and res.model_version == "enc-q"
    p = res.prognosis
    assert p.survival and p.label_distributions["phenotype"][0].label == "c0"
    assert p.n_with_outcome == sum(
        nb.time is not None and nb.event is not None for nb in res.neighbors
    )


def test_exclusions(cohort) -> None:
    snap, x, _ = cohort
    (res,) = search_similar(snap, x[7], 10, exclude_rows=[7])
    assert len(res.neighbors) == 10 and 7 not in [nb.row for nb in res.neighbors]
    pid = snap.metadata.column("patient_id")[7].as_py()
    (res,) = search_similar(snap, x[7], 10, exclude_rows=[7], exclude_patients=[pid])
    assert len(res.neighbors) == 10 and pid not in [nb.patient_id for nb in res.neighbors]


def test_batch_equals_single_queries(cohort) -> None:
    snap, x, _ = cohort
    batch = search_similar(snap, x[[1, 60, 300]], 5, exclude_rows=[1, None, 300])
    for res, i, ex in zip(batch, [1, 60, 300], [1, None, 300], strict=True):
        (single,) = search_similar(snap, x[i], 5, exclude_rows=[ex])
        assert [nb.row for nb in res.neighbors] == [nb.row for nb in single.neighbors]
        assert res.diagnostics.ood_percentile == single.diagnostics.ood_percentile


def test_k_is_clamped_and_validated(cohort) -> None:
    snap, x, _ = cohort
    (res,) = search_similar(snap, x[0], 1000, max_k=1000)
    assert len(res.neighbors) == N
    for k in (0, -1, 1001):
        with pytest.raises(QueryError, match="k must"):
            search_similar(snap, x[0], k)


def test_bad_vectors(cohort) -> None:
    snap, x, _ = cohort
    with pytest.raises(DimensionError, match=r"dimension 16.*expects 32"):
        search_similar(snap, x[0, :16], 5)
    bad = x[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(DimensionError, match="query 1"):
        search_similar(snap, bad, 5)
    with pytest.raises(DimensionError, match="NaN or infinite"):
        search_similar(snap, np.full(D, np.inf), 5)
    with pytest.raises(DimensionError, match="zero"):
        search_similar(snap, np.zeros(D), 5)
    with pytest.raises(QueryError, match="exclude_rows"):
        search_similar(snap, x[:2], 5, exclude_rows=[1])


def test_unnormalised_query_gives_same_answer(cohort) -> None:
    snap, x, _ = cohort
    (a,) = search_similar(snap, x[9], 5)
    (b,) = search_similar(snap, 7.5 * x[9], 5)
    assert [nb.row for nb in a.neighbors] == [nb.row for nb in b.neighbors]


def test_out_of_distribution(cohort) -> None:
    snap, x, centres = cohort
    rng = np.random.default_rng(1)
    far = rng.normal(size=(3, D))
    far -= (far @ centres.T) @ np.linalg.pinv(centres.T)  # orthogonal to every cluster centre
    for res in search_similar(snap, far, 10):
        assert res.diagnostics.ood_percentile >= 0.99
        assert OOD_WARNING in res.diagnostics.warnings
    members = np.arange(0, N, 20)
    results = search_similar(snap, x[members], 10, exclude_rows=list(members))
    pct = np.array([r.diagnostics.ood_percentile for r in results])
    assert pct.max() < 1.0 and np.median(pct) < 0.9
    # members rank uniformly against their own reference: ~90% lie below 0.9, and almost
    # none reach the warning threshold
    every = np.arange(N)
    pct = np.array(
        [
            r.diagnostics.ood_percentile
            for r in search_similar(snap, x, 10, exclude_rows=list(every))
        ]
    )
    assert np.mean(pct < 0.9) >= 0.85 and np.mean(pct >= 0.99) <= 0.02
    fresh = unit(centres[[2, 5]] + 0.08 * rng.normal(size=(2, D)))
    for res in search_similar(snap, fresh, 10):
        assert res.diagnostics.ood_percentile < 0.99
        assert OOD_WARNING not in res.diagnostics.warnings


def test_scanner_diagnostics(cohort) -> None:
    snap, x, _ = cohort
    acme = {"manufacturer": "ACME", "model": "CT-1", "kvp": "120"}
    (res,) = search_similar(snap, x[3], 10, exclude_rows=[3], query_acquisition=[acme])
    d = res.diagnostics
    assert d.same_scanner_share == 1.0
    assert d.cohort_scanner_share == pytest.approx(PER_CLUSTER / N)
    assert any("scanner rather than the anatomy" in w for w in d.warnings)
    (res,) = search_similar(
        snap, x[3], 10, query_acquisition=[{"manufacturer": "Zeta", "model": "Z9"}]
    )
    assert res.diagnostics.cohort_scanner_share == 0.0
    assert any("does not occur in the cohort" in w for w in res.diagnostics.warnings)
    bolt = {"manufacturer": "bolt", "model": "B2"}  # case-insensitive match
    (res,) = search_similar(snap, x[100], 9, query_acquisition=[bolt])
    assert res.diagnostics.same_scanner_share is not None
    assert not any("scanner" in w for w in res.diagnostics.warnings)
    (res,) = search_similar(snap, x[3], 10)
    assert res.diagnostics.same_scanner_share is None


def test_queries_on_a_tiny_index(tmp_path: Path) -> None:
    x = unit(np.random.default_rng(4).normal(size=(3, 8))).astype(np.float32)
    meta = pa.table({"patient_id": ["P-1", "P-2", "P-3"], "study_uid": ["S-1", "S-2", "S-3"]})
    build_snapshot(tmp_path, x, meta, model_version="m")
    snap = load_snapshot(tmp_path, device="cpu")
    (res,) = search_similar(snap, x[0], 10, exclude_rows=[0])
    assert [nb.row for nb in res.neighbors] in ([1, 2], [2, 1])
    assert res.neighbors[0].time is None and res.neighbors[0].labels == {}
    assert res.prognosis.survival == [] and res.prognosis.warnings


def test_temperature_from_the_manifest_and_the_cohort_curve(
    cohort, tmp_path: Path
) -> None:
    snap, x, _ = cohort
    (res,) = search_similar(snap, x[5], 8, exclude_rows=[5])
    assert res.prognosis.temperature == 0.1  # no evaluation stored: the default
    sims = [nb.similarity for nb in res.neighbors]
    np.testing.assert_allclose(
        [nb.weight for nb in res.neighbors], similarity_weights(sims, temperature=0.1)
    )
    meta = snap.metadata
    curve, median, at = cohort_curve(
        meta["time"].to_pylist(), meta["event"].to_pylist(), horizons=(12, 24, 60)
    )
    assert res.prognosis.cohort_survival == curve and res.prognosis.cohort_median == median
    assert res.prognosis.cohort_at_horizons == at
    assert res.prognosis.cohort_survival[0].at_risk == sum(
        t is not None and not np.isnan(t) and ev is not None
        for t, ev in zip(meta["time"].to_pylist(), meta["event"].to_pylist(), strict=True)
    )

    emb = np.stack([snap.vector(i) for i in range(snap.num_studies)])
    build_snapshot(
        tmp_path, emb, meta.drop_columns(["row_id"]), model_version="enc-q",
        extra_manifest={EVALUATION_KEY: {"temperature": 0.02}},
    )
    hot = load_snapshot(tmp_path, device="cpu")
    (res,) = search_similar(hot, x[5], 8, exclude_rows=[5])
    assert res.prognosis.temperature == 0.02
    sims = [nb.similarity for nb in res.neighbors]
    np.testing.assert_allclose(
        [nb.weight for nb in res.neighbors], similarity_weights(sims, temperature=0.02)
    )
    (res,) = search_similar(hot, x[5], 8, exclude_rows=[5], temperature=0.5)  # explicit wins
    assert res.prognosis.temperature == 0.5


def scanner_driven_snapshot(root: Path) -> tuple[Snapshot, np.ndarray, list[str]]:
    """Embeddings dominated by the scanner (a strong direction per scanner), disease weak."""
    rng = np.random.default_rng(5)
    n, d = 240, 16
    scanners = [("ACME", "CT-1"), ("Bolt", "B2"), ("Cora", "C3"), ("Dyna", "D4")]
    which = rng.integers(0, 4, n)
    disease = rng.integers(0, 3, n)
    s_dir = unit(rng.normal(size=(4, d)))
    d_dir = unit(rng.normal(size=(3, d)))
    x = unit(s_dir[which] + 0.25 * d_dir[disease] + 0.15 * rng.normal(size=(n, d)))
    kernels = ["B30f", "B60f", "STANDARD", "LUNG"]
    meta = pa.table(
        {
            "patient_id": [f"P-{i:04d}" for i in range(n)],
            "study_uid": [f"S-{i:04d}" for i in range(n)],
            "manufacturer": [scanners[w][0] for w in which],
            "model": [scanners[w][1] for w in which],
            "kernel": [kernels[w] for w in which],
            "slice_thickness": [["1", "1.25", "2", "2.5"][w] for w in which],
            "time": rng.exponential(20.0, n),
            "event": rng.random(n) < 0.7,
        }
    )
    build_snapshot(root, x.astype(np.float32), meta, model_version="m")
    return load_snapshot(root, device="cpu"), x, [f"{scanners[w][0]}|{kernels[w]}" for w in which]


def test_scanner_driven_cohort_triggers_the_scanner_warning(tmp_path: Path) -> None:
    snap, x, _ = scanner_driven_snapshot(tmp_path)
    row = int(np.flatnonzero(snap.metadata["manufacturer"].to_numpy(zero_copy_only=False) == "Bolt")[0])
    acq = {"manufacturer": "Bolt", "model": "B2", "kernel": "B60f", "slice_thickness": "1.25"}
    (res,) = search_similar(snap, x[row], 10, exclude_rows=[row], query_acquisition=[acq])
    d = res.diagnostics
    assert d.same_scanner_share == 1.0 and d.cohort_scanner_share < 0.35
    assert any("scanner rather than the anatomy" in w for w in d.warnings)
    checks = {c.attribute: c for c in d.acquisition_checks}
    assert set(checks) == {"scanner", "kernel", "slice_thickness"}
    assert checks["kernel"].neighbor_share == 1.0 and checks["kernel"].seen
    assert checks["scanner"].query_value == "Bolt B2"
    assert any("reconstruction kernel (B60f)" in w and "protocol" in w for w in d.warnings)
    assert checks["slice_thickness"].cohort_share == pytest.approx(d.cohort_scanner_share)


def test_unseen_kernel_and_thickness_outside_the_range(tmp_path: Path) -> None:
    snap, x, _ = scanner_driven_snapshot(tmp_path)
    acq = {"manufacturer": "Zeta", "model": "Z9", "kernel": "FC52", "slice_thickness": "5.0"}
    (res,) = search_similar(snap, x[0], 10, exclude_rows=[0], query_acquisition=[acq])
    d = res.diagnostics
    checks = {c.attribute: c for c in d.acquisition_checks}
    assert not checks["scanner"].seen and not checks["kernel"].seen
    assert checks["slice_thickness"].query_value == "5.0" and not checks["slice_thickness"].seen
    assert any("does not occur in the cohort" in w and "Zeta" in w for w in d.warnings)
    assert any("kernel (FC52) does not occur" in w for w in d.warnings)
    assert any("slice thickness (5 mm) lies outside the cohort's range (1-2.5 mm)" in w for w in d.warnings)
    # a thickness inside the range, seen or not, gives no warning
    acq = {"manufacturer": "Zeta", "model": "Z9", "slice_thickness": "1.5"}
    (res,) = search_similar(snap, x[0], 10, exclude_rows=[0], query_acquisition=[acq])
    assert not any("slice thickness" in w for w in res.diagnostics.warnings)


def test_stability_of_neighbours(cohort) -> None:
    snap, x, _ = cohort
    (base,) = search_similar(snap, x[40], 10, exclude_rows=[40])
    near = unit(x[40] + 0.01 * np.random.default_rng(8).normal(size=(3, D)))
    views = search_similar(snap, near, 10, exclude_rows=[40] * 3)
    attach_stability(base, views)
    st = base.diagnostics.stability
    assert st is not None and st.views == 3
    assert st.mean_overlap >= 0.8 and st.min_overlap <= st.mean_overlap
    medians = [v.prognosis.median for v in views if v.prognosis.median is not None]
    assert st.medians_reached == len(medians)
    if medians:
        assert (st.median_min, st.median_max) == (min(medians), max(medians))
    assert not any("perturbations" in w for w in base.diagnostics.warnings)
    far = unit(np.random.default_rng(9).normal(size=(4, D)))
    (base,) = search_similar(snap, x[40], 10, exclude_rows=[40])
    attach_stability(base, search_similar(snap, far, 10))
    assert base.diagnostics.stability.mean_overlap < 0.5
    assert any("perturbations" in w for w in base.diagnostics.warnings)
    (base,) = search_similar(snap, x[40], 10)
    assert attach_stability(base, []).diagnostics.stability is None


def test_thumbnails(cohort, tmp_path: Path) -> None:
    snap, x, _ = cohort
    assert thumbnails(snap, [0, 1]) == [None, None]  # built without thumbnails
    vol = np.full((8, 96, 96), -1000, np.int16)
    vol[4, 20:60, 30:50] = 40
    meta = pa.table(
        {
            "patient_id": ["P-1", "P-2"],
            "study_uid": ["S-1", "S-2"],
            "thumbnail": pa.array([thumbnail_png(vol), None], pa.binary()),
        }
    )
    build_snapshot(tmp_path, x[:2], meta, model_version="m")
    small = load_snapshot(tmp_path, device="cpu")
    png, missing = thumbnails(small, [0, 1])
    assert missing is None and png is not None and png.startswith(b"\x89PNG")
    img = thumbnail_array(png)
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert img[20, 30] > 150 and img[2, 2] == 0  # soft tissue bright, air black
    (res,) = search_similar(small, x[0], 2)
    assert res.neighbors[0].thumbnail is None  # only attached when asked (the server does)
