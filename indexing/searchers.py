"""Search backends of a loaded snapshot behind one interface, and the table that picks one.

Every backend answers ``search(q (m, d) float32, k, mask, params) -> (sims (m, k), rows
(m, k))``, best first, FAISS's conventions (missing hits: row -1, score -inf), and honours
a :class:`RowMask` exactly:

=============  ===============================================================  =========
backend        engine                                                           kinds
=============  ===============================================================  =========
``blas``       :class:`indexing.exact.BlasExactIndex` (numpy SGEMM, all cores)  exact
``torch-*``    :class:`indexing.exact.TorchExactIndex` (CUDA, or the CPU)       exact
``faiss``      the FAISS index on the CPU (ID selectors, widened probes)        any
``faiss-gpu``  faiss-gpu (over-fetch + post-filter; the CPU copy otherwise)     any
=============  ===============================================================  =========

:data:`BACKEND_RULES` is the table :func:`choose_backends` reads: the first rule that
matches what was asked for (device, ``exact_backend``) and what the host has (faiss-gpu,
CUDA for torch) names the backend; a rule may name an error instead. ``faiss-gpu`` can
fail to load an index kind; the loader then goes on down the table.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from indexing.errors import QueryError
from indexing.exact import BlasExactIndex, TorchExactIndex, cuda_visible, faiss_threads_for

__all__ = [
    "BACKEND_RULES",
    "EF_SEARCH_MAX",
    "EXACT_BACKENDS",
    "EXACT_FILTER_MAX_ROWS",
    "FP16_BLAS_MIN_BATCH",
    "GPU_MAX_K",
    "BackendWant",
    "BlasSearcher",
    "FaissGpuSearcher",
    "FaissSearcher",
    "RowMask",
    "SearchParams",
    "Searcher",
    "TorchSearcher",
    "choose_backends",
    "empty_result",
    "make_searcher",
]

GPU_MAX_K = 2048  # faiss GPU indexes answer k <= 2048
EF_SEARCH_MAX = 4096
EXACT_FILTER_MAX_ROWS = 50_000  # approximate kinds: a filter passing fewer rows is searched exactly
EXACT_BACKENDS = ("auto", "blas", "faiss", "torch")
# fp16 storage: below this batch size faiss's SQfp16 kernel beats widening to float32 for
# BLAS (measured in benchmarks/bench_index.py; at 100k x 256 the two meet near 128)
FP16_BLAS_MIN_BATCH = 128


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


def empty_result(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(m, k)`` results with no hits: scores -inf, rows -1."""
    return np.full((m, k), -np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)


def _post_filter(
    sims: np.ndarray, rows: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``k`` results of each row whose id passes ``mask``."""
    m = rows.shape[0]
    out_s, out_r = empty_result(m, k)
    ok = (rows >= 0) & mask[np.maximum(rows, 0)]
    for i in range(m):
        keep = np.flatnonzero(ok[i])[:k]
        out_s[i, : keep.size] = sims[i, keep]
        out_r[i, : keep.size] = rows[i, keep]
    return out_s, out_r


class Searcher(Protocol):
    """One search backend of a snapshot (``name`` is the label ``Snapshot.backend`` shows)."""

    name: str
    gpu: bool

    def search(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of normalised queries ``q`` ``(m, d)`` among the rows ``mask`` allows."""
        ...


class FaissSearcher:
    """The FAISS index on the CPU: exact kinds with an ID selector, approximate kinds with
    per-query nprobe / efSearch (widened by the share a filter passes), an exact scan when
    few rows pass, and exact re-scoring of lossy kinds' candidates.

    ``embeddings`` ``(n, d)`` are the stored vectors (re-scoring, exact scans via
    ``blas``); ``gpu_search`` (set by :class:`FaissGpuSearcher`) answers unfiltered
    default-parameter approximate searches on the GPU.
    """

    name = "faiss"
    gpu = False

    def __init__(
        self,
        index: faiss.Index,
        embeddings: np.ndarray,
        blas: BlasExactIndex,
        *,
        flat: bool,
        kind: str,
        rerank: int,
        ivf: Any,
        hnsw: Any,
    ) -> None:
        self.index = index
        self.embeddings = embeddings
        self.blas = blas
        self.flat = flat
        self.kind = kind
        self.rerank = rerank
        self.ivf = ivf
        self.hnsw = hnsw
        self.exact_filter_max_rows = EXACT_FILTER_MAX_ROWS
        self.gpu_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None

    def search(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.flat:
            return self.search_flat(q, k, mask)
        return self.search_approx(q, k, mask, params)

    def search_flat(
        self, q: np.ndarray, k: int, mask: RowMask | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            with faiss_threads_for(q.shape[0]):
                return self.index.search(q, k)
        sel, bitmap = mask.selector()
        with faiss_threads_for(q.shape[0]):
            sims, rows = self.index.search(q, k, params=self.faiss_params(None, None, sel))
        del bitmap  # the selector reads it during the search
        return sims, rows

    def faiss_params(self, nprobe: int | None, ef: int | None, sel: Any) -> Any:
        """SearchParameters for this index kind (IVF: nprobe, HNSW: efSearch) + selector."""
        fa: Any = faiss  # the SWIG classes are not in faiss's type stubs
        p: Any
        if self.ivf is not None:
            p = fa.SearchParametersIVF()
            p.nprobe = int(nprobe if nprobe is not None else self.ivf.nprobe)
        elif self.hnsw is not None:
            p = fa.SearchParametersHNSW()
            p.efSearch = int(ef if ef is not None else self.hnsw.hnsw.efSearch)
        else:
            p = fa.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def search_approx(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        n = self.embeddings.shape[0]
        if params.nprobe is not None:
            if self.ivf is None:
                raise QueryError(f"nprobe applies to IVF indexes; this one is {self.kind}")
            if not 1 <= params.nprobe <= self.ivf.nlist:
                raise QueryError(
                    f"nprobe must be between 1 and {self.ivf.nlist}; got {params.nprobe}"
                )
        if params.ef_search is not None:
            if self.hnsw is None:
                raise QueryError(f"ef_search applies to HNSW indexes; this one is {self.kind}")
            if not 1 <= params.ef_search <= EF_SEARCH_MAX:
                raise QueryError(
                    f"ef_search must be between 1 and {EF_SEARCH_MAX}; got {params.ef_search}"
                )
        rerank = self.rerank if params.rerank is None else int(params.rerank)
        if not 0 <= rerank <= 64:
            raise QueryError(f"rerank must be between 0 and 64; got {rerank}")
        fetch = min(n, k * rerank) if rerank > 1 else k
        if mask is not None and mask.count <= max(self.exact_filter_max_rows, fetch):
            # few rows pass: scan exactly those (exact, and cheaper than a widened probe)
            return self.blas.search(q, k, allowed=mask.mask)
        nprobe = params.nprobe
        ef = params.ef_search
        sel = bitmap = None
        if mask is not None:
            # a selector drops rows after the probe: widen it by the share that passes
            share = max(mask.share, 1e-6)
            if self.ivf is not None:
                base = nprobe if nprobe is not None else self.ivf.nprobe
                nprobe = int(min(self.ivf.nlist, math.ceil(base / share)))
            if self.hnsw is not None:
                base = ef if ef is not None else self.hnsw.hnsw.efSearch
                ef = int(min(EF_SEARCH_MAX, math.ceil(max(base, fetch) / share)))
            sel, bitmap = mask.selector()
        if (
            self.gpu_search is not None
            and mask is None
            and params.nprobe is None
            and params.ef_search is None
            and fetch <= GPU_MAX_K
        ):
            sims, rows = self.gpu_search(q, fetch)
        else:
            sp = self.faiss_params(nprobe, ef, sel)
            with faiss_threads_for(q.shape[0]):
                sims, rows = self.index.search(q, fetch, params=sp)
        del bitmap  # the selector's memory had to outlive the search
        if rerank > 1:
            return self.rescore(q, rows, k)
        return sims, rows

    def rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of candidate rows ``(m, K)``; top k of each, best first."""
        m = q.shape[0]
        out_s, out_r = empty_result(m, k)
        for i in range(m):
            rows = cand[i][cand[i] >= 0]
            if rows.size == 0:
                continue
            order = np.argsort(rows)  # sorted reads from the memory map
            rows = rows[order]
            sims = np.asarray(self.embeddings[rows], dtype=np.float32) @ q[i]
            top = np.argsort(-sims, kind="stable")[:k]
            out_s[i, : top.size] = sims[top]
            out_r[i, : top.size] = rows[top]
        return out_s, out_r


class BlasSearcher:
    """Exact kinds with numpy's BLAS (:class:`~indexing.exact.BlasExactIndex`); fp16
    storage searched by few queries goes to FAISS's SQfp16 kernel instead (widening the
    vectors to float32 only pays off over many queries)."""

    name = "blas"
    gpu = False

    def __init__(self, exact: BlasExactIndex, faiss_cpu: FaissSearcher) -> None:
        self.exact = exact
        self.faiss_cpu = faiss_cpu

    def search(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.exact.vectors.dtype == np.float16 and q.shape[0] < FP16_BLAS_MIN_BATCH:
            return self.faiss_cpu.search_flat(q, k, mask)
        return self.exact.search(q, k, allowed=None if mask is None else mask.mask)


class TorchSearcher:
    """Exact kinds with ``torch.matmul`` + ``topk`` (:class:`~indexing.exact.TorchExactIndex`),
    for a CUDA host where faiss-gpu does not load (or the CPU when asked for)."""

    def __init__(self, exact: TorchExactIndex) -> None:
        self.exact = exact
        self.name = f"torch-{exact.device.type}"
        self.gpu = exact.device.type == "cuda"

    def search(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.exact.search(q, k, allowed=None if mask is None else mask.mask)


class FaissGpuSearcher:
    """faiss-gpu. GPU indexes ignore ID selectors and answer ``k <= GPU_MAX_K``: exact
    kinds over-fetch by the rows a mask excludes and post-filter, and go to ``exact``
    (BLAS on the CPU copy) when that is too many; approximate kinds use the GPU for
    unfiltered searches with the default parameters and the CPU index otherwise."""

    name = "faiss-gpu"
    gpu = True

    def __init__(self, gpu_index: Any, faiss_cpu: FaissSearcher, exact: Searcher | None) -> None:
        self.gpu_index = gpu_index
        self.faiss_cpu = faiss_cpu
        self.exact = exact
        self._lock = threading.Lock()  # faiss GPU resources are not thread-safe
        faiss_cpu.gpu_search = self.gpu_search

    def gpu_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.gpu_index.search(q, k)

    def search(
        self, q: np.ndarray, k: int, mask: RowMask | None, params: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.faiss_cpu.flat:
            return self.faiss_cpu.search_approx(q, k, mask, params)
        n = self.faiss_cpu.embeddings.shape[0]
        if k <= GPU_MAX_K:
            if mask is None:
                return self.gpu_search(q, k)
            fetch = min(n, k + (n - mask.count))  # over-fetch what the mask may drop
            if fetch <= GPU_MAX_K:
                sims, rows = self.gpu_search(q, fetch)
                return _post_filter(sims, rows, mask.mask, k)
        if self.exact is not None:
            return self.exact.search(q, k, mask, params)
        return self.faiss_cpu.search_flat(q, k, mask)


# ----------------------------------------------------------------- choosing a backend


class BackendWant:
    """What a load asked for and what the host offers (CUDA is probed only when a rule
    needs it: the probe imports torch)."""

    def __init__(self, *, flat: bool, device: str, exact_backend: str, faiss_gpus: bool) -> None:
        self.flat = flat
        self.device = device
        self.exact_backend = exact_backend
        self.faiss_gpus = faiss_gpus

    @property
    def want_gpu(self) -> bool:
        return self.device in ("cuda", "gpu")

    @functools.cached_property
    def cuda(self) -> bool:
        return cuda_visible()


NO_TORCH_CUDA = "error: device='gpu' was asked for but torch sees no CUDA device"
NO_GPU = "error: no GPU"

BACKEND_RULES: tuple[tuple[str, Callable[[BackendWant], bool]], ...] = (
    ("blas", lambda w: w.flat and w.exact_backend == "blas"),
    (
        "torch-cuda",
        lambda w: w.flat and w.exact_backend == "torch" and w.device != "cpu" and w.cuda,
    ),
    (NO_TORCH_CUDA, lambda w: w.flat and w.exact_backend == "torch" and w.want_gpu),
    ("torch-cpu", lambda w: w.flat and w.exact_backend == "torch"),
    ("faiss-gpu", lambda w: w.device != "cpu" and w.faiss_gpus),
    ("torch-cuda", lambda w: w.device != "cpu" and w.flat and w.exact_backend == "auto" and w.cuda),
    (NO_GPU, lambda w: w.want_gpu),
    ("faiss", lambda w: w.flat and w.exact_backend == "faiss"),
    ("blas", lambda w: w.flat),
    ("faiss", lambda w: True),
)
"""``(backend or error, condition)`` in order of preference. ``exact_backend`` "blas" /
"torch" apply to exact kinds only; "auto" prefers faiss-gpu, then torch on CUDA, then
BLAS on the CPU (exact kinds) or FAISS (approximate kinds)."""


def choose_backends(want: BackendWant) -> list[str]:
    """The backends :data:`BACKEND_RULES` names for ``want``, best first, up to and
    including the first that cannot fail to load (everything but ``faiss-gpu``) or the
    first error (a string starting ``"error: "``)."""
    out: list[str] = []
    for backend, applies in BACKEND_RULES:
        if not applies(want) or backend in out:
            continue
        out.append(backend)
        if backend != "faiss-gpu":
            break
    return out


def make_searcher(
    faiss_cpu: FaissSearcher,
    *,
    gpu_index: Any = None,
    exact: BlasExactIndex | TorchExactIndex | None = None,
    backend: str | None = None,
) -> Searcher:
    """The searcher of one loaded index: ``gpu_index`` (faiss-gpu) when given, else the
    ``exact`` engine for exact kinds (BLAS unless ``backend`` is ``"faiss"``), else the
    FAISS CPU index ``faiss_cpu``."""
    flat = faiss_cpu.flat
    if exact is None and flat and backend != "faiss":
        exact = faiss_cpu.blas  # also the CPU fallback of faiss-gpu (filters, many deletions)
    exact_searcher: Searcher | None = None
    if isinstance(exact, TorchExactIndex):
        exact_searcher = TorchSearcher(exact)
    elif isinstance(exact, BlasExactIndex):
        exact_searcher = BlasSearcher(exact, faiss_cpu)
    if gpu_index is not None:
        return FaissGpuSearcher(gpu_index, faiss_cpu, exact_searcher)
    if flat and exact_searcher is not None:
        return exact_searcher
    return faiss_cpu
