"""New studies of the store into the served index without a full rebuild.

:func:`publish_new_studies` embeds the studies that the store holds and the current index
version lacks, with the index's own encoder (the copy in the snapshot, so the vectors
match the served ones), and publishes a new version: the previous version's vectors are
reused as they are, the new ones are added to a copy of its FAISS index (no training),
and running servers pick the version up as after any build (``ServiceState.refresh``).

Approximate kinds that train (IVF, PQ) were trained on the vectors of their last full
build; once the studies added since exceed ``rebuild_threshold`` times that number, the
index is trained again on all vectors (still without re-embedding). HNSW and Flat never
need training: they always take the incremental add.

One publisher at a time per index folder (an flock on ``INDEX_DIR/.incremental.lock``);
the others wait. Outcomes of the previous rows are those of the previous version (an
outcome update is ``cohortsim outcomes``); the prognostic evaluation is carried over.
"""

from __future__ import annotations

import fcntl
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from encoders.model import load_encoder
from encoders.spec import InputSpec
from indexing.build import embed_shard
from indexing.durable import opened_for_lock
from indexing.errors import ModelVersionError, SnapshotError
from indexing.slice_match import MATCH_COLUMNS
from indexing.snapshot import (
    BUILD_MANIFEST_KEYS,
    INDEX_FILE,
    VERSIONS_DIR,
    build_snapshot,
    load_snapshot,
)
from indexing.store import CohortStore
from indexing.thumbnails import COLUMN as THUMBNAIL_COLUMN
from indexing.thumbnails import REGION_COLUMNS

log = logging.getLogger(__name__)

INCREMENTAL_KEY = "incremental"  # manifest: {"trained_on": n, "added_since_training": m}
DEFAULT_REBUILD_THRESHOLD = 0.5
LOCK_FILE = ".incremental.lock"


@dataclass
class PublishResult:
    """What :func:`publish_new_studies` published."""

    version: str
    added: int
    num_studies: int
    retrained: bool


def _new_volumes(
    store: CohortStore, wanted: set[str], batch_size: int, patches: str | None
) -> tuple[list[str], np.ndarray]:
    """The volumes of ``wanted`` studies, in store order: ``(uids, (m, D, H, W) int16)``;
    with ``patches``, each study's primary detail patch (``CohortStore.iter_volumes``)."""
    uids: list[str] = []
    vols: list[np.ndarray] = []
    for batch_uids, batch in store.iter_volumes(batch_size=batch_size, patches=patches):
        for uid, vol in zip(batch_uids, batch, strict=True):
            if uid in wanted:
                uids.append(uid)
                vols.append(np.array(vol))
    return uids, np.stack(vols) if vols else np.zeros((0,), np.int16)


def _rows_for(store: CohortStore, uids: list[str], like: pa.Table) -> pa.Table:
    """The cohort rows of ``uids`` (in that order) with ``like``'s columns and types."""
    table = store.cohort_table()
    order = {u: i for i, u in enumerate(table.column("study_uid").to_pylist())}
    rows = table.take(pa.array([order[u] for u in uids], pa.int64()))
    columns = {}
    for f in like.schema:
        if f.name in rows.column_names:
            columns[f.name] = rows.column(f.name).cast(f.type)
        else:
            columns[f.name] = pa.nulls(rows.num_rows, f.type)
    return pa.table(columns, schema=like.schema)


def publish_new_studies(
    store: CohortStore,
    index_dir: Path,
    *,
    rebuild_threshold: float = DEFAULT_REBUILD_THRESHOLD,
    device: str = "cpu",
    batch_size: int = 8,
) -> PublishResult | None:
    """Embed the store's studies that the current version lacks and publish them.

    Returns None when there is nothing new. Raises :class:`SnapshotError` when the index
    has no encoder (built from embeddings) and :class:`ModelVersionError` when the
    store's volumes were resampled differently from what the encoder expects.
    """
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    with opened_for_lock(index_dir / LOCK_FILE) as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            return _publish(store, index_dir, rebuild_threshold, device, batch_size)
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _publish(
    store: CohortStore, index_dir: Path, rebuild_threshold: float, device: str, batch_size: int
) -> PublishResult | None:
    snap = load_snapshot(index_dir, device="cpu")
    if snap.encoder_dir is None:
        raise SnapshotError(
            f"the index in {index_dir} holds no encoder (it was built from embeddings); new "
            "studies cannot be embedded for it: build it with --model"
        )
    have = set(snap.metadata.column("study_uid").to_pylist())
    wanted = store.study_uids() - have
    if not wanted:
        return None
    encoder, card = load_encoder(snap.encoder_dir, device=device)
    # a lesion encoder on the whole-study grid embeds each study's primary detail patch,
    # as the full build does (indexing.build.embed_store's default)
    on_patches = card.region.mode == "lesion" and card.input.has_patches
    uids, volumes = _new_volumes(store, wanted, batch_size, "readers" if on_patches else None)
    if not uids:
        return None
    spec = InputSpec.from_dict(json.loads(store.studies(columns=["spec"])["spec"][0].as_py()))
    if spec != card.input:
        raise ModelVersionError(
            f"the index's encoder expects input {card.input.to_dict()} but the store holds "
            f"{spec.to_dict()}; ingest into a store made with the encoder's spec"
        )
    shard = embed_shard(encoder, uids, volumes, batch_size=batch_size, device=device,
                        sources=store.patch_sources(uids, "readers") if on_patches else None)
    new = np.asarray(
        shard.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
        dtype=np.float32,
    ).reshape(len(uids), -1)
    metadata = snap.metadata.drop_columns(["row_id"])
    # the new rows carry what the index's rows carry: thumbnail and embedded region
    # columns from the shard, where the index has them (older indexes may lack them)
    shard_cols = [c for c in (THUMBNAIL_COLUMN, *REGION_COLUMNS, *MATCH_COLUMNS)
                  if c in metadata.column_names]
    rows = _rows_for(store, uids, metadata.drop_columns(shard_cols))
    for col in shard_cols:
        rows = rows.append_column(metadata.schema.field(col), shard.column(col).cast(
            metadata.schema.field(col).type))
    rows = rows.select(metadata.column_names)
    vectors = np.concatenate([np.asarray(snap.vectors, dtype=np.float32), new])
    m = snap.manifest
    kind = str(m["index_kind"])
    state = dict(m.get(INCREMENTAL_KEY) or {})
    trained_on = int(state.get("trained_on", snap.num_studies))
    added = int(state.get("added_since_training", 0)) + len(uids)
    base: faiss.Index | None = faiss.read_index(str(index_dir / VERSIONS_DIR / snap.version / INDEX_FILE))
    needs_training = _trains(kind, snap.dimension)
    retrained = needs_training and added > rebuild_threshold * max(trained_on, 1)
    if retrained:
        base = None
        state = {"trained_on": len(vectors), "added_since_training": 0}
    else:
        state = {"trained_on": trained_on, "added_since_training": added}
    extra: dict[str, Any] = {k: v for k, v in m.items() if k not in BUILD_MANIFEST_KEYS}
    extra[INCREMENTAL_KEY] = state
    version = build_snapshot(
        index_dir,
        vectors,
        pa.concat_tables([metadata, rows]),
        model_version=snap.model_version,
        kind=kind,
        encoder_dir=snap.encoder_dir,
        store_version=store.store_version(),
        search_params=m.get("search_params") or None,
        k_ood=snap.k_ood,
        extra_manifest=extra,
        base_index=base,
    )
    log.info(
        "index: %d new studies published as %s (%s)",
        len(uids), version, "retrained" if retrained else "incremental add",
    )
    return PublishResult(version, len(uids), len(vectors), retrained)


def _trains(kind: str, d: int) -> bool:
    """Whether an index of ``kind`` needs training (IVF, PQ, SQ...)."""
    try:
        return not faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT).is_trained
    except RuntimeError:
        return True
