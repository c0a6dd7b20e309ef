"""A loaded, verified snapshot version and how it is loaded.

:class:`Snapshot` holds one version's index, cohort table, vectors and OOD reference; it
answers filtered, tombstone-aware top-k searches through one searcher
(:mod:`indexing.searchers`: BLAS, torch, FAISS CPU or faiss-gpu, chosen by
:func:`indexing.searchers.choose_backends` in :func:`load_snapshot`). Versions on disk
(publish, rollback, prune, manifests) are :mod:`indexing.versions`; building one is
:mod:`indexing.snapshot_build`. The names callers used from this module stay importable
here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indexing.errors import (
    DimensionError,
    QueryError,
    SnapshotError,
    UnknownStudyError,
)
from indexing.exact import BlasExactIndex, TorchExactIndex
from indexing.filter import FilterCache, canonical_where

# Re-exported: the names callers import from indexing.snapshot.
from indexing.kinds import (
    HNSW_EF_SEARCH,
    apply_search_params,
    fp16_kind,
    inner_index,
    is_lossy_kind,
    vectors_view,
)
from indexing.searchers import (
    EXACT_BACKENDS,
    NO_GPU,
    NO_TORCH_CUDA,
    BackendWant,
    FaissSearcher,
    RowMask,
    SearchParams,
    choose_backends,
    empty_result,
    make_searcher,
)
from indexing.snapshot_build import (
    K_OOD,
    METRIC,
    OOD_SAMPLE,
    RERANK_FACTOR,
    TRAIN_SAMPLE,
    build_snapshot,
    normalize_rows,
)
from indexing.tombstones import TOMBSTONE_FILE, TombstoneWatch
from indexing.versions import (
    BUILD_MANIFEST_KEYS,
    CURRENT_FILE,
    EMBEDDINGS_FILE,
    ENCODER_DIR,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    OOD_FILE,
    VERSIONS_DIR,
    check_id_map,
    current_version,
    list_versions,
    load_manifest,
    new_version_id,
    prune_versions,
    publish,
    read_manifest,
    republish_metadata,
    rollback,
    verify_snapshot,
)

__all__ = [
    "BUILD_MANIFEST_KEYS",
    "CURRENT_FILE",
    "EMBEDDINGS_FILE",
    "ENCODER_DIR",
    "FORMAT_VERSION",
    "HNSW_EF_SEARCH",
    "INDEX_FILE",
    "K_OOD",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "METRIC",
    "OOD_FILE",
    "OOD_SAMPLE",
    "RERANK_FACTOR",
    "TRAIN_SAMPLE",
    "VERSIONS_DIR",
    "RowMask",
    "SearchParams",
    "Snapshot",
    "build_snapshot",
    "current_version",
    "fp16_kind",
    "is_lossy_kind",
    "list_versions",
    "load_snapshot",
    "new_version_id",
    "normalize_rows",
    "prune_versions",
    "publish",
    "read_manifest",
    "republish_metadata",
    "rollback",
    "verify_snapshot",
]

log = logging.getLogger(__name__)


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
        self._embeddings = embeddings
        inner = inner_index(index)
        self.is_flat = isinstance(inner, faiss.IndexFlat) or (
            isinstance(inner, faiss.IndexScalarQuantizer)
            and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        )
        self._ivf = faiss.try_extract_index_ivf(index) if not self.is_flat else None
        self._hnsw = inner if isinstance(inner, faiss.IndexHNSW) else None
        self.rerank = int(manifest.get("rerank", 0) or 0)
        blas = exact if isinstance(exact, BlasExactIndex) else BlasExactIndex(embeddings)
        self._faiss = FaissSearcher(
            index,
            embeddings,
            blas,
            flat=self.is_flat,
            kind=str(manifest.get("index_kind", "")),
            rerank=self.rerank,
            ivf=self._ivf,
            hnsw=self._hnsw,
        )
        self.searcher = make_searcher(
            self._faiss, gpu_index=gpu_index, exact=exact, backend=backend
        )
        self.backend = self.searcher.name
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
        return self.searcher.gpu

    @property
    def exact_filter_max_rows(self) -> int:
        """Approximate kinds: a filter passing at most this many rows is scanned exactly."""
        return self._faiss.exact_filter_max_rows

    @exact_filter_max_rows.setter
    def exact_filter_max_rows(self, rows: int) -> None:
        self._faiss.exact_filter_max_rows = int(rows)

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
                raise QueryError(
                    f"allowed must be a ({self.num_studies},) bool mask, got {a.shape}"
                )
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
            return empty_result(q.shape[0], k)
        if self.is_flat and (params.nprobe is not None or params.ef_search is not None):
            raise QueryError(
                f"nprobe / ef_search tune approximate indexes; this index is "
                f"{self.manifest['index_kind']} (exact)"
            )
        sims, rows = self.searcher.search(q, k, mask, params)
        rows = rows.astype(np.int64, copy=False)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32, copy=False)
        return sims, rows

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
    manifest = load_manifest(vdir)
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
    check_id_map(metadata, version)
    apply_search_params(index, manifest.get("search_params", {}), gpu=False)
    kind = manifest["index_kind"]
    flat = isinstance(inner_index(index), faiss.IndexFlat | faiss.IndexScalarQuantizer) and (
        vectors_view(index) is not None
    )

    want = BackendWant(
        flat=flat,
        device=device,
        exact_backend=exact_backend,
        faiss_gpus=faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"),
    )
    gpu_index = None
    exact: BlasExactIndex | TorchExactIndex | None = None
    backend = ""
    for backend in choose_backends(want):
        if backend == NO_TORCH_CUDA:
            raise SnapshotError("device='gpu' was asked for but torch sees no CUDA device")
        if backend == NO_GPU:
            raise SnapshotError(
                "device='gpu' was asked for but no GPU is usable: faiss sees none (is "
                "faiss-gpu installed?)" + ("" if flat else " and only exact kinds run on torch")
            )
        if backend == "faiss-gpu":
            try:
                gpu_index = faiss.index_cpu_to_all_gpus(index)
                apply_search_params(gpu_index, manifest.get("search_params", {}), gpu=True)
                break
            except (RuntimeError, AttributeError) as exc:
                gpu_index = None
                if want.want_gpu and not (flat and want.cuda):
                    raise SnapshotError(f"index kind {kind} cannot move to the GPU: {exc}") from exc
                log.warning("index: kind %s stays off faiss-gpu (%s)", kind, exc)
                continue
        if backend == "blas":
            exact = BlasExactIndex(vectors)
        elif backend.startswith("torch-"):
            exact = TorchExactIndex(vectors, device=backend[6:], half=vectors.dtype == np.float16)
    log.info("index: loaded version %s (%d studies, backend %s)", version, n, backend)
    return Snapshot(
        vdir, manifest, index, metadata, vectors, reference, gpu_index, exact=exact, backend=backend
    )
