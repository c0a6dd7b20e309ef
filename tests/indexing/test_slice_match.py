"""Each neighbour shows its slice of the strongest match with the query (whole-volume
encoders), and a detail patch's region is labelled by where the patch came from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_thumbnails import SHAPE, SPEC, chest

from encoders.model import EncoderCard, create_encoder, embed, save_encoder
from indexing.build import embed_shard, embed_store
from indexing.slice_match import MATCH_COLUMNS, kept_slices, matched_slices
from indexing.thumbnails import thumbnail_array


def test_kept_slices_are_bounded_and_cover_the_volume() -> None:
    assert kept_slices(5, 16).tolist() == [0, 1, 2, 3, 4]
    k = kept_slices(64, 16)
    assert len(k) == 16 and k[0] == 0 and k[-1] == 63 and (np.diff(k) > 0).all()
    with pytest.raises(ValueError):
        kept_slices(0)


def _shard(encoder: torch.nn.Module, volumes: np.ndarray) -> pa.Table:
    uids = [f"S-{i}" for i in range(len(volumes))]
    return embed_shard(encoder, uids, volumes, batch_size=2, device="cpu")


def test_a_neighbours_planted_lesion_slice_is_shown_when_the_query_matches_it() -> None:
    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, embedding_dim=16).eval()
    nodule = (3, 25, 40)  # far from the central slice (8)
    vols = np.stack([chest((11, 36, 18), seed=1), chest(nodule, seed=2), chest((6, 30, 22), seed=3)])
    table = _shard(enc, vols)
    assert all(c in table.column_names for c in MATCH_COLUMNS)
    assert table.column("match_slices")[1].as_py() == list(range(SHAPE[0]))  # 16 slices: all kept
    box = tuple(table.column("region_box")[1].as_py())
    # a query that is the neighbour's nodule slice (the slice alone, as a volume)
    query = embed(enc, np.repeat(vols[1, nodule[0]][None], SHAPE[0], axis=0)[None])[0]
    (found,) = matched_slices(table, [1], query, [box])
    assert found is not None
    region, png = found
    assert region.slice_index == nodule[0] and region.source == "matched_slice" and region.box == box
    shown = thumbnail_array(png)
    assert shown[nodule[1], nodule[2]] > 150  # the nodule (30 HU) is in what is shown
    # the stored "most representative" thumbnail is another slice; the central one lacks it
    central = thumbnail_array(table.column("match_thumbnails")[1].as_py()[SHAPE[0] // 2])
    assert central[nodule[1], nodule[2]] < 60
    # other queries are shown other slices of the same neighbour
    for z in (8, 12):
        q = embed(enc, np.repeat(vols[1, z][None], SHAPE[0], axis=0)[None])[0]
        (other,) = matched_slices(table, [1], q, [box])
        assert other is not None and other[0].slice_index == z
    # one vector for several rows; rows without kept slices (lesion encoders) give None
    assert all(m is not None for m in matched_slices(table, [0, 1, 2], query, [box] * 3))
    lesion = create_encoder("test_resnet", spec=SPEC, region="lesion", embedding_dim=16).eval()
    lt = _shard(lesion, vols[:2])
    assert lt.column("match_projections").null_count == 2
    assert matched_slices(lt, [0, 1], query, [box, box]) == [None, None]
    assert matched_slices(pa.table({"x": [1]}), [0], query, [box]) == [None]


def test_projections_are_stored_unit_length_one_row_per_kept_slice() -> None:
    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, embedding_dim=16).eval()
    table = _shard(enc, np.stack([chest((3, 25, 40))]))
    raw = table.column("match_projections")[0].as_py()
    assert len(raw) == SHAPE[0] * 16 * 4
    p = np.frombuffer(raw, dtype="<f4").reshape(SHAPE[0], 16)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)


def test_a_detail_patch_region_is_labelled_by_its_source(tmp_path: Path) -> None:
    from encoders.deid import Pseudonymizer
    from encoders.regions import ReaderRegion
    from encoders.synth import synth_cohort
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore

    info = synth_cohort(tmp_path / "synth", patients=2, seed=4)
    with open(info.truth_csv, newline="") as fh:
        t = next(csv.DictReader(fh))
    c = [int(float(t[k])) for k in ("lesion_slice", "lesion_row", "lesion_col")]
    box = (c[0] - 2, c[1] - 3, c[2] - 3, c[0] + 3, c[1] + 4, c[2] + 4)
    store = CohortStore(tmp_path / "store", create=True)
    ingest_folder(info.dicom_dir, store, pseudonymizer=Pseudonymizer(b"k" * 32), workers=1,
                  regions={t["patient_id"]: [ReaderRegion("r1", box)]})
    torch.manual_seed(0)
    enc = create_encoder("test_resnet", embedding_dim=16, region="lesion")
    save_encoder(enc, EncoderCard.for_encoder(enc, seed=0), tmp_path / "model")
    sources = {}
    for use in ("readers", "proposals"):
        _, table, _ = embed_store(store, tmp_path / "model", device="cpu", patches=use)
        sources[use] = sorted(table.column("region_source").to_pylist())
        assert table.column("match_projections").null_count == table.num_rows
    # the study with a reader's region is shown as the reader's, the other as a proposal
    assert sources["readers"] == ["proposal", "reader"]
    assert sources["proposals"] == ["proposal", "proposal"]
    # a query of the same studies (no regions given) labels its patch the same way
    from encoders.decode_pool import prepare_study
    from encoders.model import load_encoder

    _, card = load_encoder(tmp_path / "model")
    queried = []
    for folder in sorted(info.dicom_dir.iterdir()):
        files = [p.read_bytes() for p in sorted(folder.rglob("*.dcm"))]
        queried.append(prepare_study(files, card.input, patches=True,
                                     proposal=card.region.proposal).patch_source)
    assert sorted(queried) == sources["proposals"]
