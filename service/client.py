"""Typed Python client of the cohortsim gRPC API (sync and asyncio).

    with CohortsimClient("127.0.0.1:50051") as client:
        result = client.search(study_uid="S-...", k=10)
        for n in result.neighbors:
            print(n.patient_id, n.similarity, n.time, n.event)

Answers are plain dataclasses that mirror the proto messages (no protobuf types leak out);
every failed call raises :class:`CohortsimClientError` carrying the status code name, the
server's message and, when the server sent one, the machine-readable ``ErrorInfo`` reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import SERVICE_FULL_NAME, cohortsim_pb2, cohortsim_pb2_grpc

DEFAULT_MAX_MESSAGE_MB = 64
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


# --------------------------------------------------------------------------- errors


class CohortsimClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ...),
    ``reason`` the server's ErrorInfo reason (``"WRONG_DIMENSION"``, ...) or ``None``."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(code, message, reason)
        self.code = code
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        tail = f" [{self.reason}]" if self.reason and self.reason != self.code else ""
        return f"{self.code}: {self.message}{tail}"

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> CohortsimClientError:
        """Build from a sync or asyncio ``grpc.RpcError`` (reads the ErrorInfo detail)."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else None
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        message = " ".join(str(details or name.lower().replace("_", " ")).split())
        return cls(name, message, _error_reason(trailing))


def _error_reason(trailing: Any) -> str | None:
    for key, value in trailing or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason or None
    return None


# --------------------------------------------------------------------------- results


@dataclass
class Neighbor:
    """One similar study (``Neighbor`` + its ``Outcome`` in the proto)."""

    patient_id: str
    study_uid: str
    similarity: float
    site: str
    weight: float
    acquisition: dict[str, str] = field(default_factory=dict)
    time: float | None = None
    event: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class SurvivalPoint:
    """One step of the weighted Kaplan–Meier curve with its 95% band."""

    time: float
    survival: float
    lower: float
    upper: float
    at_risk: int


@dataclass
class HorizonEstimate:
    """Survival at a fixed horizon with its 95% interval (None beyond the follow-up)."""

    time: float
    survival: float | None
    lower: float | None
    upper: float | None


@dataclass
class LabelShare:
    """Weighted share of one category of a categorical outcome."""

    label: str
    share: float
    lower: float
    upper: float
    count: int


@dataclass
class LabelDistribution:
    """Distribution of one categorical outcome among the neighbours."""

    name: str
    shares: list[LabelShare] = field(default_factory=list)


@dataclass
class ValueSummary:
    """Weighted mean of one numeric outcome with its 95% interval."""

    name: str
    mean: float
    lower: float | None
    upper: float | None
    count: int


@dataclass
class Prognosis:
    """What the neighbours' outcomes say (similarity-weighted, with uncertainty)."""

    survival: list[SurvivalPoint] = field(default_factory=list)
    median_survival: float | None = None
    median_lower: float | None = None
    median_upper: float | None = None
    at_horizons: list[HorizonEstimate] = field(default_factory=list)
    effective_sample_size: float = 0.0
    neighbors_with_outcome: int = 0
    events: int = 0
    label_distributions: list[LabelDistribution] = field(default_factory=list)
    value_summaries: list[ValueSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    time_unit: str = ""


@dataclass
class Diagnostics:
    """How typical the query is and how comparable its neighbours are."""

    ood_percentile: float = 0.0
    mean_similarity: float = 0.0
    same_scanner_share: float | None = None
    cohort_scanner_share: float | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class SearchResult:
    """The answer to one similarity search."""

    neighbors: list[Neighbor]
    prognosis: Prognosis
    diagnostics: Diagnostics
    index_version: str
    model_version: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``None`` for unknown values, never NaN)."""
        return _json_safe(dataclasses.asdict(self))


@dataclass
class IndexInfo:
    """Description of the served index snapshot."""

    num_studies: int
    dimension: int
    metric: str
    index_kind: str
    model_version: str
    index_version: str
    gpu: bool
    create_time: datetime | None = None
    max_k: int = 0
    dicom_supported: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["create_time"] = self.create_time.isoformat() if self.create_time else None
        return d


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- proto -> dataclass


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def search_result_from_proto(resp: cohortsim_pb2.SearchSimilarResponse) -> SearchResult:
    neighbors = [
        Neighbor(
            patient_id=n.patient_id,
            study_uid=n.study_uid,
            similarity=float(n.similarity),
            site=n.site,
            weight=float(n.weight),
            acquisition=dict(n.acquisition),
            time=_opt(n.outcome, "time"),
            event=_opt(n.outcome, "event"),
            labels=dict(n.outcome.labels),
            values=dict(n.outcome.values),
        )
        for n in resp.neighbors
    ]
    p = resp.prognosis
    prognosis = Prognosis(
        survival=[
            SurvivalPoint(s.time, s.survival, s.lower, s.upper, int(s.at_risk)) for s in p.survival
        ],
        median_survival=_opt(p, "median_survival"),
        median_lower=_opt(p, "median_lower"),
        median_upper=_opt(p, "median_upper"),
        at_horizons=[
            HorizonEstimate(h.time, _opt(h, "survival"), _opt(h, "lower"), _opt(h, "upper"))
            for h in p.at_horizons
        ],
        effective_sample_size=p.effective_sample_size,
        neighbors_with_outcome=int(p.neighbors_with_outcome),
        events=int(p.events),
        label_distributions=[
            LabelDistribution(
                d.name,
                [LabelShare(s.label, s.share, s.lower, s.upper, int(s.count)) for s in d.shares],
            )
            for d in p.label_distributions
        ],
        value_summaries=[
            ValueSummary(v.name, v.mean, _opt(v, "lower"), _opt(v, "upper"), int(v.count))
            for v in p.value_summaries
        ],
        warnings=list(p.warnings),
        time_unit=p.time_unit,
    )
    d = resp.diagnostics
    diagnostics = Diagnostics(
        ood_percentile=d.ood_percentile,
        mean_similarity=d.mean_similarity,
        same_scanner_share=_opt(d, "same_scanner_share"),
        cohort_scanner_share=_opt(d, "cohort_scanner_share"),
        warnings=list(d.warnings),
    )
    return SearchResult(neighbors, prognosis, diagnostics, resp.index_version, resp.model_version)


def index_info_from_proto(resp: cohortsim_pb2.GetIndexInfoResponse) -> IndexInfo:
    created = resp.create_time.ToDatetime(tzinfo=UTC) if resp.HasField("create_time") else None
    return IndexInfo(
        num_studies=int(resp.num_studies),
        dimension=int(resp.dimension),
        metric=resp.metric,
        index_kind=resp.index_kind,
        model_version=resp.model_version,
        index_version=resp.index_version,
        gpu=resp.gpu,
        create_time=created,
        max_k=int(resp.max_k),
        dicom_supported=resp.dicom_supported,
    )


# --------------------------------------------------------------------------- requests


def _read_files(dicom_paths: Sequence[Path | str | bytes]) -> list[bytes]:
    files: list[bytes] = []
    for item in dicom_paths:
        if isinstance(item, bytes | bytearray):
            files.append(bytes(item))
        else:
            files.append(Path(item).read_bytes())
    if not files:
        raise ValueError("dicom_paths is empty: give the files of one study")
    return files


def build_search_request(
    *,
    embedding: Sequence[float] | np.ndarray | None = None,
    study_uid: str | None = None,
    dicom_paths: Sequence[Path | str | bytes] | None = None,
    k: int = 10,
    where: str = "",
) -> cohortsim_pb2.SearchSimilarRequest:
    """The request for exactly one of ``embedding``, ``study_uid``, ``dicom_paths``."""
    given = [x is not None for x in (embedding, study_uid, dicom_paths)]
    if sum(given) != 1:
        raise ValueError("give exactly one of embedding, study_uid, dicom_paths")
    req = cohortsim_pb2.SearchSimilarRequest(k=int(k), filter=cohortsim_pb2.Filter(where=where))
    if embedding is not None:
        values = np.asarray(embedding, dtype=np.float32).reshape(-1)
        req.embedding.values.extend(values.tolist())
    elif study_uid is not None:
        req.study_uid = study_uid
    elif dicom_paths is not None:
        req.dicom.files.extend(_read_files(dicom_paths))
    return req


def _channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = int(max_message_mb) * 1024 * 1024
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


_HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


# --------------------------------------------------------------------------- sync client


class CohortsimClient:
    """Blocking client; use as a context manager (or call :meth:`close`).

    ``target`` is ``host:port``; ``timeout`` (seconds) applies to every call;
    ``credentials`` switches to a TLS channel.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = _channel_options(max_message_mb)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> CohortsimClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CohortsimClientError.from_rpc_error(exc) from None

    def search(
        self,
        *,
        embedding: Sequence[float] | np.ndarray | None = None,
        study_uid: str | None = None,
        dicom_paths: Sequence[Path | str | bytes] | None = None,
        k: int = 10,
        where: str = "",
    ) -> SearchResult:
        """The ``k`` most similar studies to one query (exactly one of the three kinds)."""
        req = build_search_request(
            embedding=embedding, study_uid=study_uid, dicom_paths=dicom_paths, k=k, where=where
        )
        return search_result_from_proto(self._call(self._stub.SearchSimilar, req))

    def embed(self, dicom_paths: Sequence[Path | str | bytes]) -> tuple[np.ndarray, str]:
        """Embed one study on the server: ``((d,) float32, model_version)``."""
        req = cohortsim_pb2.EmbedStudyRequest(
            dicom=cohortsim_pb2.DicomStudy(files=_read_files(dicom_paths))
        )
        resp = self._call(self._stub.EmbedStudy, req)
        return np.asarray(resp.embedding.values, dtype=np.float32), resp.model_version

    def index_info(self) -> IndexInfo:
        """Describe the served index."""
        resp = self._call(self._stub.GetIndexInfo, cohortsim_pb2.GetIndexInfoRequest())
        return index_info_from_proto(resp)

    def health(self, service: str = SERVICE_FULL_NAME) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... for ``service`` (``""`` = the whole server)."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return _HEALTH_NAMES.get(resp.status, "UNKNOWN")


# --------------------------------------------------------------------------- asyncio client


class AsyncCohortsimClient:
    """The asyncio twin of :class:`CohortsimClient` (``async with``; methods are coroutines).

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = _channel_options(max_message_mb)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncCohortsimClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CohortsimClientError.from_rpc_error(exc) from None

    async def search(
        self,
        *,
        embedding: Sequence[float] | np.ndarray | None = None,
        study_uid: str | None = None,
        dicom_paths: Sequence[Path | str | bytes] | None = None,
        k: int = 10,
        where: str = "",
    ) -> SearchResult:
        """See :meth:`CohortsimClient.search`."""
        req = build_search_request(
            embedding=embedding, study_uid=study_uid, dicom_paths=dicom_paths, k=k, where=where
        )
        return search_result_from_proto(await self._call(self._stub.SearchSimilar, req))

    async def embed(self, dicom_paths: Sequence[Path | str | bytes]) -> tuple[np.ndarray, str]:
        """See :meth:`CohortsimClient.embed`."""
        req = cohortsim_pb2.EmbedStudyRequest(
            dicom=cohortsim_pb2.DicomStudy(files=_read_files(dicom_paths))
        )
        resp = await self._call(self._stub.EmbedStudy, req)
        return np.asarray(resp.embedding.values, dtype=np.float32), resp.model_version

    async def index_info(self) -> IndexInfo:
        """See :meth:`CohortsimClient.index_info`."""
        resp = await self._call(self._stub.GetIndexInfo, cohortsim_pb2.GetIndexInfoRequest())
        return index_info_from_proto(resp)

    async def health(self, service: str = SERVICE_FULL_NAME) -> str:
        """See :meth:`CohortsimClient.health`."""
        resp = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return _HEALTH_NAMES.get(resp.status, "UNKNOWN")


__all__ = [
    "AsyncCohortsimClient",
    "CohortsimClient",
    "CohortsimClientError",
    "Diagnostics",
    "HorizonEstimate",
    "IndexInfo",
    "LabelDistribution",
    "LabelShare",
    "Neighbor",
    "Prognosis",
    "SearchResult",
    "SurvivalPoint",
    "ValueSummary",
    "build_search_request",
    "index_info_from_proto",
    "search_result_from_proto",
]
