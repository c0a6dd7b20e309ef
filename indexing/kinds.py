"""FAISS index kinds: factory-string properties, the plain vectors inside an index, and
the default / stored search parameters (nprobe, efSearch)."""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from indexing.errors import (
    SnapshotError,
)

log = logging.getLogger(__name__)


HNSW_EF_SEARCH = (
    256  # recall@10 0.95 at 1M x 256 (0.93 at 128), 0.11 ms a query: benchmarks/RESULTS.md
)


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


def default_search_params(index: faiss.Index) -> dict[str, float]:
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


def apply_search_params(index: faiss.Index, params: dict[str, Any], *, gpu: bool) -> None:
    space_cls = getattr(faiss, "GpuParameterSpace", None) if gpu else faiss.ParameterSpace
    if space_cls is None:
        return
    space = space_cls()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            log.warning("index: could not set %s=%s (%s)", name, value, exc)


def inner_index(index: faiss.Index) -> Any:
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx
