"""Versioned FAISS index snapshots: build, publish atomically, load with checksums.

Layout of an index folder ``INDEX_DIR/``::

    INDEX_DIR/CURRENT                     the served version id (one line)
    INDEX_DIR/versions/<v>/index.faiss    FAISS index; FAISS id i == row i of metadata
    INDEX_DIR/versions/<v>/metadata.parquet   the cohort table (+ ``row_id``), row i <-> id i
    INDEX_DIR/versions/<v>/embeddings.npy     (n, d) float32, L2-normalised (for ``vector``)
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
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexing.errors import DimensionError, QueryError, SnapshotError, UnknownStudyError
from indexing.store import fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRIC = "cosine"
K_OOD = 10
OOD_SAMPLE = 2000
TRAIN_SAMPLE = 100_000
HNSW_EF_SEARCH = 128
GPU_MAX_K = 2048  # faiss GPU indexes answer k <= 2048

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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


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
) -> str:
    """Build, checksum and publish a new snapshot version; returns its id.

    ``embeddings`` ``(n, d)`` float (normalised again here); ``metadata`` the cohort table
    with ``n`` rows in the same order (row i <-> FAISS id i; a ``row_id`` column is set).
    ``kind`` is a FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"...).
    ``search_params`` overrides the stored defaults (``nprobe`` for IVF, ``efSearch`` for
    HNSW). ``progress(stage, done, total)`` is called as work advances.
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
    uids = metadata.column("study_uid")
    if uids.null_count or len(uids.unique()) != n:
        raise SnapshotError("metadata study_uid values must be present and unique")
    if "row_id" in metadata.column_names:
        metadata = metadata.drop_columns(["row_id"])
    metadata = metadata.add_column(0, "row_id", pa.array(np.arange(n, dtype=np.int64)))

    # index
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
    for start in range(0, n, step):
        index.add(vectors[start : start + step])
        report("add", min(start + step, n), n)
    params = _default_search_params(index)
    params.update(search_params or {})
    _apply_search_params(index, params, gpu=False)

    report("ood", 0, 1)
    reference = _ood_reference(index, vectors, k_ood=k_ood, sample=OOD_SAMPLE, seed=seed)
    report("ood", 1, 1)

    # write into a hidden temporary version folder, then publish
    index_dir = Path(index_dir)
    versions = index_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    version = new_version_id(versions)
    tmp = versions / f".tmp-{version}"
    final = versions / version
    try:
        tmp.mkdir()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(metadata, tmp / METADATA_FILE, compression="zstd")
        np.save(tmp / EMBEDDINGS_FILE, vectors)
        np.save(tmp / OOD_FILE, reference)
        if encoder_dir is not None:
            src = Path(encoder_dir)
            if not src.is_dir():
                raise SnapshotError(f"encoder folder {src} does not exist")
            shutil.copytree(src, tmp / ENCODER_DIR)
        payload = sorted(p for p in tmp.rglob("*") if p.is_file())
        files: dict[str, str] = {}
        for i, path in enumerate(payload):
            _fsync_file(path)
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
            "store_version": store_version,
            "faiss_version": faiss.__version__,
            "k_ood": k_ood,
            "ood_reference": [float(v) for v in reference],
            "files": files,
        }
        manifest_path = tmp / MANIFEST_FILE
        with open(manifest_path, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        for sub in sorted({p.parent for p in payload} | {tmp}, reverse=True):
            fsync_dir(sub)
        os.rename(tmp, final)
        fsync_dir(versions)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(index_dir, version)
    report("publish", 1, 1)
    log.info("index: published version %s (%d studies, d=%d, kind=%s)", version, n, d, kind)
    return version


def publish(index_dir: Path | str, version: str) -> None:
    """Point ``CURRENT`` at an existing version (atomic replace; also used for rollback)."""
    index_dir = Path(index_dir)
    if not (index_dir / VERSIONS_DIR / version / MANIFEST_FILE).exists():
        raise SnapshotError(f"version {version} does not exist under {index_dir}")
    tmp = index_dir / f".{CURRENT_FILE}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, index_dir / CURRENT_FILE)
    fsync_dir(index_dir)


# --------------------------------------------------------------------- load
class Snapshot:
    """One loaded, verified snapshot version; safe to search from several threads."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        index: faiss.Index,
        metadata: pa.Table,
        embeddings: np.ndarray,
        ood_reference: np.ndarray,
        gpu_index: faiss.Index | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.metadata = metadata
        self.ood_reference = ood_reference
        self._cpu_index = index
        self._gpu_index = gpu_index
        self._gpu_lock = threading.Lock()  # faiss GPU resources are not thread-safe
        self._embeddings = embeddings
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
        return self._gpu_index is not None

    @property
    def encoder_dir(self) -> Path | None:
        path = self.path / ENCODER_DIR
        return path if path.is_dir() else None

    def __repr__(self) -> str:
        return (
            f"Snapshot(version={self.version!r}, num_studies={self.num_studies}, "
            f"dimension={self.dimension}, kind={self.manifest['index_kind']!r}, gpu={self.gpu})"
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
        }

    # search --------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine for ``(m, d)`` queries (normalised by the caller).

        Returns ``(sims (m, k) float32, rows (m, k) int64)``, best first; where fewer than
        k results exist, rows are -1 and sims -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise DimensionError(
                f"queries must have shape (m, {self.dimension}), got {tuple(q.shape)}"
            )
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if self._gpu_index is not None and k <= GPU_MAX_K:
            with self._gpu_lock:
                sims, rows = self._gpu_index.search(q, int(k))
        else:
            sims, rows = self._cpu_index.search(q, int(k))
        rows = rows.astype(np.int64, copy=False)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32, copy=False)
        return sims, rows

    def vector(self, row: int) -> np.ndarray:
        """The stored L2-normalised ``(d,)`` float32 embedding of ``row``."""
        if not 0 <= int(row) < self.num_studies:
            raise UnknownStudyError(f"row {row} is outside 0..{self.num_studies - 1}")
        return np.array(self._embeddings[int(row)], dtype=np.float32)

    def row_of_study(self, study_uid: str) -> int:
        """The row (FAISS id) of a study pseudonym; raises :class:`UnknownStudyError`."""
        if self._row_of_study is None:
            uids = self.metadata.column("study_uid").to_pylist()
            self._row_of_study = {uid: i for i, uid in enumerate(uids)}
        try:
            return self._row_of_study[study_uid]
        except KeyError:
            raise UnknownStudyError(
                f"study {study_uid} is not in index version {self.version}"
            ) from None

    def rows_of_patient(self, patient_id: str) -> list[int]:
        """All rows of one patient pseudonym (empty when unknown)."""
        if self._rows_of_patient is None:
            table: dict[str, list[int]] = {}
            for i, pid in enumerate(self.metadata.column("patient_id").to_pylist()):
                table.setdefault(pid, []).append(i)
            self._rows_of_patient = table
        return list(self._rows_of_patient.get(patient_id, ()))

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
    for key in ("version", "dimension", "num_studies", "index_kind", "model_version", "files"):
        if key not in manifest:
            raise SnapshotError(f"{path} lacks {key!r}; rebuild the index")
    return manifest


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


def load_snapshot(
    index_dir: Path | str, *, version: str | None = None, device: str = "auto"
) -> Snapshot:
    """Load ``CURRENT`` (or ``version``), verifying every checksum.

    ``device``: "auto" (GPU when faiss sees one), "cpu", or "cuda"/"gpu" (required).
    """
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
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
        embeddings = np.load(vdir / EMBEDDINGS_FILE, mmap_mode="r")
        reference = np.load(vdir / OOD_FILE)
    except (OSError, RuntimeError, ValueError, pa.ArrowException) as exc:
        raise SnapshotError(f"cannot read snapshot {version}: {exc}; rebuild the index") from exc
    listed = np.asarray(manifest.get("ood_reference", []), dtype=np.float64)
    if listed.shape != reference.shape or not np.allclose(listed, reference, atol=1e-6):
        raise SnapshotError(
            f"snapshot {version}: manifest ood_reference disagrees with {OOD_FILE}; "
            "rebuild the index"
        )
    n, d = int(manifest["num_studies"]), int(manifest["dimension"])
    if index.ntotal != n or index.d != d or metadata.num_rows != n or embeddings.shape != (n, d):
        raise SnapshotError(
            f"snapshot {version} is inconsistent (index {index.ntotal}x{index.d}, metadata "
            f"{metadata.num_rows} rows, manifest {n}x{d}); rebuild the index"
        )
    _apply_search_params(index, manifest.get("search_params", {}), gpu=False)

    gpu_index = None
    want_gpu = device in ("cuda", "gpu")
    if device != "cpu" and faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            _apply_search_params(gpu_index, manifest.get("search_params", {}), gpu=True)
        except (RuntimeError, AttributeError) as exc:
            if want_gpu:
                raise SnapshotError(
                    f"index kind {manifest['index_kind']} cannot move to the GPU: {exc}"
                ) from exc
            log.warning("index: kind %s stays on the CPU (%s)", manifest["index_kind"], exc)
    elif want_gpu:
        raise SnapshotError(
            "device='cuda' was asked for but faiss sees no GPU (is faiss-gpu installed?)"
        )
    log.info("index: loaded version %s (%d studies, gpu=%s)", version, n, gpu_index is not None)
    return Snapshot(vdir, manifest, index, metadata, embeddings, reference, gpu_index)
