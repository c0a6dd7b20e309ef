"""Why two studies were judged similar: occlusion of the query's embedded region.

The encoder's input for the query (what :meth:`StudyEncoder.regions` cuts: the lesion box,
or the whole volume) is divided in-plane into a coarse ``rows x cols`` grid of cells. One
copy of the input per cell has that cell (all slices) replaced by the input's median HU,
its local background (inside a lung box that is lung, so blanking background changes
little and blanking a lesion removes it). The unoccluded input and all copies go through
the served encoder in **one batch**, and for each neighbour j and cell c

    drop[c, j] = cos(e, n_j) - cos(e_c, n_j)

(``e``: the query's embedding, ``e_c``: the embedding with cell c blanked, ``n_j``: the
neighbour's stored vector). A large drop means that part of the query's region carried the
similarity to that neighbour. Maps are clipped at 0 and scaled to a maximum of 1 per
neighbour (all 0 when no cell lowers the similarity); the raw maximum is kept.

Cost: ``1 + rows * cols`` encoder inputs in one forward, shared by all k neighbours.
Measured (``benchmarks/bench_explain.py``, ``benchmarks/RESULTS.md``) against one embedding
of the query on CPU: about 1.1x for a lesion encoder with the 3 x 3 grid (its inputs are
small boxes), about 2x for a whole-volume encoder with 2 x 2 and 6x with 3 x 3, hence the
default grid per encoder kind (:func:`default_grid`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from encoders.errors import EncoderError
from encoders.model import StudyEncoder

DEFAULT_GRID = (3, 3)  # lesion encoders: 1 + 9 small inputs
WHOLE_VOLUME_GRID = (2, 2)  # whole-volume encoders: 1 + 4 full volumes (cost, see below)


@dataclass
class Occlusion:
    """Occlusion maps of one query against ``k`` neighbours.

    ``maps`` ``(k, rows, cols)`` float32 in [0, 1] (each neighbour's drops scaled by its
    largest); ``max_drop`` ``(k,)`` the largest raw drop in cosine similarity;
    ``similarity`` ``(k,)`` cosine of the unoccluded query to each neighbour; ``cells``
    the cell edges along rows and columns of the encoder's input (voxels of its grid).
    """

    maps: np.ndarray
    max_drop: np.ndarray
    similarity: np.ndarray
    row_edges: np.ndarray
    col_edges: np.ndarray


def _edges(n: int, parts: int) -> np.ndarray:
    return np.linspace(0, n, parts + 1).round().astype(int)


def occluded_inputs(x: np.ndarray, grid: Sequence[int] = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(D, H, W)`` encoder input -> ``(1 + rows * cols, D, H, W)`` float32: the input
    followed by one copy per cell (row-major) with that cell set to the input's median; and
    the row and column edges of the cells."""
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise EncoderError(f"the occlusion grid must be at least 1 x 1, got {tuple(grid)}")
    _, h, w = x.shape
    if rows > h or cols > w:
        raise EncoderError(f"an occlusion grid of {rows} x {cols} does not fit an input of {h} x {w}")
    re, ce = _edges(h, rows), _edges(w, cols)
    fill = float(np.median(x))
    out = np.repeat(np.asarray(x, np.float32)[None], 1 + rows * cols, axis=0)
    for r in range(rows):
        for c in range(cols):
            out[1 + r * cols + c, :, re[r] : re[r + 1], ce[c] : ce[c + 1]] = fill
    return out, re, ce


def default_grid(encoder: StudyEncoder) -> tuple[int, int]:
    """3 x 3 for lesion encoders, 2 x 2 for whole-volume ones (cost within ~3x one embedding)."""
    return DEFAULT_GRID if encoder.region.mode == "lesion" else WHOLE_VOLUME_GRID


def encoder_forward(
    encoder: StudyEncoder, inputs: np.ndarray, *, device: str | torch.device = "cpu"
) -> np.ndarray:
    """``(m, D', H', W')`` encoder inputs (already cut, as :meth:`StudyEncoder.regions`
    returns them) -> ``(m, d)`` float32 embeddings, one batch, no gradients."""
    with torch.no_grad():
        e = encoder(torch.as_tensor(np.asarray(inputs, np.float32), device=torch.device(device)))
    return e.float().cpu().numpy()


def occlusion_maps(
    encoder: StudyEncoder,
    volume: np.ndarray,
    neighbours: np.ndarray,
    *,
    roi: Any = None,
    grid: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    forward: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Occlusion:
    """Occlusion maps (module docstring) of the query ``volume`` ``(D, H, W)`` HU (the
    preprocessed study, as embedded) against ``neighbours`` ``(k, d)`` vectors; ``roi``
    the query's region of interest for lesion encoders (None: the encoder's proposal).
    ``forward``: ``(m, D', H', W')`` encoder inputs -> ``(m, d)`` embeddings (a server
    passes its serialised forward); by default :func:`encoder_forward` on ``device``.
    ``grid``: ``(rows, cols)``; None takes :func:`default_grid`."""
    nb = np.asarray(neighbours, dtype=np.float32)
    if nb.ndim != 2 or nb.shape[1] != encoder.embedding_dim:
        raise EncoderError(
            f"neighbour vectors must be (k, {encoder.embedding_dim}), got shape {nb.shape}"
        )
    x = encoder.regions(np.asarray(volume)[None], rois=[roi] if roi is not None else None)[0]
    batch, re, ce = occluded_inputs(np.asarray(x, np.float32), grid or default_grid(encoder))
    e = np.asarray(
        encoder_forward(encoder, batch, device=device) if forward is None else forward(batch),
        dtype=np.float32,
    )
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    n = nb / np.maximum(np.linalg.norm(nb, axis=1, keepdims=True), 1e-12)
    sims = e @ n.T  # (1 + cells, k)
    drop = np.clip(sims[0][None, :] - sims[1:], 0.0, None)  # (cells, k)
    top = drop.max(axis=0)
    scaled = np.where(top > 0, drop / np.where(top > 0, top, 1.0), 0.0)
    rows, cols = len(re) - 1, len(ce) - 1
    maps = scaled.T.reshape(nb.shape[0], rows, cols).astype(np.float32)
    return Occlusion(maps, top.astype(np.float32), sims[0].astype(np.float32), re, ce)


__all__ = [
    "DEFAULT_GRID",
    "WHOLE_VOLUME_GRID",
    "Occlusion",
    "default_grid",
    "encoder_forward",
    "occluded_inputs",
    "occlusion_maps",
]
