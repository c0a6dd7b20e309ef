"""Occlusion explanations point at the planted lesion, not at the background."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.errors import EncoderError
from encoders.explain import occluded_inputs, occlusion_maps
from encoders.model import create_encoder, embed, embedded_regions
from encoders.spec import InputSpec

SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), shape=(8, 32, 32), fit="crop")  # boxes cut from the volume
BOX = (1, 10, 10, 7, 22, 22)  # reader box (z0, y0, x0, z1, y1, x1): a 6 x 12 x 12 lesion box


def lung(seed: int, lesion: tuple[int, int, int] | None) -> np.ndarray:
    """A lung-like volume (-850 HU with noise) with a small solid nodule at ``lesion``."""
    rng = np.random.default_rng(seed)
    v = (-850 + 25 * rng.standard_normal(SPEC.shape)).astype(np.int16)
    if lesion is not None:
        zz, yy, xx = np.mgrid[: SPEC.shape[0], : SPEC.shape[1], : SPEC.shape[2]]
        cz, cy, cx = lesion
        v[((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) <= 2.3**2] = 40
    return v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explanation_highlights_the_planted_lesion(seed: int) -> None:
    torch.manual_seed(seed)
    enc = create_encoder("test_resnet", spec=SPEC, region="lesion", embedding_dim=32).eval()
    # the nodule sits in the box's top-right cell of a 3 x 3 grid (rows 10-14, cols 18-22)
    nodule = (4, 12, 20)
    query = lung(100 + seed, nodule)
    others = np.stack([lung(200 + seed + i, nodule) for i in range(4)])
    nb = embed(enc, others, rois=[BOX] * 4, device="cpu")
    occ = occlusion_maps(enc, query, nb, roi=BOX, grid=(3, 3))
    assert occ.maps.shape == (4, 3, 3)
    for m in occ.maps:
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        assert (r, c) == (0, 2), f"map points at cell {(r, c)}, not the nodule's (0, 2):\n{m}"
        assert m[0, 2] == 1.0 and np.delete(m.ravel(), 2).max() < 0.8
    assert np.all(occ.max_drop > 0)
    # the region shown is the reader's box, on the slice through its centre
    z, box, source = embedded_regions(enc, query[None], rois=[BOX])[0]
    assert (z, box, source) == (4, (10, 10, 22, 22), "reader")


def test_occluded_inputs_blank_one_cell_each() -> None:
    x = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    batch, re, ce = occluded_inputs(x, (2, 3))
    assert batch.shape == (7, 2, 6, 6) and list(re) == [0, 3, 6] and list(ce) == [0, 2, 4, 6]
    np.testing.assert_array_equal(batch[0], x)
    changed = [(b != x).any(axis=0) for b in batch[1:]]
    assert changed[5][3:, 4:].all() and not changed[5][:3].any() and not changed[5][:, :4].any()
    with pytest.raises(EncoderError):
        occluded_inputs(x, (0, 2))
    with pytest.raises(EncoderError, match="neighbour vectors"):
        occlusion_maps(create_encoder("test_resnet", spec=SPEC, embedding_dim=8), lung(0, None), np.zeros((2, 5)))
