"""Building a snapshot version: normalise the vectors, train and fill the FAISS index of
the requested kind, compute the out-of-distribution reference, write every file with its
checksum into a hidden folder, and publish it (:mod:`indexing.versions`)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexing.durable import fsync_dir, fsync_file, sha256_file
from indexing.errors import (
    DimensionError,
    SnapshotError,
)
from indexing.kinds import apply_search_params, default_search_params, is_lossy_kind, vectors_view
from indexing.tombstones import TOMBSTONE_FILE, read_tombstones
from indexing.versions import (
    EMBEDDINGS_FILE,
    ENCODER_DIR,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    OOD_FILE,
    VERSIONS_DIR,
    new_version_id,
    publish,
    snapshot_write_error,
    write_manifest,
)

log = logging.getLogger(__name__)


METRIC = "cosine"
K_OOD = 10
OOD_SAMPLE = 2000
TRAIN_SAMPLE = 100_000


RERANK_FACTOR = 16  # lossy kinds (PQ, SQ8...) fetch k x this and re-score exactly;
# IVF4096,PQ32 at 1M x 256: recall@10 0.67 at 4, 0.94 at 16, for +0.01 ms a query (RESULTS.md)


REQUIRED_COLUMNS = ("patient_id", "study_uid")

Progress = Callable[[str, int, int], None]


def normalize_rows(x: np.ndarray, *, what: str = "embeddings") -> np.ndarray:
    """``(n, d)`` -> L2-normalised float32 copy; refuses NaN/Inf and zero rows."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DimensionError(f"{what} must be a 2-D (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise DimensionError(
            f"{what} hold NaN or infinite values in {bad.size} row(s) (first: {int(bad[0])}); "
            "re-embed those studies"
        )
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    if np.any(norms == 0):
        raise DimensionError(f"{what} hold all-zero rows; a zero vector has no direction")
    return np.ascontiguousarray(x / norms.astype(np.float32), dtype=np.float32)


def ood_reference(
    index: faiss.Index, vectors: np.ndarray, *, k_ood: int, sample: int, seed: int
) -> np.ndarray:
    """Sorted LOO mean similarity of (a sample of) members to their k_ood nearest others."""
    n = vectors.shape[0]
    k = min(k_ood, n - 1)
    if k < 1:
        return np.zeros(0, dtype=np.float64)
    rows = np.arange(n)
    if n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    sims, ids = index.search(vectors[rows], k + 1)
    out = np.empty(rows.size, dtype=np.float64)
    for i, row in enumerate(rows):
        keep = (ids[i] != row) & (ids[i] >= 0)
        s = sims[i][keep][:k]
        out[i] = float(np.mean(s, dtype=np.float64)) if s.size else np.nan
    out = out[np.isfinite(out)]
    return np.sort(out)


def build_snapshot(
    index_dir: Path | str,
    embeddings: np.ndarray,
    metadata: pa.Table,
    *,
    model_version: str,
    kind: str = "Flat",
    encoder_dir: Path | str | None = None,
    store_version: str | None = None,
    search_params: dict[str, float] | None = None,
    k_ood: int = K_OOD,
    seed: int = 0,
    progress: Progress | None = None,
    extra_manifest: dict[str, Any] | None = None,
    base_index: faiss.Index | None = None,
) -> str:
    """Build, checksum and publish a new snapshot version; returns its id.

    ``embeddings`` ``(n, d)`` float (normalised again here); ``metadata`` the cohort table
    with ``n`` rows in the same order (row i <-> FAISS id i; a ``row_id`` column is set).
    ``kind`` is a FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"...).
    ``search_params`` overrides the stored defaults (``nprobe`` for IVF, ``efSearch`` for
    HNSW). ``progress(stage, done, total)`` is called as work advances.
    ``extra_manifest``: more JSON-able manifest entries (e.g. ``prognosis_evaluation``);
    they may not replace the keys written here.
    ``base_index``: an index of ``kind`` that already holds the first ``ntotal`` rows of
    ``embeddings`` (the previous version's, for an incremental add): only the other rows
    are added to a copy of it, without training. Ignored (a full build) when rows of
    deleted patients had to be left out, since row ids would shift.
    """

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    vectors = normalize_rows(embeddings)
    n, d = vectors.shape
    if n == 0:
        raise DimensionError("no embeddings to index; ingest and embed studies first")
    if metadata.num_rows != n:
        raise DimensionError(
            f"metadata has {metadata.num_rows} rows but embeddings have {n}; they must align"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.column_names]
    if missing:
        raise SnapshotError(f"metadata lacks column(s) {missing}; pass the store's cohort_table()")
    # withdrawn patients (INDEX_DIR/tombstones.parquet) never enter a new version
    deleted = read_tombstones(Path(index_dir) / TOMBSTONE_FILE)
    dropped = 0
    if deleted:
        keep = ~np.isin(
            np.asarray(metadata.column("patient_id").to_pylist(), dtype=object),
            np.asarray(sorted(deleted), dtype=object),
        )
        dropped = int(n - keep.sum())
        if dropped:
            if dropped == n:
                raise SnapshotError("every study belongs to a deleted patient; nothing to index")
            vectors = np.ascontiguousarray(vectors[keep])
            metadata = metadata.filter(pa.array(keep))
            n = vectors.shape[0]
            log.info("index: left out %d studies of deleted patients", dropped)
    uids = metadata.column("study_uid")
    if uids.null_count or len(uids.unique()) != n:
        raise SnapshotError("metadata study_uid values must be present and unique")
    if "row_id" in metadata.column_names:
        metadata = metadata.drop_columns(["row_id"])
    metadata = metadata.add_column(0, "row_id", pa.array(np.arange(n, dtype=np.int64)))

    # index
    first = 0  # rows already in the index
    if base_index is not None and not dropped and 0 < base_index.ntotal <= n and base_index.d == d:
        index = faiss.clone_index(base_index)
        first = int(index.ntotal)
    else:
        try:
            index = faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise SnapshotError(f"faiss does not understand index kind {kind!r}: {exc}") from exc
    if not index.is_trained:
        train = vectors
        if n > TRAIN_SAMPLE:
            pick = np.random.default_rng(seed).choice(n, size=TRAIN_SAMPLE, replace=False)
            train = vectors[np.sort(pick)]
        report("train", 0, train.shape[0])
        try:
            index.train(train)
        except RuntimeError as exc:
            raise SnapshotError(
                f"training index kind {kind!r} on {train.shape[0]} vectors failed: {exc}; "
                "use fewer lists/centroids or kind='Flat' for small cohorts"
            ) from exc
        report("train", train.shape[0], train.shape[0])
    step = 100_000
    for start in range(first, n, step):
        index.add(vectors[start : start + step])
        report("add", min(start + step, n), n)
    params = default_search_params(index)
    params.update(search_params or {})
    apply_search_params(index, params, gpu=False)

    report("ood", 0, 1)
    reference = ood_reference(index, vectors, k_ood=k_ood, sample=OOD_SAMPLE, seed=seed)
    report("ood", 1, 1)
    vectors_in_index = vectors_view(index) is not None
    rerank = RERANK_FACTOR if is_lossy_kind(kind) else 0

    # write into a hidden temporary version folder, then publish
    index_dir = Path(index_dir)
    versions = index_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    version = new_version_id(versions)
    tmp = versions / f".tmp-{version}"
    final = versions / version
    doing: tuple[str, Path] = ("creating", tmp)
    try:
        tmp.mkdir()
        doing = ("writing", tmp / INDEX_FILE)
        with open(tmp / INDEX_FILE, "wb") as fh:  # through Python: errors keep their errno
            faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))  # type: ignore[attr-defined]
        doing = ("writing", tmp / METADATA_FILE)
        with open(tmp / METADATA_FILE, "wb") as fh:
            pq.write_table(metadata, fh, compression="zstd")
        if not vectors_in_index:  # Flat / SQfp16 / HNSW keep the vectors in index.faiss
            doing = ("writing", tmp / EMBEDDINGS_FILE)
            with open(tmp / EMBEDDINGS_FILE, "wb") as fh:
                np.save(fh, vectors)
        doing = ("writing", tmp / OOD_FILE)
        with open(tmp / OOD_FILE, "wb") as fh:
            np.save(fh, reference)
        if encoder_dir is not None:
            src = Path(encoder_dir)
            if not src.is_dir():
                raise SnapshotError(f"encoder folder {src} does not exist")
            doing = ("copying the encoder to", tmp / ENCODER_DIR)
            _copy_tree(src, tmp / ENCODER_DIR)
        payload = sorted(p for p in tmp.rglob("*") if p.is_file())
        files: dict[str, str] = {}
        for i, path in enumerate(payload):
            doing = ("syncing", path)
            fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = sha256_file(path)
            report("checksum", i + 1, len(payload))
        manifest = {
            "format": FORMAT_VERSION,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "model_version": model_version,
            "dimension": d,
            "metric": METRIC,
            "index_kind": kind,
            "num_studies": n,
            "search_params": params,
            "rerank": rerank,
            "vectors": "index" if vectors_in_index else EMBEDDINGS_FILE,
            "deleted_patients_dropped": dropped,
            "store_version": store_version,
            "faiss_version": faiss.__version__,
            "k_ood": k_ood,
            "ood_reference": [float(v) for v in reference],
            "files": files,
        }
        clash = sorted(set(extra_manifest or {}) & set(manifest))
        if clash:
            raise SnapshotError(f"extra_manifest may not replace manifest keys {clash}")
        manifest.update(extra_manifest or {})
        doing = ("writing", tmp / MANIFEST_FILE)
        write_manifest(tmp / MANIFEST_FILE, manifest)
        for sub in sorted({p.parent for p in payload} | {tmp}, reverse=True):
            doing = ("syncing the folder", sub)
            fsync_dir(sub)
        doing = ("renaming into place", final)
        os.rename(tmp, final)
        doing = ("syncing the folder", versions)
        fsync_dir(versions)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise snapshot_write_error(exc, doing, index_dir, published=False) from exc
        raise
    publish(index_dir, version)
    report("publish", 1, 1)
    log.info("index: published version %s (%d studies, d=%d, kind=%s)", version, n, d, kind)
    return version


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder of plain files (the encoder); an OSError keeps its errno (shutil's
    copytree would fold it into a ``shutil.Error`` of strings)."""
    dst.mkdir()
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
