"""Thumbnails show the region that was embedded: an off-centre lesion appears in them."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.model import create_encoder, embedded_regions
from encoders.spec import InputSpec
from indexing.thumbnails import (
    Region,
    overlay_png,
    region_thumbnail_png,
    thumbnail_array,
    thumbnail_png,
)

SHAPE = (16, 64, 64)
SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=SHAPE, fit="crop")  # boxes cut from the volume


def chest(nodule: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Air, a soft-tissue body, two lungs and one nodule (30 HU, radius 2.5 voxels)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(float)
    v = np.full(SHAPE, -1000.0)
    body = ((y - 32) / 26) ** 2 + ((x - 32) / 30) ** 2 < 1
    v[body] = 40.0
    for cx in (20, 44):
        v[body & (((y - 30) / 16) ** 2 + ((x - cx) / 9) ** 2 < 1)] = -850.0
    nz, ny, nx = nodule
    v[(z - nz) ** 2 + (y - ny) ** 2 + (x - nx) ** 2 <= 2.5**2] = 30.0
    return (v + rng.normal(0, 10, SHAPE)).astype(np.int16)


def _is_red(px: np.ndarray) -> np.ndarray:
    return (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)


def test_a_lesion_off_the_central_slice_is_in_its_thumbnail() -> None:
    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, region="lesion", embedding_dim=16).eval()
    nodule = (3, 25, 40)  # slice 3 of 16 (the central slice is 8), right lung, upper part
    v = chest(nodule)
    (cut,) = embedded_regions(enc, v[None])  # the encoder's own proposal, as at index build
    region = Region.of(cut)
    assert region.source == "proposal" and abs(region.slice_index - nodule[0]) <= 1
    r0, c0, r1, c1 = region.box
    assert r0 < nodule[1] < r1 and c0 < nodule[2] < c1

    shown = thumbnail_array(region_thumbnail_png(v, region))
    central = thumbnail_array(thumbnail_png(v))
    assert shown.shape == (64, 64, 3) and central.shape == (64, 64)
    # the nodule (30 HU -> grey ~190) is in the region thumbnail, not in the central slice
    assert shown[nodule[1], nodule[2]].min() > 150
    assert central[nodule[1], nodule[2]] < 60
    # and the embedded box is drawn around it (red outline on the box's edges only)
    red = _is_red(shown)
    assert red[r0, c0:c1].all() and red[r1 - 1, c0:c1].all()
    assert not red[r0 + 1 : r1 - 1, c0 + 1 : c1 - 1].any()


def test_whole_volume_encoders_show_a_whole_slice_without_a_box() -> None:
    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, embedding_dim=16).eval()
    v = chest((3, 25, 40))
    (cut,) = embedded_regions(enc, v[None])
    z, box, source = cut
    assert source == "best_slice" and 0 <= z < SHAPE[0] and box == (0, 0, 64, 64)
    assert not _is_red(thumbnail_array(region_thumbnail_png(v, Region.of(cut)))).any()


def test_overlay_marks_the_heat_inside_the_box() -> None:
    v = chest((3, 25, 40))
    heat = np.zeros((3, 3), np.float32)
    heat[0, 2] = 1.0
    img = thumbnail_array(overlay_png(v[3], heat, (10, 10, 40, 40), size=64))
    reddish = (img[..., 0].astype(int) - img[..., 1].astype(int)) > 60
    assert reddish[12:18, 32:38].all()  # the hot cell (top right of the box)
    assert not reddish[22:38, 12:28].any()  # a cold cell


def test_proposals_made_once_give_the_same_embeddings_and_regions() -> None:
    from encoders.model import embed, region_rois

    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, region="lesion", embedding_dim=16).eval()
    vols = np.stack([chest((3, 25, 40)), chest((11, 36, 18), seed=1)])
    rois = region_rois(enc, vols)  # what index build does: propose once, reuse twice
    assert rois is not None and len(rois) == 2
    np.testing.assert_allclose(embed(enc, vols, rois=rois), embed(enc, vols), atol=1e-6)
    assert embedded_regions(enc, vols, rois) == embedded_regions(enc, vols)
    assert region_rois(create_encoder("test_resnet", spec=SPEC, embedding_dim=16), vols) is None


def test_whole_volume_match_picks_the_slice_of_the_strongest_match() -> None:
    from encoders.model import embed

    torch.manual_seed(0)
    enc = create_encoder("test_resnet", spec=SPEC, embedding_dim=16).eval()
    v = chest((3, 25, 40))
    for z in (3, 8, 12):
        # a volume made of slice z alone embeds as that slice's own projection
        target = embed(enc, np.repeat(v[z][None], SHAPE[0], axis=0)[None])
        (cut,) = embedded_regions(enc, v[None], match=target)
        assert cut[0] == z and cut[2] == "matched_slice"


LIDC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lidc-idri-0001.tar.xz"


@pytest.fixture(scope="session")
def lidc_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The slices of the real LIDC-IDRI-0001 chest CT, unpacked to a temporary folder."""
    if not LIDC.exists():
        pytest.skip(f"real CT {LIDC} not found (see shared/data/README.md)")
    out = tmp_path_factory.mktemp("lidc")
    with tarfile.open(LIDC, "r:xz") as tar:
        tar.extractall(out, filter="data")
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".xml")


def test_real_ct_nodule_off_the_central_slice_is_in_the_thumbnail(lidc_files: list[Path]) -> None:
    from encoders.dicom import box_to_input_grid, preprocess, read_study

    study = read_study(lidc_files)
    spec = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(84, 96, 96))  # the whole chest
    volume = preprocess(study, spec)
    # the four readers' nodule: pixel (x 316, y 367) at z = -116 mm; slices from -340 mm
    z = round((-116.0 + 340.0) / 2.5)
    box = box_to_input_grid((z - 3, 352, 301, z + 4, 382, 331), study.volume.shape, study.spacing, spec)
    enc = create_encoder("test_resnet", spec=spec, region="lesion", embedding_dim=16).eval()
    (cut,) = embedded_regions(enc, volume[None], rois=[box])
    region = Region.of(cut)
    assert region.source == "reader" and abs(region.slice_index - spec.shape[0] // 2) > 10
    shown = thumbnail_array(region_thumbnail_png(volume, region))
    central = thumbnail_array(thumbnail_png(volume))
    scale = shown.shape[0] / spec.shape[1]  # the 96-voxel slice shrunk to 64 pixels
    cy, cx = (int((box[1] + box[4]) / 2 * scale), int((box[2] + box[5]) / 2 * scale))
    assert shown[cy - 1 : cy + 2, cx - 1 : cx + 2, 1].max() > 180  # the nodule, soft tissue
    assert central[cy - 1 : cy + 2, cx - 1 : cx + 2].max() < 80  # lung on the central slice
    assert _is_red(shown).any()  # its box is drawn
