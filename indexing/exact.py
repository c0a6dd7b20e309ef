"""Exact top-k inner-product search without FAISS: a BLAS path and a torch path.

Why a second exact path exists (measured in ``benchmarks/bench_index.py``): faiss-cpu's
flat search picks its kernel by ``nq * d < distance_compute_blas_threshold`` (128,000 in
faiss 1.15). Below it (under 500 queries at d = 256, i.e. every batch a service sees,
and *every* search that carries an ID selector) each query streams the whole database
through a SIMD dot-product loop on its own thread, so a batch costs ``nq`` full memory
passes instead of one. Above it, FAISS multiplies in 1,024-row database blocks and
updates heaps in an OpenMP region after each block. :class:`BlasExactIndex` instead
runs one SGEMM per large block of database rows (numpy's BLAS, all cores), so a batch
costs one memory pass, and picks the top k with a group-max pre-selection (two cheap
SIMD passes over the scores, then a partial sort of k groups instead of all rows). :class:`TorchExactIndex` does the same with ``torch.matmul`` +
``torch.topk`` on a CUDA device (or the CPU), for hosts where faiss-gpu cannot load.

Thread setup: FAISS parallelises with OpenMP, numpy's BLAS with its own thread pool;
on a small box with busy cores, a parallel region whose threads are not all running
waits for them (a scheduler slice, ~10 ms). :func:`faiss_threads_for` caps a FAISS
call at one thread per query, which matters where FAISS opens a region on every thread
for a single query (``IndexScalarQuantizer``: 26 ms -> 0.2 ms p50 for one query at
load 13, ``benchmarks/RESULTS.md``).

Both return exactly FAISS ``IndexFlatIP``'s answer (same rows; similarities equal to
float32 rounding), honour a row mask exactly, and are checked against FAISS in
``tests/indexing/test_exact.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Scores held at once per block: rows x queries <= this many float32 (32 MiB): larger blocks
# amortise the per-row cost of the top-k selection (tuned in benchmarks/bench_index.py).
BLOCK_SCORES = 1 << 23
MIN_BLOCK_ROWS = 4096
# Below this share of allowed rows a masked search multiplies only the allowed rows
# (gathered: ~10x a scanned row's cost, so for a few queries only when few rows pass;
# at 1M x 256 one query under a 20 % filter took 50 ms gathered vs 20 ms unfiltered).
SUBSET_SHARE = 0.25
SUBSET_SHARE_FEW = 0.05  # the same for batches of fewer than SUBSET_FEW_QUERIES queries
SUBSET_FEW_QUERIES = 4
SUBSET_BLOCK_ROWS = 32768
GROUP = 32  # group size of the group-max pre-selection (a power of two)


def _empty(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((m, k), -np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)


def _finish(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's conventions on ``(m, kk)`` top-k results: a non-finite score means no hit
    (id -1, score -inf); rows are padded with such empty hits up to ``k`` columns."""
    ids[~np.isfinite(vals)] = -1
    vals[ids < 0] = -np.inf
    m, kk = vals.shape
    if kk < k:
        pad_v, pad_i = _empty(m, k - kk)
        vals = np.concatenate([vals, pad_v], axis=1)
        ids = np.concatenate([ids, pad_i], axis=1)
    return vals, ids


def _group_max(scores: np.ndarray, groups: int) -> np.ndarray:
    """``(m, groups)``: column j is the max of ``scores[:, j + i * groups]`` for i < GROUP.

    Halving in place (``GROUP`` is a power of two): each step is one contiguous SIMD
    ``maximum`` over half the remaining columns, about two passes over the scores in all.
    """
    n0 = groups * GROUP
    width = n0 // 2
    tmp = np.maximum(scores[:, :width], scores[:, width:n0])
    while width > groups:
        half = width // 2
        np.maximum(tmp[:, :half], tmp[:, half:width], out=tmp[:, :half])
        width = half
    return tmp[:, :groups]


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each row of ``scores`` ``(m, n)`` float32, best first.

    Returns ``(values (m, k) float32, columns (m, k) int64)``; entries that are ``-inf``
    (masked) or missing (``k > n``) come back as ``-inf`` / ``-1``. Exact: for large
    ``n`` a group-max pre-selection keeps only the ``k`` groups whose maximum is highest
    (a top-k element's group always has one of the k highest maxima), then ranks those.
    """
    m, n = scores.shape
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    kk = min(k, n)
    if kk == 0:
        return _empty(m, k)
    groups = n // GROUP
    if kk * GROUP * 8 <= n and groups >= kk:
        gmax = _group_max(scores, groups)
        n0 = groups * GROUP
        top_groups = np.argpartition(gmax, groups - kk, axis=1)[:, groups - kk :]
        cand = (top_groups[:, :, None] + groups * np.arange(GROUP)[None, None, :]).reshape(m, -1)
        if n0 < n:
            tail = np.broadcast_to(np.arange(n0, n), (m, n - n0))
            cand = np.concatenate([cand, tail], axis=1)
        cand_scores = np.take_along_axis(scores, cand, axis=1)
    else:
        cand = None
        cand_scores = scores
    c = cand_scores.shape[1]
    part = np.argpartition(cand_scores, c - kk, axis=1)[:, c - kk :]
    vals = np.take_along_axis(cand_scores, part, axis=1)
    cols = part if cand is None else np.take_along_axis(cand, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    vals = np.take_along_axis(vals, order, axis=1).astype(np.float32, copy=False)
    cols = np.take_along_axis(cols, order, axis=1).astype(np.int64, copy=False)
    return _finish(vals, cols, k)


def _merge(
    best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    vals = np.concatenate([best[0], new[0]], axis=1)
    rows = np.concatenate([best[1], new[1]], axis=1)
    top_v, idx = topk_rows(vals, k)
    top_r = np.take_along_axis(rows, np.maximum(idx, 0), axis=1)
    top_r[idx < 0] = -1
    return top_v, top_r


class BlasExactIndex:
    """Exact inner-product top-k over ``vectors`` ``(n, d)`` (float32 or float16) with BLAS.

    The array is used in place (a view into a FAISS index or a memory map is fine).
    float16 storage is widened block by block, so memory stays at 2 bytes per value.
    """

    kind = "blas"

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.dtype not in (np.float32, np.float16):
            raise ValueError(f"vectors must be (n, d) float32 or float16, got {vectors.dtype} {vectors.shape}")
        self.vectors = vectors
        self.ntotal, self.d = vectors.shape

    def _block(self, rows: slice | np.ndarray) -> np.ndarray:
        block = self.vectors[rows]
        return block if block.dtype == np.float32 else block.astype(np.float32)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product of ``(m, d)`` float32 queries; ``allowed`` ``(n,)`` bool.

        Returns ``(sims (m, k) float32, rows (m, k) int64)``, best first, -inf / -1 padded.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        m = q.shape[0]
        n = self.ntotal
        if m == 0 or n == 0:
            return _empty(m, k)
        if allowed is not None:
            count = int(np.count_nonzero(allowed))
            if count == 0:
                return _empty(m, k)
            if count == n:
                allowed = None
            elif count <= (SUBSET_SHARE if m >= SUBSET_FEW_QUERIES else SUBSET_SHARE_FEW) * n:
                return self._search_subset(q, k, np.flatnonzero(allowed))
        step = max(MIN_BLOCK_ROWS, BLOCK_SCORES // max(m, 1))
        best = _empty(m, k)
        buf = np.empty((m, min(step, n)), dtype=np.float32)
        for start in range(0, n, step):
            stop = min(n, start + step)
            scores = buf[:, : stop - start]
            np.matmul(q, self._block(slice(start, stop)).T, out=scores)
            if allowed is not None:
                np.copyto(scores, -np.inf, where=~allowed[None, start:stop])
            vals, cols = topk_rows(scores, k)
            cols = np.where(cols >= 0, cols + start, -1)
            best = (vals, cols) if start == 0 else _merge(best, (vals, cols), k)
        return best

    def _search_subset(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = q.shape[0]
        # gathered rows are copied: at most SUBSET_BLOCK_ROWS of them at a time
        step = min(SUBSET_BLOCK_ROWS, max(MIN_BLOCK_ROWS, BLOCK_SCORES // max(m, 1)))
        best = _empty(m, k)
        for start in range(0, rows.size, step):
            ids = rows[start : start + step]
            scores = q @ self._block(ids).T
            vals, cols = topk_rows(scores, k)
            found = np.where(cols >= 0, ids[np.maximum(cols, 0)], -1)
            best = (vals, found) if start == 0 else _merge(best, (vals, found), k)
        return best


def recall_at_k(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of the reference neighbours that a search found: recall@k.

    ``reference``: ``(m, k)`` rows of the exact top k (-1 = padding, not counted);
    ``candidate``: ``(m, k')`` rows of the search scored, k' >= k (its first k columns
    count). 1.0 when there is no reference neighbour at all.
    """
    ref = np.asarray(reference)
    cand = np.asarray(candidate)[:, : ref.shape[1]]
    hits = sum(len(set(r[r >= 0]) & set(c[c >= 0])) for r, c in zip(ref, cand, strict=True))
    total = int((ref >= 0).sum())
    return hits / total if total else 1.0


@contextlib.contextmanager
def faiss_threads_for(nq: int) -> Iterator[None]:
    """Run this thread's enclosed FAISS calls on at most ``nq`` OpenMP threads.

    Some FAISS searches (``IndexScalarQuantizer``, the fp16 kinds' small-batch path) open
    an OpenMP region on every thread even for one query: one thread works and the others
    only join the closing barrier. When the cores are busy a woken thread can wait a
    scheduler slice (~10 ms) before it runs, so a 0.1 ms query takes 10-50 ms (measured
    in ``benchmarks/bench_index.py`` and benchmarks/RESULTS.md). OpenMP's thread count is
    a per-thread setting, so this is safe while other threads search.
    """
    import faiss

    before = faiss.omp_get_max_threads()
    want = max(1, min(int(nq), before))
    if want == before:
        yield
        return
    faiss.omp_set_num_threads(want)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def cuda_visible() -> bool:
    """True when a CUDA device can be used by torch (imports torch only if a driver exists)."""
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


class TorchExactIndex:
    """Exact inner-product top-k with ``torch.matmul`` + ``torch.topk`` (CUDA or CPU).

    The database lives on ``device`` as float32 (or float16 with ``half=True``, scored
    in float32 accumulation by cuBLAS). TF32 is not used, so float32 results match
    FAISS ``IndexFlatIP`` to float32 rounding.
    """

    kind = "torch"

    def __init__(self, vectors: np.ndarray, *, device: str = "cuda", half: bool = False) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.ntotal, self.d = vectors.shape
        dtype = torch.float16 if half else torch.float32
        self.dtype = dtype
        # copied in slices: the source may be a read-only view or a memory map
        self.x = torch.empty((self.ntotal, self.d), dtype=dtype, device=self.device)
        step = max(1, (64 << 20) // max(4 * self.d, 1))
        for s in range(0, self.ntotal, step):
            part = np.array(vectors[s : s + step], dtype=np.float32)
            self.x[s : s + step] = torch.from_numpy(part).to(self.device, dtype=dtype)
        self._mask_cache: tuple[np.ndarray, Any] | None = None
        self._host_index: BlasExactIndex | None = None

    def _device_mask(self, allowed: np.ndarray) -> Any:
        cached = self._mask_cache  # (the host array itself, its device copy)
        if cached is not None and cached[0] is allowed:
            return cached[1]
        mask = self._torch.from_numpy(np.array(allowed, dtype=bool)).to(self.device)
        self._mask_cache = (allowed, mask)
        return mask

    def _search_chunk(self, q: np.ndarray, kk: int, mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top ``kk`` ``(values, rows)`` of queries ``q`` ``(c, d)`` on the device."""
        qt = self._torch.from_numpy(q).to(self.device, dtype=self.dtype)
        scores = (qt @ self.x.T).float()
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        vals, idx = self._torch.topk(scores, kk, dim=1, largest=True, sorted=True)
        return vals.cpu().numpy(), idx.cpu().numpy()

    def _host(self) -> BlasExactIndex:
        """A CPU copy of the database (made on the first out-of-memory fallback)."""
        if self._host_index is None:
            self._host_index = BlasExactIndex(self.x.cpu().float().numpy())
        return self._host_index

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` ``(similarities (m, k) float32, rows (m, k) int64)`` of ``queries``.

        Out of GPU memory, the queries are searched in smaller chunks (halved down to one
        at a time), then on a CPU copy of the database (:class:`BlasExactIndex`), with a
        warning each time; the call does not fail."""
        torch = self._torch
        q = np.ascontiguousarray(queries, dtype=np.float32)
        m, n = q.shape[0], self.ntotal
        if m == 0 or n == 0:
            return _empty(m, k)
        kk = min(k, n)
        mask = None if allowed is None else self._device_mask(allowed)
        out_v = np.empty((m, kk), dtype=np.float32)
        out_r = np.empty((m, kk), dtype=np.int64)
        chunk = max(1, (1 << 27) // max(n, 1))  # <= 512 MiB of scores at a time
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode():
                s = 0
                while s < m:
                    try:
                        vals, idx = self._search_chunk(q[s : s + chunk], kk, mask)
                    except torch.OutOfMemoryError:
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        if chunk == 1:  # not even one query fits: the rest on the CPU
                            log.warning(
                                "out of memory searching on %s; searching on the CPU", self.device
                            )
                            v, r = self._host().search(q[s:], kk, allowed=allowed)
                            out_v[s:], out_r[s:] = v, r
                            break
                        chunk = max(1, chunk // 2)
                        log.warning(
                            "out of memory searching on %s; retrying %d queries at a time",
                            self.device,
                            chunk,
                        )
                        continue
                    out_v[s : s + chunk] = vals
                    out_r[s : s + chunk] = idx
                    s += chunk
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return _finish(out_v, out_r, k)


__all__ = [
    "BlasExactIndex",
    "TorchExactIndex",
    "cuda_visible",
    "faiss_threads_for",
    "recall_at_k",
    "topk_rows",
]
