"""Versioned FAISS index snapshots: build, publish atomically, load with checksums.

Layout of an index folder ``INDEX_DIR/``::

    INDEX_DIR/CURRENT                     the served version id (one line)
    INDEX_DIR/versions/<v>/index.faiss    FAISS index; FAISS id i == row i of metadata
    INDEX_DIR/versions/<v>/metadata.parquet   the cohort table (+ ``row_id``), row i <-> id i
    INDEX_DIR/versions/<v>/embeddings.npy     (n, d) float32, L2-normalised; only for kinds
                                          whose index does not hold the plain vectors
                                          (IVF, PQ...): Flat / SQfp16 / HNSW are read in place
    INDEX_DIR/tombstones.parquet          withdrawn patients, hidden from every version
    INDEX_DIR/versions/<v>/ood_reference.npy  sorted leave-one-out mean-neighbour similarities
    INDEX_DIR/versions/<v>/encoder/...        optional copy of the encoder model folder
    INDEX_DIR/versions/<v>/manifest.json      version, kind, dimension, sha256 of every file...

The metric is cosine similarity, computed as inner product on L2-normalised float32
vectors. A version is built in ``versions/.tmp-<v>/``, fsynced, renamed to
``versions/<v>/`` (the parent fsynced), and only then is ``CURRENT`` replaced (tmp +
``os.replace`` + fsync), so a server reading ``CURRENT`` never sees a half-built version
and a rebuild never disturbs one being served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing.durable import AtomicWriteFailure, fsync_dir, fsync_file, sha256_file, write_atomic
from indexing.errors import (
    DimensionError,
    QueryError,
    SnapshotError,
    SnapshotWriteError,
    UnknownStudyError,
    describe_os_error,
)
from indexing.exact import BlasExactIndex, TorchExactIndex, cuda_visible, faiss_threads_for
from indexing.filter import FilterCache, canonical_where
from indexing.tombstones import TOMBSTONE_FILE, TombstoneWatch, read_tombstones

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest carries its own sha256 (manifest_sha256)
METRIC = "cosine"
K_OOD = 10
OOD_SAMPLE = 2000
TRAIN_SAMPLE = 100_000
HNSW_EF_SEARCH = 256  # recall@10 0.95 at 1M x 256 (0.93 at 128), 0.11 ms a query: benchmarks/RESULTS.md
GPU_MAX_K = 2048  # faiss GPU indexes answer k <= 2048
RERANK_FACTOR = 16  # lossy kinds (PQ, SQ8...) fetch k x this and re-score exactly;
# IVF4096,PQ32 at 1M x 256: recall@10 0.67 at 4, 0.94 at 16, for +0.01 ms a query (RESULTS.md)
EF_SEARCH_MAX = 4096
EXACT_FILTER_MAX_ROWS = 50_000  # approximate kinds: a filter passing fewer rows is searched exactly
EXACT_BACKENDS = ("auto", "blas", "faiss", "torch")
# fp16 storage: below this batch size faiss's SQfp16 kernel beats widening to float32 for
# BLAS (measured in benchmarks/bench_index.py; at 100k x 256 the two meet near 128)
FP16_BLAS_MIN_BATCH = 128

INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
OOD_FILE = "ood_reference.npy"
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "encoder"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
REQUIRED_COLUMNS = ("patient_id", "study_uid")

Progress = Callable[[str, int, int], None]
# Manifest keys written by build_snapshot itself (others come from extra_manifest).
BUILD_MANIFEST_KEYS = frozenset(
    {
        "format", "version", "created_at", "model_version", "dimension", "metric",
        "index_kind", "num_studies", "search_params", "rerank", "vectors",
        "deleted_patients_dropped", "store_version", "faiss_version", "k_ood",
        "ood_reference", "files", "derived_from", "manifest_sha256",
    }
)
MANIFEST_CHECKSUM_KEY = "manifest_sha256"


# --------------------------------------------------------------------- helpers
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


def new_version_id(versions_dir: Path | None = None) -> str:
    """``v<UTC yyyymmddHHMMSS>-<6 hex>``; sorts after every version already in the folder."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = f"v{stamp}-{secrets.token_hex(3)}"
    if versions_dir is not None:
        same_second = [v for v in _version_names(versions_dir) if v.startswith(f"v{stamp}-")]
        if same_second and max(same_second) >= version:
            bump = int(max(same_second).rsplit("-", 1)[1], 16) + 1 + secrets.randbelow(256)
            version = f"v{stamp}-{min(bump, 0xFFFFFF):06x}"
    return version


def _version_names(versions_dir: Path) -> list[str]:
    if not versions_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in versions_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).exists()
    )


def list_versions(index_dir: Path | str) -> list[str]:
    """Published version ids under ``index_dir``, oldest first."""
    return _version_names(Path(index_dir) / VERSIONS_DIR)


def current_version(index_dir: Path | str) -> str | None:
    """The version ``CURRENT`` names, or None when nothing was published."""
    path = Path(index_dir) / CURRENT_FILE
    if not path.exists():
        return None
    return path.read_text().strip() or None


def is_lossy_kind(kind: str) -> bool:
    """Whether a factory string stores vectors lossily (PQ, SQ4/6/8, LSH...), not fp32/fp16."""
    parts = [p.strip().upper() for p in kind.split(",")]
    if any(p.startswith("PCA") for p in parts):
        return True
    last = parts[-1] if parts else ""
    if last.startswith("HNSW") and "_" in last:  # HNSW32_SQ8 style
        last = last.split("_", 1)[1]
    elif last.startswith("HNSW") and len(parts) == 1:
        return False
    if last in ("FLAT", "SQFP16", "SQBF16") or last.startswith("RFLAT"):
        return "PQ" in last
    return any(t in last for t in ("PQ", "SQ", "LSH", "RQ", "LSQ"))


def fp16_kind(kind: str) -> str:
    """The half-precision storage variant of a float32 kind: ``Flat`` -> ``SQfp16``,
    ``IVF1024,Flat`` -> ``IVF1024,SQfp16``, ``HNSW32`` -> ``HNSW32,SQfp16``."""
    parts = [p.strip() for p in kind.split(",")]
    if parts == ["Flat"]:
        return "SQfp16"
    if len(parts) == 2 and parts[0].upper().startswith("IVF") and parts[1] == "Flat":
        return f"{parts[0]},SQfp16"
    if len(parts) == 1 and parts[0].upper().startswith("HNSW") and "_" not in parts[0]:
        return f"{parts[0]},SQfp16"
    if "SQFP16" in kind.upper():
        return kind
    raise SnapshotError(
        f"index kind {kind!r} has no fp16 variant; use Flat, IVF<n>,Flat or HNSW<m> with fp16"
    )


def vectors_view(index: faiss.Index) -> np.ndarray | None:
    """The ``(n, d)`` float32 / float16 vectors held inside ``index``, as a read-only view.

    Works for ``Flat``, ``SQfp16`` and ``HNSW`` over either (the index must stay alive as
    long as the view); None for kinds whose codes are not the plain vectors.
    """
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexHNSW):
        idx = faiss.downcast_index(idx.storage)
    n, d = int(idx.ntotal), int(idx.d)
    if n == 0:
        return None
    if isinstance(idx, faiss.IndexFlat) and idx.code_size == 4 * d:
        return np.asarray(_IndexMemory(int(idx.get_xb()), (n, d), "<f4", index))
    if (
        isinstance(idx, faiss.IndexScalarQuantizer)
        and idx.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        and idx.code_size == 2 * d
    ):
        return np.asarray(_IndexMemory(int(idx.codes.data()), (n, d), "<f2", index))
    return None


class _IndexMemory:
    """Exposes memory owned by a FAISS index to numpy (read-only) and keeps the index
    alive as long as any array made from it exists (it becomes the array's ``base``)."""

    def __init__(self, address: int, shape: tuple[int, int], typestr: str, owner: Any) -> None:
        self.__array_interface__ = {
            "data": (address, True),  # read-only
            "shape": shape,
            "typestr": typestr,
            "version": 3,
        }
        self._owner = owner


def _default_search_params(index: faiss.Index) -> dict[str, float]:
    params: dict[str, float] = {}
    try:
        nlist = faiss.extract_index_ivf(index).nlist
        params["nprobe"] = int(min(nlist, max(16, nlist // 32)))
    except RuntimeError:
        pass
    try:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", HNSW_EF_SEARCH)
        params["efSearch"] = HNSW_EF_SEARCH
    except RuntimeError:
        pass
    return params


def _apply_search_params(index: faiss.Index, params: dict[str, Any], *, gpu: bool) -> None:
    space_cls = getattr(faiss, "GpuParameterSpace", None) if gpu else faiss.ParameterSpace
    if space_cls is None:
        return
    space = space_cls()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            log.warning("index: could not set %s=%s (%s)", name, value, exc)


def _ood_reference(
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


# --------------------------------------------------------------------- build
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
    params = _default_search_params(index)
    params.update(search_params or {})
    _apply_search_params(index, params, gpu=False)

    report("ood", 0, 1)
    reference = _ood_reference(index, vectors, k_ood=k_ood, sample=OOD_SAMPLE, seed=seed)
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
        _write_manifest(tmp / MANIFEST_FILE, manifest)
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
            raise _write_error(exc, doing, index_dir, published=False) from exc
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


def publish(index_dir: Path | str, version: str) -> None:
    """Point ``CURRENT`` at an existing version (atomic replace; also used for rollback).

    A failed write raises :class:`SnapshotWriteError`; ``CURRENT`` then still names the
    version it named before (unless only the final folder fsync failed, which the
    message says).
    """
    index_dir = Path(index_dir)
    if not (index_dir / VERSIONS_DIR / version / MANIFEST_FILE).exists():
        raise SnapshotError(f"version {version} does not exist under {index_dir}")
    try:
        write_atomic(index_dir / CURRENT_FILE, lambda fh: fh.write(version + "\n"), mode="w")
    except AtomicWriteFailure as failure:
        where = {
            "writing": failure.tmp,
            "syncing": failure.tmp,
            "renaming into place": failure.path,
            "syncing the folder": index_dir,
        }[failure.step]
        raise _write_error(
            failure.error,
            (failure.step, where),
            index_dir,
            published=failure.in_place,
            version=version,
        ) from failure.error


def _write_error(
    exc: OSError,
    step: tuple[str, Path],
    index_dir: Path,
    *,
    published: bool,
    version: str | None = None,
) -> SnapshotWriteError:
    """The typed error of a failed snapshot write: what failed where, and what is served."""
    served: str | None = version
    if not published:
        try:
            served = current_version(index_dir)
        except OSError:
            served = None
    if published:
        tail = f"; version {version} is published but CURRENT may not survive a power loss"
    else:
        tail = (
            "; nothing was published, "
            + (f"version {served} is still served" if served else "no version is served yet")
            + " (fix the cause and run the command again)"
        )
    return SnapshotWriteError(
        describe_os_error(exc, step[0], step[1]) + tail, path=step[1], errno=exc.errno
    )


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own checksum entry."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (format 2, with its own sha256) to ``path`` and fsync it."""
    manifest["format"] = FORMAT_VERSION
    manifest[MANIFEST_CHECKSUM_KEY] = _manifest_digest(manifest)
    with open(path, "w") as fh:
        fh.write(json.dumps(manifest, indent=1))  # one write (json.dump writes per token)
        fh.flush()
        os.fsync(fh.fileno())


def rollback(index_dir: Path | str, version: str) -> None:
    """Serve an earlier (or any) version again: verify its checksums, then move ``CURRENT``.

    Raises :class:`SnapshotError` when the version is unknown or its files are corrupt, so
    a rollback never points servers at a broken snapshot.
    """
    index_dir = Path(index_dir)
    vdir = index_dir / VERSIONS_DIR / version
    if not (vdir / MANIFEST_FILE).exists():
        known = ", ".join(list_versions(index_dir)) or "none"
        raise SnapshotError(f"snapshot version {version} not found in {index_dir} (known: {known})")
    verify_snapshot(vdir, _read_manifest(vdir))
    publish(index_dir, version)
    log.info("index: CURRENT rolled to version %s", version)


def prune_versions(
    index_dir: Path | str, *, keep: int, stale_tmp_s: float = 24 * 3600
) -> list[str]:
    """Delete all but the newest ``keep`` versions; ``CURRENT``'s version always stays.

    Returns the removed version ids, oldest first. A version is renamed to a hidden
    ``versions/.trash-*`` folder before its files go, so no reader ever sees half of one;
    a server still holding a pruned version keeps its open files until it moves on.
    Unfinished ``.tmp-*`` build folders older than ``stale_tmp_s`` are removed too.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SnapshotError(f"keep must be a whole number >= 1, got {keep!r}")
    index_dir = Path(index_dir)
    versions_dir = index_dir / VERSIONS_DIR
    versions = list_versions(index_dir)
    current = current_version(index_dir)
    survivors = set(versions[-keep:]) | ({current} if current else set())
    removed = []
    for v in versions:
        if v in survivors:
            continue
        trash = versions_dir / f".trash-{v}-{secrets.token_hex(3)}"
        os.rename(versions_dir / v, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v)
    now = datetime.now(UTC).timestamp()
    if versions_dir.is_dir():
        for p in versions_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and now - p.stat().st_mtime > stale_tmp_s:
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(versions_dir)
    if removed:
        log.info("index: pruned %d versions (kept %d)", len(removed), len(versions) - len(removed))
    return removed


def republish_metadata(
    index_dir: Path | str,
    metadata: pa.Table,
    *,
    base_version: str | None = None,
    manifest_updates: dict[str, Any] | None = None,
) -> str:
    """Publish a new version that shares ``base_version``'s vectors but has new metadata.

    For outcome updates without re-embedding: the index, vectors and encoder files are
    hard-linked (copied where links are not possible) from the base version, only
    ``metadata.parquet`` and the manifest are new. ``metadata`` must list the same
    ``study_uid`` in the same order as the base. Returns the new version id.
    """
    index_dir = Path(index_dir)
    base_version = base_version or current_version(index_dir)
    if base_version is None:
        raise SnapshotError(f"no published snapshot in {index_dir}; run cohortsim index build first")
    bdir = index_dir / VERSIONS_DIR / base_version
    base = _read_manifest(bdir)
    old_uids = pq.read_table(bdir / METADATA_FILE, columns=["study_uid"]).column("study_uid")
    if "study_uid" not in metadata.column_names or not metadata.column("study_uid").equals(old_uids):
        raise SnapshotError(
            "new metadata must list the base version's studies in the same order "
            "(row i <-> vector i); rebuild the index to change the studies"
        )
    if "row_id" not in metadata.column_names:
        metadata = metadata.add_column(0, "row_id", pa.array(np.arange(metadata.num_rows, dtype=np.int64)))
    versions = index_dir / VERSIONS_DIR
    version = new_version_id(versions)
    tmp = versions / f".tmp-{version}"
    step: tuple[str, Path] = ("creating", tmp)
    try:
        tmp.mkdir()
        files = dict(base["files"])
        for name in files:
            if name == METADATA_FILE:
                continue
            dst = tmp / name
            step = ("linking", dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(bdir / name, dst)
            except OSError:
                shutil.copy2(bdir / name, dst)
        step = ("writing", tmp / METADATA_FILE)
        with open(tmp / METADATA_FILE, "wb") as fh:
            pq.write_table(metadata, fh, compression="zstd")
        fsync_file(tmp / METADATA_FILE)
        files[METADATA_FILE] = sha256_file(tmp / METADATA_FILE)
        manifest = dict(base)
        manifest.update(manifest_updates or {})
        manifest.update(
            {
                "version": version,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "derived_from": base_version,
                "files": files,
            }
        )
        step = ("writing", tmp / MANIFEST_FILE)
        _write_manifest(tmp / MANIFEST_FILE, manifest)
        for sub in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            step = ("syncing the folder", sub)
            fsync_dir(sub)
        step = ("renaming into place", versions / version)
        os.rename(tmp, versions / version)
        step = ("syncing the folder", versions)
        fsync_dir(versions)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(exc, step, index_dir, published=False) from exc
        raise
    publish(index_dir, version)
    log.info("index: published version %s (metadata update of %s)", version, base_version)
    return version


# --------------------------------------------------------------------- load
@dataclass(frozen=True)
class SearchParams:
    """Per-query overrides of a snapshot's search defaults (None keeps the manifest's).

    ``nprobe``: IVF lists visited (1..nlist); ``ef_search``: HNSW candidate list
    (1..4096); ``rerank``: lossy kinds (PQ, SQ8) fetch ``k * rerank`` candidates and
    re-score them exactly against the stored vectors (0 turns it off).
    """

    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int | None = None

    def is_default(self) -> bool:
        return self.nprobe is None and self.ef_search is None and self.rerank is None


class RowMask:
    """Rows a search may return: ``(n,)`` bool, with its count and FAISS selector form."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = np.ascontiguousarray(mask, dtype=bool)
        self.mask.setflags(write=False)
        self.count = int(np.count_nonzero(self.mask))
        self._bitmap: np.ndarray | None = None

    @property
    def share(self) -> float:
        return self.count / max(self.mask.size, 1)

    def selector(self) -> tuple[Any, np.ndarray]:
        """``(faiss.IDSelectorBitmap, bitmap)``; keep the bitmap alive during the search."""
        if self._bitmap is None:
            self._bitmap = np.packbits(self.mask, bitorder="little")
        bitmap = self._bitmap
        return faiss.IDSelectorBitmap(self.mask.size, faiss.swig_ptr(bitmap)), bitmap


def _empty_result(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((m, k), -np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)


def _post_filter(
    sims: np.ndarray, rows: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``k`` results of each row whose id passes ``mask``."""
    m = rows.shape[0]
    out_s, out_r = _empty_result(m, k)
    ok = (rows >= 0) & mask[np.maximum(rows, 0)]
    for i in range(m):
        keep = np.flatnonzero(ok[i])[:k]
        out_s[i, : keep.size] = sims[i, keep]
        out_r[i, : keep.size] = rows[i, keep]
    return out_s, out_r


def _inner_index(index: faiss.Index) -> Any:
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx


class Snapshot:
    """One loaded, verified snapshot version; safe to search from several threads.

    Exact kinds (``Flat``, ``SQfp16``) are searched by :attr:`backend`: ``blas``
    (:class:`indexing.exact.BlasExactIndex`, the CPU default), ``torch``
    (:class:`indexing.exact.TorchExactIndex`, a CUDA GPU without faiss-gpu), ``faiss``
    or ``faiss-gpu``. Rows of patients listed in ``INDEX_DIR/tombstones.parquet`` are
    never returned (checked on every call); a ``where`` filter or an ``allowed`` mask
    narrows the candidates exactly for exact kinds and with widened ``nprobe`` /
    ``efSearch`` (or an exact scan when few rows pass) for approximate ones.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        index: faiss.Index,
        metadata: pa.Table,
        embeddings: np.ndarray,
        ood_reference: np.ndarray,
        gpu_index: faiss.Index | None = None,
        *,
        exact: BlasExactIndex | TorchExactIndex | None = None,
        backend: str | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.metadata = metadata
        self.ood_reference = ood_reference
        self._cpu_index = index
        self._gpu_index = gpu_index
        self._gpu_lock = threading.Lock()  # faiss GPU resources are not thread-safe
        self._embeddings = embeddings
        self._blas = BlasExactIndex(embeddings)
        inner = _inner_index(index)
        self.is_flat = isinstance(inner, faiss.IndexFlat) or (
            isinstance(inner, faiss.IndexScalarQuantizer)
            and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        )
        if backend is None:
            backend = "faiss-gpu" if gpu_index is not None else ("blas" if self.is_flat else "faiss")
        if exact is None and self.is_flat and backend != "faiss":
            exact = self._blas  # also the CPU fallback of faiss-gpu (filters, many deletions)
        self.backend = backend
        self._exact = exact
        self._ivf = faiss.try_extract_index_ivf(index) if not self.is_flat else None
        self._hnsw = inner if isinstance(inner, faiss.IndexHNSW) else None
        self.rerank = int(manifest.get("rerank", 0) or 0)
        self.exact_filter_max_rows = EXACT_FILTER_MAX_ROWS
        self._filters = FilterCache(metadata)
        self._tombstones = TombstoneWatch(path.parent.parent / TOMBSTONE_FILE)
        self._deleted: tuple[Any, RowMask | None, frozenset[int]] = (object(), None, frozenset())
        self._masks: dict[tuple[str, Any], RowMask] = {}
        self._masks_lock = threading.Lock()
        self._row_of_study: dict[str, int] | None = None
        self._rows_of_patient: dict[str, list[int]] | None = None
        self._scanner_shares: dict[tuple[str | None, str | None], float] | None = None

    # properties ---------------------------------------------------------
    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def num_studies(self) -> int:
        return int(self.manifest["num_studies"])

    @property
    def k_ood(self) -> int:
        return int(self.manifest.get("k_ood", K_OOD))

    @property
    def gpu(self) -> bool:
        return self._gpu_index is not None or (
            isinstance(self._exact, TorchExactIndex) and self._exact.device.type == "cuda"
        )

    @property
    def vectors(self) -> np.ndarray:
        """The ``(n, d)`` stored vectors (float32, or float16 for fp16 kinds), read-only."""
        return self._embeddings

    @property
    def index_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def encoder_dir(self) -> Path | None:
        path = self.path / ENCODER_DIR
        return path if path.is_dir() else None

    def __repr__(self) -> str:
        return (
            f"Snapshot(version={self.version!r}, num_studies={self.num_studies}, "
            f"dimension={self.dimension}, kind={self.manifest['index_kind']!r}, "
            f"backend={self.backend!r})"
        )

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "num_studies": self.num_studies,
            "dimension": self.dimension,
            "metric": m["metric"],
            "index_kind": m["index_kind"],
            "model_version": m["model_version"],
            "index_version": m["version"],
            "gpu": self.gpu,
            "created_at": m["created_at"],
            "search_backend": self.backend,
        }

    # deletions and filters -------------------------------------------------
    def _deleted_state(self) -> tuple[Any, RowMask | None, frozenset[int]]:
        sig, patients = self._tombstones.current()
        state = self._deleted
        if state[0] == sig:
            return state
        rows = np.zeros(0, dtype=np.int64)
        if patients:
            hit = pc.is_in(
                self.metadata.column("patient_id"),
                value_set=pa.array(sorted(patients), pa.string()),
            )
            rows = np.flatnonzero(np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool))
        mask = None
        if rows.size:
            keep = np.ones(self.num_studies, dtype=bool)
            keep[rows] = False
            mask = RowMask(keep)
            log.info("index %s: %d studies hidden by tombstones", self.version, rows.size)
        state = (sig, mask, frozenset(rows.tolist()))
        self._deleted = state
        return state

    def deleted_rows(self) -> frozenset[int]:
        """Rows of withdrawn patients (never returned; gone from the next rebuild)."""
        return self._deleted_state()[2]

    def filter_mask(self, where: str) -> np.ndarray | None:
        """``(n,) bool`` rows satisfying ``where`` (None: no filter); raises FilterError."""
        return self._filters.mask(where)

    def allowed(self, where: str = "", allowed: np.ndarray | None = None) -> RowMask | None:
        """The rows a search may return: ``where`` and ``allowed`` minus deleted rows."""
        sig, deleted, _ = self._deleted_state()
        key = canonical_where(where)  # the parsed expression: spacing inside quotes counts
        if allowed is None:
            if not key:
                return deleted
            with self._masks_lock:
                hit = self._masks.get((key, sig))
            if hit is not None:
                return hit
        mask = self.filter_mask(where) if key else None
        parts = [p for p in (mask, None if deleted is None else deleted.mask) if p is not None]
        if allowed is not None:
            a = np.asarray(allowed, dtype=bool)
            if a.shape != (self.num_studies,):
                raise QueryError(f"allowed must be a ({self.num_studies},) bool mask, got {a.shape}")
            parts.append(a)
        if not parts:
            return None
        combined = parts[0].copy()
        for p in parts[1:]:
            combined &= p
        out = RowMask(combined)
        if allowed is None:
            with self._masks_lock:
                if len(self._masks) >= 32:
                    self._masks.clear()
                self._masks[(key, sig)] = out
        return out

    # search --------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: str = "",
        allowed: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine for ``(m, d)`` queries (normalised by the caller).

        ``where``: a filter over the metadata (:mod:`indexing.filter`); ``allowed``: an
        ``(n,) bool`` row mask; ``params``: per-query :class:`SearchParams`. Returns
        ``(sims (m, k) float32, rows (m, k) int64)``, best first; where fewer than k
        results exist, rows are -1 and sims -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise DimensionError(
                f"queries must have shape (m, {self.dimension}), got {tuple(q.shape)}"
            )
        if isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        k = int(k)
        params = params or SearchParams()
        mask = self.allowed(where, allowed)
        if mask is not None and mask.count == 0:
            return _empty_result(q.shape[0], k)
        if self.is_flat:
            if params.nprobe is not None or params.ef_search is not None:
                raise QueryError(
                    f"nprobe / ef_search tune approximate indexes; this index is "
                    f"{self.manifest['index_kind']} (exact)"
                )
            sims, rows = self._search_flat(q, k, mask)
        else:
            sims, rows = self._search_approx(q, k, mask, params)
        rows = rows.astype(np.int64, copy=False)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32, copy=False)
        return sims, rows

    def _gpu_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._gpu_lock:
            assert self._gpu_index is not None
            return self._gpu_index.search(q, k)

    def _search_flat(
        self, q: np.ndarray, k: int, mask: RowMask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_studies
        if self._gpu_index is not None and k <= GPU_MAX_K:
            if mask is None:
                return self._gpu_search(q, k)
            fetch = min(n, k + (n - mask.count))  # GPU indexes ignore selectors: over-fetch
            if fetch <= GPU_MAX_K:
                sims, rows = self._gpu_search(q, fetch)
                return _post_filter(sims, rows, mask.mask, k)
        exact = self._exact
        if (
            isinstance(exact, BlasExactIndex)
            and exact.vectors.dtype == np.float16
            and q.shape[0] < FP16_BLAS_MIN_BATCH
        ):
            exact = None  # widening fp16 for BLAS only pays off over many queries
        if exact is not None:
            return exact.search(q, k, allowed=None if mask is None else mask.mask)
        if mask is None:
            with faiss_threads_for(q.shape[0]):
                return self._cpu_index.search(q, k)
        sel, bitmap = mask.selector()
        with faiss_threads_for(q.shape[0]):
            sims, rows = self._cpu_index.search(q, k, params=self._faiss_params(None, None, sel))
        del bitmap  # the selector reads it during the search
        return sims, rows

    def _faiss_params(self, nprobe: int | None, ef: int | None, sel: Any) -> Any:
        """SearchParameters for this index kind (IVF: nprobe, HNSW: efSearch) + selector."""
        fa: Any = faiss  # the SWIG classes are not in faiss's type stubs
        p: Any
        if self._ivf is not None:
            p = fa.SearchParametersIVF()
            p.nprobe = int(nprobe if nprobe is not None else self._ivf.nprobe)
        elif self._hnsw is not None:
            p = fa.SearchParametersHNSW()
            p.efSearch = int(ef if ef is not None else self._hnsw.hnsw.efSearch)
        else:
            p = fa.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def _search_approx(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_studies
        if params.nprobe is not None:
            if self._ivf is None:
                raise QueryError(f"nprobe applies to IVF indexes; this one is {self.manifest['index_kind']}")
            if not 1 <= params.nprobe <= self._ivf.nlist:
                raise QueryError(f"nprobe must be between 1 and {self._ivf.nlist}; got {params.nprobe}")
        if params.ef_search is not None:
            if self._hnsw is None:
                raise QueryError(f"ef_search applies to HNSW indexes; this one is {self.manifest['index_kind']}")
            if not 1 <= params.ef_search <= EF_SEARCH_MAX:
                raise QueryError(f"ef_search must be between 1 and {EF_SEARCH_MAX}; got {params.ef_search}")
        rerank = self.rerank if params.rerank is None else int(params.rerank)
        if not 0 <= rerank <= 64:
            raise QueryError(f"rerank must be between 0 and 64; got {rerank}")
        fetch = min(n, k * rerank) if rerank > 1 else k
        if mask is not None and mask.count <= max(self.exact_filter_max_rows, fetch):
            # few rows pass: scan exactly those (exact, and cheaper than a widened probe)
            return self._blas.search(q, k, allowed=mask.mask)
        nprobe = params.nprobe
        ef = params.ef_search
        sel = bitmap = None
        if mask is not None:
            # a selector drops rows after the probe: widen it by the share that passes
            share = max(mask.share, 1e-6)
            if self._ivf is not None:
                base = nprobe if nprobe is not None else self._ivf.nprobe
                nprobe = int(min(self._ivf.nlist, math.ceil(base / share)))
            if self._hnsw is not None:
                base = ef if ef is not None else self._hnsw.hnsw.efSearch
                ef = int(min(EF_SEARCH_MAX, math.ceil(max(base, fetch) / share)))
            sel, bitmap = mask.selector()
        if (
            self._gpu_index is not None
            and mask is None
            and params.nprobe is None
            and params.ef_search is None
            and fetch <= GPU_MAX_K
        ):
            sims, rows = self._gpu_search(q, fetch)
        else:
            sp = self._faiss_params(nprobe, ef, sel)
            with faiss_threads_for(q.shape[0]):
                sims, rows = self._cpu_index.search(q, fetch, params=sp)
        del bitmap  # the selector's memory had to outlive the search
        if rerank > 1:
            return self._rescore(q, rows, k)
        return sims, rows

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of candidate rows ``(m, K)``; top k of each, best first."""
        m = q.shape[0]
        out_s, out_r = _empty_result(m, k)
        for i in range(m):
            rows = cand[i][cand[i] >= 0]
            if rows.size == 0:
                continue
            order = np.argsort(rows)  # sorted reads from the memory map
            rows = rows[order]
            sims = np.asarray(self._embeddings[rows], dtype=np.float32) @ q[i]
            top = np.argsort(-sims, kind="stable")[:k]
            out_s[i, : top.size] = sims[top]
            out_r[i, : top.size] = rows[top]
        return out_s, out_r

    def vector(self, row: int) -> np.ndarray:
        """The stored L2-normalised ``(d,)`` float32 embedding of ``row``."""
        if not 0 <= int(row) < self.num_studies:
            raise UnknownStudyError(f"row {row} is outside 0..{self.num_studies - 1}")
        return np.array(self._embeddings[int(row)], dtype=np.float32)

    def row_of_study(self, study_uid: str) -> int:
        """The row (FAISS id) of a study pseudonym; raises :class:`UnknownStudyError`
        (also for studies of deleted patients)."""
        if self._row_of_study is None:
            uids = self.metadata.column("study_uid").to_pylist()
            self._row_of_study = {uid: i for i, uid in enumerate(uids)}
        row = self._row_of_study.get(study_uid)
        if row is None or row in self.deleted_rows():
            raise UnknownStudyError(f"study {study_uid} is not in index version {self.version}")
        return row

    def rows_of_patient(self, patient_id: str, *, include_deleted: bool = False) -> list[int]:
        """All rows of one patient pseudonym (empty when unknown or deleted)."""
        if self._rows_of_patient is None:
            table: dict[str, list[int]] = {}
            for i, pid in enumerate(self.metadata.column("patient_id").to_pylist()):
                table.setdefault(pid, []).append(i)
            self._rows_of_patient = table
        rows = list(self._rows_of_patient.get(patient_id, ()))
        if rows and not include_deleted and rows[0] in self.deleted_rows():
            return []
        return rows

    def scanner_shares(self) -> dict[tuple[str | None, str | None], float]:
        """Share of the cohort per (manufacturer, model); empty when the columns are absent."""
        if self._scanner_shares is None:
            cols = ("manufacturer", "model")
            if not all(c in self.metadata.column_names for c in cols):
                self._scanner_shares = {}
            else:
                counts = (
                    self.metadata.select(list(cols))
                    .group_by(list(cols))
                    .aggregate([([], "count_all")])
                )
                n = max(self.metadata.num_rows, 1)
                self._scanner_shares = {
                    (r["manufacturer"], r["model"]): r["count_all"] / n for r in counts.to_pylist()
                }
        return self._scanner_shares


def _read_manifest(vdir: Path) -> dict[str, Any]:
    path = vdir / MANIFEST_FILE
    if not path.exists():
        raise SnapshotError(f"{path} is missing; the version is incomplete, rebuild the index")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path} is unreadable ({exc}); rebuild the index") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{path} is not a JSON object; rebuild the index")
    fmt = manifest.get("format")
    if fmt not in (1, FORMAT_VERSION):
        raise SnapshotError(
            f"{path} has format {fmt!r}, this cohortsim reads 1..{FORMAT_VERSION}; the manifest "
            "is corrupt or from a newer cohortsim"
        )
    if fmt >= 2 and manifest.get(MANIFEST_CHECKSUM_KEY) != _manifest_digest(manifest):
        raise SnapshotError(
            f"{path} fails its sha256 checksum (the manifest is corrupt); serve another "
            "version (cohortsim index rollback) or rebuild the index"
        )
    for key in ("version", "dimension", "num_studies", "index_kind", "model_version", "files"):
        if key not in manifest:
            raise SnapshotError(f"{path} lacks {key!r}; rebuild the index")
    if manifest["version"] != vdir.name:
        raise SnapshotError(
            f"{path} describes version {manifest['version']!r}, not {vdir.name!r}; rebuild the index"
        )
    return manifest


def read_manifest(index_dir: Path | str, version: str) -> dict[str, Any]:
    """The manifest of one version (no checksum verification); SnapshotError if unreadable."""
    return _read_manifest(Path(index_dir) / VERSIONS_DIR / version)


def verify_snapshot(vdir: Path, manifest: dict[str, Any]) -> None:
    """Check the sha256 of every file the manifest lists; SnapshotError names the first bad one."""
    for name, digest in manifest["files"].items():
        path = vdir / name
        if not path.is_file():
            raise SnapshotError(f"snapshot file {name} is missing from {vdir}; rebuild the index")
        if sha256_file(path) != digest:
            raise SnapshotError(
                f"snapshot file {name} in {vdir} fails its sha256 checksum; "
                "the copy is corrupt, rebuild the index or serve another version"
            )


def _check_id_map(metadata: pa.Table, version: str) -> None:
    """Row i of the metadata must be FAISS id i (``row_id`` = 0..n-1), one row per study."""
    n = metadata.num_rows
    if "row_id" in metadata.column_names:
        row_id = metadata.column("row_id").to_numpy()
        if row_id.shape != (n,) or not np.array_equal(row_id, np.arange(n)):
            raise SnapshotError(
                f"snapshot {version}: metadata row_id is not 0..{n - 1}, so rows do not map to "
                "the index's vectors; rebuild the index"
            )
    uids = metadata.column("study_uid") if "study_uid" in metadata.column_names else None
    if uids is None or uids.null_count or len(pc.unique(uids)) != n:
        raise SnapshotError(
            f"snapshot {version}: metadata study_uid values are missing or repeated; "
            "rebuild the index"
        )


def _torch_backend(vectors: np.ndarray, device: str) -> TorchExactIndex:
    return TorchExactIndex(vectors, device=device, half=vectors.dtype == np.float16)


def load_snapshot(
    index_dir: Path | str,
    *,
    version: str | None = None,
    device: str = "auto",
    exact_backend: str = "auto",
) -> Snapshot:
    """Load ``CURRENT`` (or ``version``), verifying every checksum.

    ``device``: "auto" (a GPU when one is usable), "cpu", or "gpu"/"cuda" (required).
    With a GPU, faiss-gpu holds the index when it loads; where it does not but torch sees
    CUDA (e.g. a CUDA-13-only host), exact kinds run on :class:`TorchExactIndex`.
    ``exact_backend`` forces the engine of exact kinds: "blas", "faiss" or "torch"
    ("auto": faiss-gpu, else torch on CUDA, else blas).
    """
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if exact_backend not in EXACT_BACKENDS:
        raise ValueError(f"exact_backend must be one of {EXACT_BACKENDS}, got {exact_backend!r}")
    index_dir = Path(index_dir)
    if version is None:
        version = current_version(index_dir)
        if version is None:
            raise SnapshotError(
                f"no published snapshot in {index_dir}; run cohortsim index build first"
            )
    vdir = index_dir / VERSIONS_DIR / version
    if not vdir.is_dir():
        known = ", ".join(list_versions(index_dir)) or "none"
        raise SnapshotError(f"snapshot version {version} not found in {index_dir} (known: {known})")
    manifest = _read_manifest(vdir)
    verify_snapshot(vdir, manifest)
    try:
        index = faiss.read_index(str(vdir / INDEX_FILE))
        metadata = pq.read_table(vdir / METADATA_FILE)
        reference = np.load(vdir / OOD_FILE)
        vectors = vectors_view(index)
        if vectors is None:
            vectors = np.load(vdir / EMBEDDINGS_FILE, mmap_mode="r")
    except (OSError, RuntimeError, ValueError, pa.ArrowException) as exc:
        raise SnapshotError(f"cannot read snapshot {version}: {exc}; rebuild the index") from exc
    listed = np.asarray(manifest.get("ood_reference", []), dtype=np.float64)
    if listed.shape != reference.shape or not np.allclose(listed, reference, atol=1e-6):
        raise SnapshotError(
            f"snapshot {version}: manifest ood_reference disagrees with {OOD_FILE}; "
            "rebuild the index"
        )
    n, d = int(manifest["num_studies"]), int(manifest["dimension"])
    if index.ntotal != n or index.d != d or metadata.num_rows != n or vectors.shape != (n, d):
        raise SnapshotError(
            f"snapshot {version} is inconsistent (index {index.ntotal}x{index.d}, metadata "
            f"{metadata.num_rows} rows, vectors {vectors.shape}, manifest {n}x{d}); "
            "rebuild the index"
        )
    _check_id_map(metadata, version)
    _apply_search_params(index, manifest.get("search_params", {}), gpu=False)
    kind = manifest["index_kind"]
    flat = isinstance(_inner_index(index), faiss.IndexFlat | faiss.IndexScalarQuantizer) and (
        vectors_view(index) is not None
    )

    want_gpu = device in ("cuda", "gpu")
    gpu_index = None
    exact: BlasExactIndex | TorchExactIndex | None = None
    backend = None
    faiss_gpus = faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus")
    if flat and exact_backend in ("blas", "torch"):
        if exact_backend == "blas":
            exact, backend = BlasExactIndex(vectors), "blas"
        else:
            torch_device = "cuda" if device != "cpu" and cuda_visible() else "cpu"
            if want_gpu and torch_device == "cpu":
                raise SnapshotError("device='gpu' was asked for but torch sees no CUDA device")
            exact, backend = _torch_backend(vectors, torch_device), f"torch-{torch_device}"
    elif device != "cpu" and faiss_gpus:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            _apply_search_params(gpu_index, manifest.get("search_params", {}), gpu=True)
            backend = "faiss-gpu"
        except (RuntimeError, AttributeError) as exc:
            if want_gpu and not (flat and cuda_visible()):
                raise SnapshotError(f"index kind {kind} cannot move to the GPU: {exc}") from exc
            log.warning("index: kind %s stays off faiss-gpu (%s)", kind, exc)
    if backend is None and exact is None:
        if device != "cpu" and flat and exact_backend == "auto" and cuda_visible():
            exact, backend = _torch_backend(vectors, "cuda"), "torch-cuda"
        elif want_gpu:
            raise SnapshotError(
                "device='gpu' was asked for but no GPU is usable: faiss sees none (is "
                "faiss-gpu installed?)" + ("" if flat else " and only exact kinds run on torch")
            )
        elif flat:
            backend = "faiss" if exact_backend == "faiss" else "blas"
            exact = None if exact_backend == "faiss" else BlasExactIndex(vectors)
        else:
            backend = "faiss"
    log.info("index: loaded version %s (%d studies, backend %s)", version, n, backend)
    return Snapshot(
        vdir, manifest, index, metadata, vectors, reference, gpu_index, exact=exact, backend=backend
    )
