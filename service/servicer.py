"""The gRPC servicer: validate the request, call plain functions, convert the answer.

Blocking work (FAISS search, DICOM decoding, encoder inference) runs on a thread pool so
the event loop never blocks; domain exceptions become gRPC status codes in
``service.errors`` (one place).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from encoders.errors import EncoderError
from indexing.errors import ModelVersionError
from indexing.query import QueryResult, search_similar
from indexing.snapshot import Snapshot, load_snapshot
from service import convert
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.errors import failed_precondition, grpc_errors, invalid_argument, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Until the indexing package evaluates Filter.where, every non-empty filter is refused here.
FILTERS_SUPPORTED = False


@dataclass(frozen=True)
class Limits:
    """Request limits (the byte size of a request is capped by the server's options)."""

    default_k: int = 10
    max_k: int = 1000
    max_files: int = 4096


@dataclass(frozen=True)
class EmbeddedStudy:
    """A DICOM study embedded by the server's encoder."""

    vector: np.ndarray  # (d,) float32, L2-normalised
    model_version: str
    acquisition: dict[str, str]


def _torch_device(device: str) -> str:
    """The snapshot's device argument ("auto", "cpu", "cuda", "gpu") for torch."""
    return "cuda" if device == "gpu" else device


class ServiceState:
    """What the server serves: one snapshot and, loaded on first use, its encoder.

    ``snapshot`` is None when loading failed (``load_error`` says why, for the log); every
    call then fails with UNAVAILABLE. The encoder is loaded once, under a lock, on a worker
    thread, and only if a DICOM query arrives.
    """

    def __init__(
        self,
        snapshot: Snapshot | None,
        *,
        load_error: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.snapshot = snapshot
        self.load_error = load_error
        self.device = device
        self._encoder: tuple[Any, Any] | None = None
        self._encoder_error: BaseException | None = None
        self._encoder_lock = threading.Lock()
        self._embed_lock = threading.Lock()

    @classmethod
    def load(cls, index_dir: Path, *, device: str = "auto") -> ServiceState:
        """Load the current snapshot of ``index_dir``; a failure is kept, not raised."""
        try:
            snapshot = load_snapshot(index_dir, device=device)
        except Exception as exc:
            log.error("no index loaded (%s); health is NOT_SERVING", type(exc).__name__)
            log.error("load error: %s", exc)  # paths and versions only, never patient data
            return cls(None, load_error=str(exc), device=_torch_device(device))
        return cls(snapshot, device=_torch_device(device))

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    @property
    def index_version(self) -> str | None:
        return self.snapshot.version if self.snapshot is not None else None

    def require_snapshot(self) -> Snapshot:
        if self.snapshot is None:
            raise unavailable(
                "INDEX_UNAVAILABLE",
                "the server has no usable index snapshot (see its log); build one with "
                "`cohortsim index build` and restart the server",
            )
        return self.snapshot

    @property
    def dicom_supported(self) -> bool:
        return self.snapshot is not None and self.snapshot.encoder_dir is not None

    def encoder(self) -> tuple[Any, Any]:
        """``(StudyEncoder, EncoderCard)`` of the snapshot; blocking (call on a worker)."""
        snapshot = self.require_snapshot()
        encoder_dir = snapshot.encoder_dir
        if encoder_dir is None:
            raise failed_precondition(
                "NO_ENCODER",
                "this index was built from precomputed embeddings; send an embedding",
            )
        with self._encoder_lock:
            if self._encoder is None and self._encoder_error is None:
                from encoders.model import load_encoder  # torch: imported on first DICOM query

                try:
                    encoder, card = load_encoder(encoder_dir, device=self.device)
                except EncoderError as exc:
                    log.error("encoder of index %s unusable: %s", snapshot.version, exc)
                    self._encoder_error = exc
                else:
                    if card.version != snapshot.model_version:
                        self._encoder_error = ModelVersionError(
                            f"the index holds embeddings of model {snapshot.model_version} but "
                            f"its encoder is {card.version}; rebuild the index with one encoder"
                        )
                    else:
                        self._encoder = (encoder, card)
                        log.info("encoder %s loaded", card.version)
            if self._encoder_error is not None:
                raise self._encoder_error
            assert self._encoder is not None
            return self._encoder

    def embed_dicom(self, files: list[bytes]) -> EmbeddedStudy:
        """Decode, preprocess and embed one study's DICOM files; blocking."""
        from encoders.dicom import preprocess, read_study
        from encoders.model import embed

        encoder, card = self.encoder()
        study = read_study(files)
        volume = preprocess(study, card.input)
        with self._embed_lock:  # one inference at a time: the cores are shared with FAISS
            vector = embed(encoder, volume[None], device=self.device)[0]
        acquisition = {
            str(k): str(v) for k, v in (study.acquisition or {}).items() if v is not None
        }
        return EmbeddedStudy(vector.astype(np.float32), card.version, acquisition)


def search(
    state: ServiceState, snapshot: Snapshot, query: convert.SearchQuery, *, max_k: int
) -> QueryResult:
    """Run one validated query against ``snapshot``; blocking.

    A ``study_uid`` query excludes the study itself and every other study of the same
    patient (their outcome is the query patient's own, so it must not predict it).
    """
    kwargs: dict[str, Any] = {}
    if query.kind == "embedding":
        vector = query.embedding
    elif query.kind == "study_uid":
        row = snapshot.row_of_study(query.study_uid)
        vector = snapshot.vector(row)
        kwargs["exclude_rows"] = [row]
        patient = snapshot.metadata.column("patient_id")[row].as_py()
        kwargs["exclude_patients"] = [patient]
    else:
        embedded = state.embed_dicom(query.dicom_files)
        vector = embedded.vector
        kwargs["query_acquisition"] = [embedded.acquisition]
    results = search_similar(snapshot, vector[None, :], query.k, max_k=max_k, **kwargs)
    return results[0]


class PatientSimilarityServicer(cohortsim_pb2_grpc.PatientSimilarityServiceServicer):
    """Thin asyncio servicer over a :class:`ServiceState`."""

    def __init__(
        self,
        state: ServiceState,
        *,
        executor: Executor | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.state = state
        self.limits = limits or Limits()
        self._executor = executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _check_filter(self, where: str) -> str:
        """The one place that decides whether a filter can be honoured."""
        if where.strip() and not FILTERS_SUPPORTED:
            raise invalid_argument(
                "FILTER_UNSUPPORTED",
                "filters are not supported by this server version yet; send the query "
                "without filter.where",
            )
        return where.strip()

    @grpc_errors
    async def SearchSimilar(
        self, request: cohortsim_pb2.SearchSimilarRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.SearchSimilarResponse:
        snapshot = self.state.require_snapshot()
        query = convert.parse_search_request(
            request,
            dimension=snapshot.dimension,
            default_k=self.limits.default_k,
            max_k=self.limits.max_k,
            max_files=self.limits.max_files,
        )
        self._check_filter(query.where)
        if query.kind == "dicom" and snapshot.encoder_dir is None:
            self.state.encoder()  # raises the FAILED_PRECONDITION without touching the files
        result = await self._run(
            functools.partial(search, max_k=self.limits.max_k), self.state, snapshot, query
        )
        time_unit = str(snapshot.manifest.get("time_unit") or convert.DEFAULT_TIME_UNIT)
        return convert.search_response(result, time_unit=time_unit)

    @grpc_errors
    async def EmbedStudy(
        self, request: cohortsim_pb2.EmbedStudyRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.EmbedStudyResponse:
        snapshot = self.state.require_snapshot()
        files = convert.parse_dicom(request.dicom, max_files=self.limits.max_files)
        if snapshot.encoder_dir is None:
            self.state.encoder()  # raises NO_ENCODER
        embedded = await self._run(self.state.embed_dicom, files)
        return convert.embed_response(embedded.vector, embedded.model_version, embedded.acquisition)

    @grpc_errors
    async def GetIndexInfo(
        self, request: cohortsim_pb2.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.GetIndexInfoResponse:
        snapshot = self.state.require_snapshot()
        return convert.index_info_response(
            snapshot.info(), max_k=self.limits.max_k, dicom_supported=self.state.dicom_supported
        )


__all__ = [
    "FILTERS_SUPPORTED",
    "EmbeddedStudy",
    "Limits",
    "PatientSimilarityServicer",
    "ServiceState",
    "search",
]
