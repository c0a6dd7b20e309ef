"""Native thread pools of a search (BLAS, OpenMP): capped once, at server start.

Why: an exact search runs in numpy's OpenBLAS (``indexing.exact``), FAISS runs in its own
OpenBLAS and OpenMP. Each starts one spinning thread per core by default. The server
already runs searches in parallel (a batch per worker, the event loop beside it), so
per-call threads only oversubscribe the cores: on the 2-core benchmark VM, with other
jobs running, a 100k x 256 search took 26 ms with 2 BLAS threads against 9 ms with one
(``benchmarks/bench_service.py``, RESULTS.md #6). The server therefore pins the pools to
``DEFAULT_BLAS_THREADS`` per call unless told otherwise (``cohortsim serve
--blas-threads``); parallelism comes from batches in flight instead.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BLAS_THREADS = 1


def limit_native_threads(threads: int | None) -> dict[str, int]:
    """Cap BLAS and OpenMP at ``threads`` per call, process-wide (None: leave as set by
    the environment, e.g. ``OPENBLAS_NUM_THREADS``). Returns the thread count of each
    native pool afterwards (``{"openblas": 1, "openmp": 1}``), for the log.

    Raises ValueError for ``threads`` < 1.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        if isinstance(threads, bool) or int(threads) < 1:
            raise ValueError(f"BLAS threads must be >= 1 (or None: unchanged), got {threads}")
        import faiss

        fa: Any = faiss  # omp_set_num_threads is not in faiss's type stubs
        fa.omp_set_num_threads(int(threads))  # FAISS's OpenMP loops
        threadpool_limits(limits=int(threads))  # every loaded BLAS and OpenMP runtime
    pools: dict[str, int] = {}
    for info in threadpool_info():
        api = str(info.get("internal_api", "?"))
        pools[api] = max(pools.get(api, 0), int(info.get("num_threads", 0)))
    log.info("native threads per call: %s", ", ".join(f"{k} {v}" for k, v in sorted(pools.items())))
    return pools


__all__ = ["DEFAULT_BLAS_THREADS", "limit_native_threads"]
