"""The matched regions of an answer, shown: thumbnails of the query's and each neighbour's
slice of the strongest match (whole-volume encoders) or embedded box (lesion encoders),
and per-neighbour explanations (occlusion of the query's region), for DICOM queries.

Both need the query's preprocessed volume (``EmbeddedStudy.volume``, kept by
``ServiceState.embed_dicom(keep_volume=True)``) and the served encoder; the encoder runs
through the state's one-forward-at-a-time embed queue like every embedding. The maths is
in :mod:`encoders.explain` and :func:`encoders.model.embedded_regions`; the pictures in
:mod:`indexing.thumbnails`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from indexing.query import Explanation, QueryResult, regions, thumbnails
from indexing.slice_match import matched_slices
from indexing.snapshot import Snapshot
from indexing.thumbnails import Region

if TYPE_CHECKING:
    from service.servicer import EmbeddedStudy, ServiceState


def occlusion(
    state: ServiceState, embedded: EmbeddedStudy, neighbours: np.ndarray, snapshot: Snapshot | None = None
) -> Any:
    """Occlusion maps (:func:`encoders.explain.occlusion_maps`) of an embedded DICOM study
    against ``neighbours`` ``(k, d)``; blocking."""
    from encoders.explain import encoder_forward, occlusion_maps

    encoder, _ = state.encoder(snapshot)
    if embedded.volume is None:
        raise ValueError("the study's volume was not kept (embed_dicom(keep_volume=True))")

    def forward(inputs: np.ndarray) -> np.ndarray:
        def run(enc: Any, batch: np.ndarray) -> np.ndarray:
            return encoder_forward(enc, batch, device=state.device)

        return state.embedder.embed(encoder, inputs, run, shareable=False)

    return occlusion_maps(encoder, embedded.volume, neighbours, roi=embedded.roi, forward=forward)


def match_region(
    state: ServiceState, embedded: EmbeddedStudy, target: np.ndarray, snapshot: Snapshot | None = None
) -> tuple[Region, bytes] | None:
    """Whole-volume encoders: the query's slice that matches ``target`` ``(d,)`` (the best
    neighbour's vector) most, and its thumbnail; None for lesion encoders (their region is
    the box) or without the kept volume."""
    from encoders.model import embedded_regions
    from indexing.thumbnails import region_thumbnail_png

    encoder, _ = state.encoder(snapshot)
    if encoder.region.mode == "lesion" or embedded.volume is None:
        return None
    cut = embedded_regions(encoder, embedded.volume[None], device=state.device, match=target[None])
    region = Region.of(cut[0])
    return region, region_thumbnail_png(embedded.volume, region)


def attach_thumbnails(
    state: ServiceState,
    snapshot: Snapshot,
    result: QueryResult,
    vector: np.ndarray,
    *,
    embedded: EmbeddedStudy | None = None,
    query_row: int | None = None,
) -> None:
    """Set the answer's thumbnails and embedded regions: each neighbour's stored region
    (lesion encoders: the box the encoder cut) or, for whole-volume encoders, its kept
    slice that matches the query's ``vector`` ``(d,)`` best (:mod:`indexing.slice_match`);
    the query's own (a DICOM query's ``embedded`` study, or the stored ``query_row``)
    the same way against its best neighbour. An index built without the kept slices
    shows each neighbour's most representative slice, as stored."""
    rows = [nb.row for nb in result.neighbors]
    meta = snapshot.metadata
    q_png: bytes | None = None
    q_region: Region | None = None
    if embedded is not None:
        q_png, q_region = embedded.thumbnail, embedded.region
        if rows:
            found = match_region(state, embedded, snapshot.vector(rows[0]), snapshot)
            if found is not None:
                q_region, q_png = found
    elif query_row is not None:
        q_png, q_region = thumbnails(snapshot, [query_row])[0], regions(snapshot, [query_row])[0]
        if rows and q_region is not None:
            (found,) = matched_slices(meta, [query_row], snapshot.vector(rows[0]), [q_region.box])
            if found is not None:
                q_region, q_png = found
    result.query_thumbnail, result.query_region = q_png, q_region
    stored = regions(snapshot, rows)
    matched = matched_slices(meta, rows, vector, [None if r is None else r.box for r in stored])
    for nb, png, cut, m in zip(result.neighbors, thumbnails(snapshot, rows), stored, matched, strict=True):
        nb.region, nb.thumbnail = (cut, png) if m is None else m


def attach_explanations(
    state: ServiceState, snapshot: Snapshot, embedded: EmbeddedStudy, result: QueryResult
) -> None:
    """Set each neighbour's :class:`indexing.query.Explanation` (occlusion over the query's
    region, one batched forward for all neighbours) with its overlay on the query's slice."""
    from indexing.thumbnails import overlay_png

    vectors = np.stack([snapshot.vector(nb.row) for nb in result.neighbors])
    occ = occlusion(state, embedded, vectors, snapshot)
    region, volume = embedded.region, embedded.volume
    if region is None or volume is None:
        raise ValueError("explanations need the study embedded with thumbnail=True, keep_volume=True")
    sl = volume[min(max(region.slice_index, 0), volume.shape[0] - 1)]
    for nb, m, sim in zip(result.neighbors, occ.maps, occ.similarity, strict=True):
        nb.explanation = Explanation(
            rows=int(m.shape[0]), cols=int(m.shape[1]), weights=[float(v) for v in m.ravel()],
            overlay_png=overlay_png(sl, m, region.box), similarity=float(sim),
        )


__all__ = ["attach_explanations", "attach_thumbnails", "match_region", "occlusion"]
