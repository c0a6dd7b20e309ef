"""A neighbour's slice of the strongest match with the query (whole-volume encoders).

A whole-volume encoder embeds every slice of a study; a neighbour's stored thumbnail
shows its most representative slice, which need not be the slice that matched the
query. So at index build each study keeps, for a bounded number of its slices
(``MATCH_SLICES``, evenly spaced along z; every slice when the volume has no more), that
slice's own embedding direction (its features through the encoder's neck, L2-normalised:
:func:`encoders.model.slice_projections`) and a small grey PNG of it. At query time the
neighbour's kept slice whose projection agrees best (cosine) with the query's vector is
shown (source ``"matched_slice"``); the query's own side is chosen the same way against
its best neighbour (:func:`service.matched.match_region` for a DICOM query, the stored
projections for a ``study_uid`` query).

Columns of the snapshot metadata (null for lesion encoders, whose region is their box):

- ``match_slices`` ``list<int32>`` (K,): the kept slice indices, ascending;
- ``match_projections`` ``binary``: ``(K, d)`` float32, little-endian, rows unit length
  (float32, not float16: the slices of one study differ in the 4th-5th decimal of their
  cosine for an encoder that has not learnt much, below float16's resolution);
- ``match_thumbnails`` ``list<binary>`` (K,): grey PNG of each kept slice, windowed and
  shrunk as :mod:`indexing.thumbnails` does.

Size per study with the default 64 x 128 x 128 grid, d = 128, K = 16: projections
8 KiB, thumbnails ~16 x 2-3 kB; the metadata (held in memory by a server) grows by about
that much per study (``benchmarks/RESULTS.md``, issue 25 session 9, gives the measured
figure). The PNGs carry no text or header, like every thumbnail.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from indexing.thumbnails import SIZE, WINDOW_HU, Region, thumbnail_png

MATCH_SLICES = 16
SLICES_COLUMN = "match_slices"
PROJECTIONS_COLUMN = "match_projections"
THUMBNAILS_COLUMN = "match_thumbnails"
MATCH_COLUMNS = (SLICES_COLUMN, PROJECTIONS_COLUMN, THUMBNAILS_COLUMN)
MATCH_TYPES = {
    SLICES_COLUMN: pa.list_(pa.int32()),
    PROJECTIONS_COLUMN: pa.binary(),
    THUMBNAILS_COLUMN: pa.list_(pa.binary()),
}


def kept_slices(depth: int, limit: int = MATCH_SLICES) -> np.ndarray:
    """The slice indices kept for matching: all of ``0..depth-1`` when ``depth <= limit``,
    else ``limit`` evenly spaced ones (first and last included), ascending, unique."""
    if depth < 1 or limit < 1:
        raise ValueError(f"depth and limit must be >= 1, got {depth} and {limit}")
    if depth <= limit:
        return np.arange(depth, dtype=np.int64)
    return np.unique(np.linspace(0, depth - 1, limit).round().astype(np.int64))


def match_columns(
    volumes: np.ndarray, projections: np.ndarray | None, *, limit: int = MATCH_SLICES
) -> dict[str, pa.Array]:
    """The three metadata columns for ``volumes`` ``(n, D, H, W)`` HU and their slice
    ``projections`` ``(n, D, d)`` (None: lesion encoders, all null)."""
    n = int(volumes.shape[0])
    if projections is None:
        return {name: pa.nulls(n, typ) for name, typ in MATCH_TYPES.items()}
    if projections.shape[:2] != volumes.shape[:2]:
        raise ValueError(
            f"projections {projections.shape} must give one row per slice of volumes {volumes.shape}"
        )
    keep = kept_slices(int(volumes.shape[1]), limit)
    slices, projs, thumbs = [], [], []
    for vol, proj in zip(volumes, projections, strict=True):
        slices.append([int(z) for z in keep])
        projs.append(np.ascontiguousarray(proj[keep], dtype="<f4").tobytes())
        thumbs.append([thumbnail_png(np.asarray(vol[z : z + 1]), size=SIZE, window=WINDOW_HU) for z in keep])
    return {
        SLICES_COLUMN: pa.array(slices, MATCH_TYPES[SLICES_COLUMN]),
        PROJECTIONS_COLUMN: pa.array(projs, MATCH_TYPES[PROJECTIONS_COLUMN]),
        THUMBNAILS_COLUMN: pa.array(thumbs, MATCH_TYPES[THUMBNAILS_COLUMN]),
    }


def matched_slices(
    metadata: pa.Table,
    rows: Sequence[int],
    vectors: np.ndarray,
    boxes: Sequence[tuple[int, int, int, int] | None],
) -> list[tuple[Region, bytes] | None]:
    """For each of ``rows``, its kept slice that agrees best with the matching row of
    ``vectors`` ``(len(rows), d)`` (or one ``(d,)`` vector for all) and that slice's PNG;
    ``boxes``: each row's whole-slice box (its stored region's). None where the snapshot
    keeps no slices for the row (lesion encoders, indexes built before they were kept)
    or its box is unknown."""
    if not rows or PROJECTIONS_COLUMN not in metadata.column_names:
        return [None] * len(rows)
    take = pa.array(np.asarray(rows, dtype=np.int64))
    zs = metadata.column(SLICES_COLUMN).take(take).to_pylist()
    projs = metadata.column(PROJECTIONS_COLUMN).take(take).to_pylist()
    thumbs = metadata.column(THUMBNAILS_COLUMN).take(take).to_pylist()
    v = np.asarray(vectors, np.float32)
    v = np.broadcast_to(v, (len(rows), v.shape[-1])) if v.ndim == 1 else v
    out: list[tuple[Region, bytes] | None] = []
    for z, raw, pngs, box, target in zip(zs, projs, thumbs, boxes, v, strict=True):
        if z is None or raw is None or pngs is None or box is None:
            out.append(None)
            continue
        p = np.frombuffer(raw, dtype="<f4").reshape(len(z), -1)
        if p.shape[1] != target.shape[0]:
            raise ValueError(f"stored slice projections have d={p.shape[1]}, the vector d={target.shape[0]}")
        best = int(np.argmax(p @ target))  # both unit length: cosine
        out.append((Region(int(z[best]), box, "matched_slice"), bytes(pngs[best])))
    return out


__all__ = [
    "MATCH_COLUMNS",
    "MATCH_SLICES",
    "kept_slices",
    "match_columns",
    "matched_slices",
]
