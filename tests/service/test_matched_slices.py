"""Served answers of a whole-volume index show each neighbour's slice of the strongest
match with the query (gRPC ``include_thumbnails``, the client and the thumbnail plot)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from encoders.deid import Pseudonymizer
from encoders.model import EncoderCard, create_encoder, save_encoder
from encoders.synth import synth_cohort
from indexing.build import build_from_store
from indexing.ingest import ingest_folder
from indexing.slice_match import matched_slices
from indexing.snapshot import load_snapshot
from indexing.store import CohortStore
from service.background import BackgroundServer
from service.client import CohortsimClient


@pytest.fixture(scope="module")
def whole_index(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three synthetic studies ingested, a tiny whole-volume encoder, an index built from
    the store (so it keeps the matching slices)."""
    root = tmp_path_factory.mktemp("matched")
    info = synth_cohort(root / "synth", patients=3, seed=2)
    store = CohortStore(root / "store", create=True)
    ingest_folder(info.dicom_dir, store, pseudonymizer=Pseudonymizer(b"m" * 32), workers=1)
    enc = create_encoder("test_resnet", embedding_dim=16)
    save_encoder(enc, EncoderCard.for_encoder(enc, seed=0), root / "model")
    build_from_store(root / "store", root / "model", root / "index", device="cpu")
    files = sorted(next(iter(sorted(info.dicom_dir.iterdir()))).rglob("*.dcm"))
    return {"root": root, "index": root / "index", "files": files}


@pytest.fixture(scope="module")
def server(whole_index: dict) -> Iterator[BackgroundServer]:
    with BackgroundServer(whole_index["index"], device="cpu") as srv:
        yield srv


def test_neighbours_show_their_slice_of_the_strongest_match(server: BackgroundServer, whole_index: dict) -> None:
    snap = load_snapshot(whole_index["index"], device="cpu")
    meta = snap.metadata
    uid = meta.column("study_uid")[1].as_py()
    with CohortsimClient(server.target, timeout=120) as client:
        by_uid = client.search(study_uid=uid, k=2, include_thumbnails=True)
        by_dicom = client.search(dicom_paths=whole_index["files"], k=3, include_thumbnails=True)
        plain = client.search(study_uid=uid, k=2)
    assert all(n.thumbnail_png is None and n.region is None for n in plain.neighbors)
    query = snap.vector(1)
    for res, vector in ((by_uid, query), (by_dicom, None)):
        assert res.neighbors
        q = res.query_region
        assert q is not None and q.source == "matched_slice"
        assert res.query_thumbnail_png is not None and res.query_thumbnail_png.startswith(b"\x89PNG")
        for nb in res.neighbors:
            row = snap.row_of_study(nb.study_uid)
            r = nb.region
            assert r is not None and r.source == "matched_slice" and r.box[:2] == (0, 0)
            kept = meta.column("match_slices")[row].as_py()
            # the PNG shown is the stored picture of the slice named
            pngs = meta.column("match_thumbnails")[row].as_py()
            assert nb.thumbnail_png == pngs[kept.index(r.slice_index)]
            if vector is not None:  # the same choice as the in-process one for this query
                (want,) = matched_slices(meta, [row], vector, [tuple(r.box)])
                assert want is not None and want[0].slice_index == r.slice_index
    # the query study's own picture (study_uid query) is its slice matching the best neighbour
    best = snap.row_of_study(by_uid.neighbors[0].study_uid)
    (own,) = matched_slices(meta, [1], snap.vector(best), [tuple(by_uid.query_region.box)])
    assert own is not None and own[0].slice_index == by_uid.query_region.slice_index
    # the thumbnail strip draws them
    from service.plots import plot_thumbnails

    out = plot_thumbnails(by_dicom, whole_index["root"] / "strip.png")
    assert out.stat().st_size > 0
    # bounded: at most 16 slices kept per study, projections float32
    for row in range(snap.num_studies):
        kept = meta.column("match_slices")[row].as_py()
        assert 1 <= len(kept) <= 16
        assert len(meta.column("match_projections")[row].as_py()) == len(kept) * 16 * 4
