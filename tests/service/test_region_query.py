"""Regions of interest in DICOM queries: several observers' boxes, the prognosis
of each and their spread; the box mapping from a study's voxel grid to the encoder's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from encoders.dicom import Study, box_to_input_grid, preprocess, read_study
from encoders.errors import DicomError
from encoders.grid import context_grid, study_input
from encoders.model import EncoderCard, create_encoder, embed, save_encoder
from encoders.spec import DEFAULT_SPEC, InputSpec
from encoders.synth import synth_cohort
from indexing.snapshot import build_snapshot
from service.api import cohortsim_pb2
from service.background import BackgroundServer
from service.cli import _parse_region
from service.client import CohortsimClient, CohortsimClientError
from service.convert import MAX_REGIONS, parse_regions
from service.errors import ServiceError

from .conftest import make_cohort

DIM = 16
BOX_A = (16.0, 40.0, 30.0, 24.0, 52.0, 42.0)  # on the synthetic study's (40, 96, 96) grid
BOX_B = (16.0, 50.0, 60.0, 24.0, 62.0, 72.0)


# ------------------------------------------------------------------ box mapping (no server)
LEGACY = InputSpec(shape=(32, 128, 128), fit="crop")


@pytest.mark.parametrize("spec", [DEFAULT_SPEC, LEGACY], ids=["whole-study", "legacy-crop"])
@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 150, 150), (2.5, 0.8, 0.8)), ((12, 50, 70), (5.0, 3.0, 4.0)), ((30, 64, 64), (4.0, 4.0, 4.0))],
)
def test_box_maps_onto_the_preprocessed_grid(shape: tuple[int, int, int], spacing: tuple[float, ...],
                                             spec: InputSpec) -> None:
    """A bright block drawn on the study's own grid lands inside the mapped box, centred."""
    vol = np.full(shape, -1000.0, np.float32)
    lo = [n // 2 - max(2, n // 8) for n in shape]
    hi = [n // 2 + max(2, n // 8) + (1 if i == 2 else 0) for i, n in enumerate(shape)]
    lo[1] -= shape[1] // 8  # off-centre in y, so an offset error would show
    hi[1] -= shape[1] // 8
    vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 400.0
    study = Study("1.2", "p", "1.2.3", "CT", vol, spacing, units="HU")
    out = preprocess(study, spec).astype(np.float32)
    box = box_to_input_grid((*lo, *hi), shape, spacing, spec)
    bright = np.argwhere(out > 0)
    assert len(bright)
    centre = bright.mean(axis=0)
    mapped_centre = [(a + b) / 2 - 0.5 for a, b in zip(box[:3], box[3:], strict=True)]
    np.testing.assert_allclose(centre, mapped_centre, atol=0.75)
    # the mapped extent is the physical extent on the grid (per study on the whole-study one)
    grid = context_grid(shape, spacing, spec).spacing_mm if spec.has_patches else spec.spacing_mm
    for a, b, lo_, hi_, s, t in zip(box[:3], box[3:], lo, hi, spacing, grid, strict=True):
        assert b - a == pytest.approx((hi_ - lo_) * s / t, rel=0.12)


def test_box_mapping_rejects_bad_boxes() -> None:
    for bad in [(0, 0, 0, 1, 1), (0, 0, 0, 0, 5, 5), (0, 0, float("nan"), 4, 4, 4), (50, 0, 0, 60, 4, 4)]:
        with pytest.raises(DicomError) as e:
            box_to_input_grid(bad, (40, 96, 96), (2.5, 3.75, 3.75), DEFAULT_SPEC)
        assert e.value.reason == "bad_region"


def test_parse_regions_validates() -> None:
    req = cohortsim_pb2.DicomStudy()
    req.regions.add(observer="  reader1 ", box=list(BOX_A))
    req.regions.add(box=list(BOX_B))
    assert parse_regions(req.regions) == [("reader1", BOX_A), ("region 2", BOX_B)]
    for box in ([1, 2, 3], [0, 0, 0, 1, 1, float("inf")], [5, 0, 0, 5, 4, 4]):
        bad = cohortsim_pb2.DicomStudy()
        bad.regions.add(observer="r", box=box)
        with pytest.raises(ServiceError) as e:
            parse_regions(bad.regions)
        assert e.value.reason == "INVALID_REGION"
    many = cohortsim_pb2.DicomStudy()
    for _ in range(MAX_REGIONS + 1):
        many.regions.add(box=list(BOX_A))
    with pytest.raises(ServiceError, match="at most"):
        parse_regions(many.regions)


def test_cli_region_syntax() -> None:
    assert _parse_region("dr. x:1,2,3,4,5,6") == ("dr. x", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    from service.cli import CliError

    for bad in ("1,2,3,4,5,6", "r:1,2,3", "r:a,b,c,d,e,f", ":1,2,3,4,5,6"):
        with pytest.raises(CliError):
            _parse_region(bad)


# ------------------------------------------------------------------ through gRPC
@pytest.fixture(scope="module")
def region_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One synthetic study; a lesion encoder; an index holding random rows plus the study's
    embeddings for box A (row 0) and box B (row 1); and an index with a whole-volume encoder."""
    root = tmp_path_factory.mktemp("regions")
    synth_cohort(root / "synth", patients=1, seed=1)
    files = sorted((root / "synth" / "dicom").rglob("*.dcm"))
    study = read_study(files)
    enc = create_encoder("test_resnet", embedding_dim=DIM, region="lesion")
    card = save_encoder(enc, EncoderCard.for_encoder(enc, seed=0), root / "lesion-model")
    # each box's detail patch, cut from the full-resolution study (as the servicer does)
    patches = study_input(study, card.input, regions=[BOX_A, BOX_B], proposals=False).patches
    own = embed(enc, patches)
    emb, table = make_cohort(seed=5)
    emb = np.ascontiguousarray(emb[:40, :DIM])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0], emb[1] = own[0], own[1]
    table = table.slice(0, 40)
    build_snapshot(root / "index", emb, table, model_version=card.version, encoder_dir=root / "lesion-model")
    whole = create_encoder("test_resnet", embedding_dim=DIM)
    wcard = save_encoder(whole, EncoderCard.for_encoder(whole, seed=0), root / "whole-model")
    build_snapshot(root / "whole-index", emb, table, model_version=wcard.version, encoder_dir=root / "whole-model")
    return {"files": files, "root": root, "uids": table.column("study_uid").to_pylist(), "own": own}


@pytest.fixture(scope="module")
def lesion_server(region_setup: dict) -> Iterator[BackgroundServer]:
    with BackgroundServer(region_setup["root"] / "index", device="cpu") as srv:
        yield srv


def test_each_region_is_embedded_searched_and_reported(
    lesion_server: BackgroundServer, region_setup: dict
) -> None:
    uids = region_setup["uids"]
    assert float(region_setup["own"][0] @ region_setup["own"][1]) < 0.9999  # the boxes differ
    with CohortsimClient(lesion_server.target, timeout=120) as client:
        res = client.search(
            dicom_paths=region_setup["files"], k=1, regions=[("reader1", BOX_A), ("reader2", BOX_B)]
        )
        swapped = client.search(
            dicom_paths=region_setup["files"], k=1, regions=[("reader2", BOX_B), ("reader1", BOX_A)]
        )
        plain = client.search(dicom_paths=region_setup["files"], k=3)
    # the answer is the first region's: its own embedding is row 0 (box A), then row 1
    assert res.neighbors[0].study_uid == uids[0]
    assert res.neighbors[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert swapped.neighbors[0].study_uid == uids[1]
    d = res.diagnostics
    assert [r.observer for r in d.regions] == ["reader1", "reader2"]
    assert d.regions[0].neighbor_overlap == 1.0
    assert d.regions[1].neighbor_overlap == 0.0  # k=1: each region finds its own row
    assert d.region_spread is not None and d.region_spread.view_count == 1
    assert d.region_spread.mean_neighbor_overlap == 0.0
    assert any("regions of interest" in w for w in d.warnings)
    assert len(d.regions[0].at_horizons) == len(res.prognosis.at_horizons)
    # the CLI report shows each region's prognosis and the warning
    from rich.console import Console

    from service.cli import print_result

    console = Console(record=True, width=200)
    print_result(res, console)
    text = console.export_text()
    assert "region of reader1" in text and "region of reader2" in text
    assert "0% of the first region's neighbours" in text
    # a query without regions has none in its answer
    assert plain.diagnostics.regions == [] and plain.diagnostics.region_spread is None


def test_region_errors_are_specific(lesion_server: BackgroundServer, region_setup: dict) -> None:
    with CohortsimClient(lesion_server.target, timeout=120) as client:
        # the whole study is kept: a region at its first slices is embedded, not refused
        edge = client.search(dicom_paths=region_setup["files"], k=1,
                             regions=[("r", (0, 40, 40, 2, 50, 50))])
        assert [r.observer for r in edge.diagnostics.regions] == ["r"]
        with pytest.raises(CohortsimClientError) as e:
            client.search(dicom_paths=region_setup["files"], regions=[("r", (10, 40, 200, 20, 50, 300))])
        assert e.value.reason == "DICOM_BAD_REGION"
    with (
        BackgroundServer(region_setup["root"] / "whole-index", device="cpu") as srv,
        CohortsimClient(srv.target, timeout=120) as client,
        pytest.raises(CohortsimClientError) as e,
    ):
        client.search(dicom_paths=region_setup["files"], regions=[("r", BOX_A)])
    assert e.value.code == "FAILED_PRECONDITION"
    assert e.value.reason == "REGIONS_UNSUPPORTED"


def test_client_refuses_regions_without_dicom(tmp_path: Path) -> None:
    from service.client import build_search_request

    with pytest.raises(ValueError, match="DICOM"):
        build_search_request(study_uid="S-1", regions=[("r", BOX_A)])


def test_thumbnails_show_the_region_and_explanations_come_per_neighbour(
    lesion_server: BackgroundServer, region_setup: dict
) -> None:
    with CohortsimClient(lesion_server.target, timeout=120) as client:
        res = client.search(
            dicom_paths=region_setup["files"], k=3, regions=[("reader1", BOX_A)],
            include_thumbnails=True, include_explanations=True,
        )
        plain = client.search(dicom_paths=region_setup["files"], k=3)
        with pytest.raises(CohortsimClientError) as e:
            client.search(study_uid=region_setup["uids"][5], k=3, include_explanations=True)
    assert e.value.reason == "EXPLANATIONS_NEED_DICOM"
    # the query's thumbnail is the slice through the reader's box, with the box drawn
    q = res.query_region
    assert q is not None and q.source == "reader"
    assert q.box[2] - q.box[0] > 0 and q.box[3] - q.box[1] > 0
    assert res.query_thumbnail_png is not None and res.query_thumbnail_png.startswith(b"\x89PNG")
    for nb in res.neighbors:
        ex = nb.explanation
        assert ex is not None and (ex.rows, ex.cols) == (3, 3) and len(ex.weights) == 9
        assert max(ex.weights) in (0.0, 1.0) and min(ex.weights) >= 0.0
        assert ex.overlay_png is not None and ex.overlay_png.startswith(b"\x89PNG")
        assert len(ex.grid()) == 3
    # the recomputed similarity is the served one (row 0 holds the box-A embedding itself)
    assert res.neighbors[0].explanation.similarity == pytest.approx(res.neighbors[0].similarity, abs=1e-3)
    assert all(nb.explanation is None for nb in plain.neighbors) and plain.query_region is None
    # the figures: overlays per neighbour, thumbnails of the regions
    from service.plots import plot_explanations, plot_thumbnails

    out = region_setup["root"] / "figs"
    out.mkdir(exist_ok=True)
    assert plot_explanations(res, out / "why.png").stat().st_size > 0
    assert plot_thumbnails(res, out / "strip.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no explanations"):
        plot_explanations(plain, out / "none.png")


def test_whole_volume_query_thumbnail_is_the_slice_of_the_strongest_match(region_setup: dict) -> None:
    with BackgroundServer(region_setup["root"] / "whole-index", device="cpu") as srv, CohortsimClient(
        srv.target, timeout=120
    ) as client:
        res = client.search(dicom_paths=region_setup["files"], k=3, include_thumbnails=True)
    q = res.query_region
    assert q is not None and q.source == "matched_slice" and q.box[:2] == (0, 0)
    assert res.query_thumbnail_png is not None and res.query_thumbnail_png.startswith(b"\x89PNG")
