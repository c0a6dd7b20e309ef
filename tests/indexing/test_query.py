from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import DimensionError, QueryError
from indexing.query import OOD_WARNING, search_similar
from indexing.snapshot import Snapshot, build_snapshot, load_snapshot

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
