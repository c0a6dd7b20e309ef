"""Prognosis, diagnostics and prognostic quality through the API; plots of an answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from indexing.evaluation import EVALUATION_KEY, evaluate_prognosis
from indexing.query import AcquisitionCheck, Stability, search_similar
from indexing.snapshot import build_snapshot, load_snapshot
from indexing.thumbnails import thumbnail_png
from service import convert
from service.background import BackgroundServer
from service.client import CohortsimClient, index_info_from_proto, search_result_from_proto
from service.plots import plot_survival, plot_thumbnails
from service.servicer import scanner_views

from .conftest import MODEL_VERSION, make_cohort


def volume(i: int) -> np.ndarray:
    """A tiny phantom whose lesion size varies with ``i``."""
    yy, xx = np.mgrid[:64, :64]
    v = np.full((8, 64, 64), -1000, np.int16)
    v[:, ((yy - 32) ** 2 / 26**2 + (xx - 32) ** 2 / 20**2) < 1] = 40
    v[:, ((yy - 32) ** 2 / 16**2 + (np.abs(xx - 32) - 9) ** 2 / 7**2) < 1] = -850
    v[:, (yy - 28) ** 2 + (xx - 22) ** 2 < (2 + i % 5) ** 2] = 30
    return v


@pytest.fixture(scope="module")
def evaluated_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict]:
    """The service cohort with reader labels and thumbnails, built with an evaluation."""
    emb, table = make_cohort(seed=5)
    rng = np.random.default_rng(5)
    labels = []
    for row in table["labels"].to_pylist():
        if row is None:
            labels.append(None)
            continue
        hist = dict(row)["histology"]
        other = hist if rng.random() < 0.8 else "adeno"
        labels.append([*row, ("histology@r1", hist), ("histology@r2", other)])
    table = table.set_column(
        table.column_names.index("labels"), "labels",
        pa.array(labels, pa.map_(pa.string(), pa.string())),
    )
    table = table.append_column(
        "thumbnail", pa.array([thumbnail_png(volume(i)) for i in range(table.num_rows)], pa.binary())
    )
    ev = evaluate_prognosis(emb, table)
    root = tmp_path_factory.mktemp("evaluated")
    build_snapshot(root, emb, table, model_version=MODEL_VERSION, extra_manifest={EVALUATION_KEY: ev})
    return root, emb, ev


@pytest.fixture(scope="module")
def evaluated_server(evaluated_index: tuple[Path, np.ndarray, dict]) -> Iterator[BackgroundServer]:
    with BackgroundServer(evaluated_index[0], device="cpu") as srv:
        yield srv


def test_index_info_carries_the_prognostic_quality(
    evaluated_server: BackgroundServer, evaluated_index: tuple[Path, np.ndarray, dict]
) -> None:
    ev = evaluated_index[2]
    with CohortsimClient(evaluated_server.target, timeout=30) as client:
        info = client.index_info()
    q = info.prognostic_quality
    assert q is not None
    assert q.k == ev["k"] and q.temperature == ev["temperature"]
    assert q.c_index == pytest.approx(ev["c_index"])
    assert q.evaluated_study_count == ev["evaluated_studies"] > 0
    assert [c.time for c in q.calibration] == [12.0, 24.0, 60.0]
    g = q.calibration[0].groups[0]
    ref = ev["calibration"][0]["groups"][0]
    assert (g.predicted, g.observed, g.study_count) == pytest.approx(
        (ref["predicted"], ref["observed"], ref["study_count"])
    )
    assert info.to_dict()["prognostic_quality"]["k"] == ev["k"]


def test_search_carries_cohort_curve_readers_and_thumbnails(
    evaluated_server: BackgroundServer, evaluated_index: tuple[Path, np.ndarray, dict]
) -> None:
    _, table = make_cohort(seed=5)
    uid = table["study_uid"][41].as_py()
    with CohortsimClient(evaluated_server.target, timeout=30) as client:
        plain = client.search(study_uid=uid, k=12)
        res = client.search(study_uid=uid, k=12, include_thumbnails=True)
    assert plain.query_thumbnail_png is None and plain.neighbors[0].thumbnail_png is None
    assert res.query_thumbnail_png is not None and res.query_thumbnail_png.startswith(b"\x89PNG")
    assert all(n.thumbnail_png for n in res.neighbors)
    p = res.prognosis
    assert p.temperature == evaluated_index[2]["temperature"]
    assert p.cohort_survival and p.cohort_survival[0].time == 0.0
    assert len(p.cohort_at_horizons) == 3
    dists = {d.name: d for d in p.label_distributions}
    assert {"histology", "histology@r1", "histology@r2"} <= set(dists)
    # "histology" is a plain label here too, so it is not pooled; agreement still reported
    h = dists["histology"]
    assert h.readers == ["r1", "r2"] and h.multi_reader_neighbor_count > 0
    assert 0.0 <= h.reader_agreement <= 1.0
    assert res.to_dict()["query_thumbnail_png"]  # base64 text in JSON


def test_convert_round_trip_of_diagnostics(evaluated_index: tuple[Path, np.ndarray, dict]) -> None:
    root, emb, _ = evaluated_index
    snap = load_snapshot(root, device="cpu")
    (result,) = search_similar(snap, emb[3], 8, exclude_rows=[3])
    result.diagnostics.acquisition_checks.append(AcquisitionCheck("kernel", "B60f", 0.5, 0.1, True))
    result.diagnostics.stability = Stability(4, 0.75, 0.5, 10.0, 14.0, 3)
    back = search_result_from_proto(convert.search_response(result))
    d = back.diagnostics
    assert d.acquisition_checks[0].attribute == "kernel"
    assert d.acquisition_checks[0].neighbor_share == 0.5 and d.acquisition_checks[0].seen_in_cohort
    st = d.stability
    assert st is not None and st.view_count == 4 and st.mean_neighbor_overlap == 0.75
    assert (st.median_survival_min, st.median_survival_max, st.median_reached_count) == (10, 14, 3)
    assert back.prognosis.cohort_median_survival == pytest.approx(result.prognosis.cohort_median)
    result.diagnostics.stability = Stability(4, 1.0, 1.0, None, None, 0)
    st = search_result_from_proto(convert.search_response(result)).diagnostics.stability
    assert st is not None and st.median_survival_min is None
    info = convert.index_info_response(
        snap.info(), max_k=10, dicom_supported=False, prognostic_quality=None
    )
    assert index_info_from_proto(info).prognostic_quality is None


def test_plots_are_written(
    evaluated_server: BackgroundServer, tmp_path: Path
) -> None:
    _, table = make_cohort(seed=5)
    with CohortsimClient(evaluated_server.target, timeout=30) as client:
        res = client.search(study_uid=table["study_uid"][7].as_py(), k=10, include_thumbnails=True)
    km = plot_survival(res, tmp_path / "km.png")
    strip = plot_thumbnails(res, tmp_path / "strip.png")
    for path, min_w in ((km, 600), (strip, 600)):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= min_w
    res.query_thumbnail_png = None
    for n in res.neighbors:
        n.thumbnail_png = None
    with pytest.raises(ValueError, match="no thumbnails"):
        plot_thumbnails(res, tmp_path / "none.png")
    res.prognosis.survival = []  # no outcomes among the neighbours: the cohort curve alone
    with Image.open(io.BytesIO(plot_survival(res, tmp_path / "c.png").read_bytes())) as img:
        assert img.size[0] >= 600


def test_scanner_views_are_seeded_scanner_changes() -> None:
    v = volume(3).astype(np.int16)
    a = scanner_views(v, 3)
    b = scanner_views(v, 3)
    assert a.shape == (3, *v.shape) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # same study, same copies
    assert np.isfinite(a).all()
    assert not np.allclose(a[0], a[1])
    # scanner-like, not anatomical: the mean HU moves by tens, not hundreds
    assert np.all(np.abs(a.mean(axis=(1, 2, 3)) - v.mean()) < 60)


def test_client_keeps_the_cohort_curve_per_index_version_and_content() -> None:
    from service.api import cohortsim_pb2 as pb

    def response(version: str, bump: float = 0.0) -> pb.SearchSimilarResponse:
        resp = pb.SearchSimilarResponse(index_version=version, model_version="m")
        for i in range(20):
            s = 1.0 - i / 40 - (bump if i == 10 else 0.0)
            resp.prognosis.cohort_survival.add(time=float(i), survival=s, lower=s - 0.1,
                                               upper=min(1.0, s + 0.1), at_risk=100 - i)
        return resp

    first = search_result_from_proto(response("v1")).prognosis.cohort_survival
    again = search_result_from_proto(response("v1")).prognosis.cohort_survival
    assert again == first and again is not first  # each answer owns its list
    assert [p.survival for p in first][:2] == [1.0, 0.975]
    other = search_result_from_proto(response("v1", bump=0.01)).prognosis.cohort_survival
    assert other[10].survival == pytest.approx(first[10].survival - 0.01)
    assert search_result_from_proto(response("v2", bump=0.02)).prognosis.cohort_survival[
        10].survival == pytest.approx(first[10].survival - 0.02)
    with pytest.raises(AttributeError):  # frozen: one caller cannot change another's curve
        first[0].survival = 0.5  # type: ignore[misc]
