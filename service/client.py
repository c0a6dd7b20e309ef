"""Typed Python client of the cohortsim gRPC API (sync and asyncio).

    with CohortsimClient("127.0.0.1:50051") as client:
        result = client.search(study_uid="S-...", k=10)
        for n in result.neighbors:
            print(n.patient_id, n.similarity, n.time, n.event)

Answers are plain dataclasses (no protobuf types leak out). The prognosis's value types
(:class:`SurvivalPoint`, :class:`HorizonEstimate`, :class:`LabelShare`) and the skill
warning codes (:data:`SKILL_CODES`) are the engine's own (``indexing.prognosis_types``,
``indexing.notices``: standard library only, shipped in the thin client); the containers
below are the answer as it comes over the wire (the proto's view, after a site's
disclosure rules), built in one place (:func:`search_result_from_proto`);
every failed call raises :class:`CohortsimClientError` carrying the status code name, the
server's message and, when the server sent one, the machine-readable ``ErrorInfo`` reason.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from indexing.notices import SKILL_CODES
from indexing.prognosis_types import HorizonEstimate, LabelShare, SurvivalPoint
from service.api import SERVICE_FULL_NAME, cohortsim_pb2, cohortsim_pb2_grpc
from service.status_details import reason_from_trailing, retry_delay_from_trailing

DEFAULT_MAX_MESSAGE_MB = 64
T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class CohortsimClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ...),
    ``reason`` the server's ErrorInfo reason (``"WRONG_DIMENSION"``, ...) or ``None``,
    ``retry_after`` the server's RetryInfo delay in seconds (RESOURCE_EXHAUSTED) or ``None``."""

    def __init__(
        self, code: str, message: str, reason: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message, reason)
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after = retry_after

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
        return cls(name, message, reason_from_trailing(trailing), retry_delay_from_trailing(trailing))


# --------------------------------------------------------------------------- results


@dataclass
class CodedWarning:
    """A warning with its code: ``code`` is the ``WarningCode`` name without its prefix
    (``"NO_PROGNOSTIC_SKILL"``, ``"UNSPECIFIED"`` for free text); ``message`` the text."""

    code: str
    message: str




@dataclass
class EmbeddedRegion:
    """Where a study's embedding was cut: axial ``slice_index`` of the stored volume and
    ``box`` (row0, col0, row1, col1, half-open voxels) on it; ``source`` "reader",
    "proposal", "centre", "best_slice" or "matched_slice" (whole-volume encoders: the
    slice of the strongest match)."""

    slice_index: int
    box: tuple[int, ...]
    source: str


@dataclass
class Explanation:
    """Which parts of the query's region drove the similarity to one neighbour: a
    ``(rows, cols)`` occlusion map (``weights``, largest = 1) and its PNG overlay."""

    rows: int
    cols: int
    weights: list[float]
    overlay_png: bytes | None
    similarity: float

    def grid(self) -> list[list[float]]:
        """The map as ``rows`` lists of ``cols`` values."""
        return [self.weights[r * self.cols:(r + 1) * self.cols] for r in range(self.rows)]


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
    thumbnail_png: bytes | None = None
    region: EmbeddedRegion | None = None
    explanation: Explanation | None = None





@dataclass
class LabelDistribution:
    """Distribution of one categorical outcome among the neighbours (pooled over readers
    for an outcome read by several, with their agreement)."""

    name: str
    shares: list[LabelShare] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    multi_reader_neighbor_count: int = 0
    reader_agreement: float | None = None
    reader_kappa: float | None = None


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
    cohort_survival: list[SurvivalPoint] = field(default_factory=list)
    cohort_median_survival: float | None = None
    cohort_at_horizons: list[HorizonEstimate] = field(default_factory=list)
    temperature: float | None = None
    warning_details: list[CodedWarning] = field(default_factory=list)

    @property
    def skill_warnings(self) -> list[CodedWarning]:
        """The warnings saying the index has shown no prognostic skill (:data:`SKILL_CODES`)."""
        return [w for w in self.warning_details if w.code in SKILL_CODES]


@dataclass
class AcquisitionCheck:
    """The query's value of one acquisition attribute vs its neighbours and the cohort."""

    attribute: str
    query_value: str
    neighbor_share: float
    cohort_share: float
    seen_in_cohort: bool


@dataclass
class PredictionStability:
    """Neighbours of scanner-augmented copies of the query vs the query's own."""

    view_count: int
    mean_neighbor_overlap: float
    min_neighbor_overlap: float
    median_survival_min: float | None = None
    median_survival_max: float | None = None
    median_reached_count: int = 0


@dataclass
class RegionPrognosis:
    """The prognosis from one region of interest of a DICOM query."""

    observer: str
    neighbor_overlap: float
    median_survival: float | None
    median_lower: float | None
    median_upper: float | None
    at_horizons: list[HorizonEstimate]
    effective_sample_size: float


@dataclass
class Diagnostics:
    """How typical the query is and how comparable its neighbours are."""

    ood_percentile: float = 0.0
    mean_similarity: float = 0.0
    same_scanner_share: float | None = None
    cohort_scanner_share: float | None = None
    warnings: list[str] = field(default_factory=list)
    acquisition_checks: list[AcquisitionCheck] = field(default_factory=list)
    stability: PredictionStability | None = None
    regions: list[RegionPrognosis] = field(default_factory=list)
    region_spread: PredictionStability | None = None
    warning_details: list[CodedWarning] = field(default_factory=list)


@dataclass
class DisclosureControl:
    """How an aggregates-only answer was protected (small-cell threshold, what was withheld)."""

    min_cell_count: int
    aggregated_patients: int
    withheld_fields: list[str] = field(default_factory=list)


@dataclass
class SiteReport:
    """What one site of a federation (or one shard) did for an answer: ``state`` is
    "ANSWERED", "TIMED_OUT", "REFUSED" or "UNAVAILABLE"; ``reason`` says why it is missing
    (empty when it answered); ``neighbors`` of the merged answer came from it."""

    name: str
    state: str
    reason: str
    neighbors: int
    model_version: str
    num_studies: int
    index_version: str


@dataclass
class FederationReport:
    """Which sites a coordinator's answer rests on (``None`` on a single server)."""

    sites: list[SiteReport] = field(default_factory=list)
    cohort_studies: int = 0

    @property
    def missing(self) -> list[SiteReport]:
        """The sites that did not take part, with their reasons."""
        return [s for s in self.sites if s.state != "ANSWERED"]


@dataclass
class SearchResult:
    """The answer to one similarity search."""

    neighbors: list[Neighbor]
    prognosis: Prognosis
    diagnostics: Diagnostics
    index_version: str
    model_version: str
    query_thumbnail_png: bytes | None = None
    #: set when the caller's role gets aggregates only (researchers): how it was protected
    disclosure: DisclosureControl | None = None
    query_region: EmbeddedRegion | None = None
    #: set by a federation coordinator: which sites answered, timed out or refused
    federation: FederationReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``None`` for unknown values, never NaN; thumbnails
        as base64 text)."""
        return _json_safe(dataclasses.asdict(self))


@dataclass
class CalibrationGroup:
    """Predicted vs observed survival of one group of evaluated studies at a horizon."""

    predicted: float
    observed: float | None
    observed_lower: float | None
    observed_upper: float | None
    study_count: int


@dataclass
class HorizonCalibration:
    """Calibration at one horizon (groups from lowest to highest predicted survival)."""

    time: float
    groups: list[CalibrationGroup] = field(default_factory=list)
    mean_absolute_error: float | None = None
    mean_absolute_error_lower: float | None = None
    mean_absolute_error_upper: float | None = None


@dataclass
class PrognosticQuality:
    """Leave-one-out quality of neighbour-based prognosis on the served cohort."""

    k: int
    temperature: float
    temperature_source: str
    c_index: float | None
    restricted_mean_time: float
    evaluated_study_count: int
    evaluated_event_count: int
    calibration: list[HorizonCalibration] = field(default_factory=list)
    c_index_lower: float | None = None
    c_index_upper: float | None = None


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
    prognostic_quality: PrognosticQuality | None = None
    warnings: list[CodedWarning] = field(default_factory=list)
    #: set by a federation coordinator: the sites' versions and study counts
    federation: FederationReport | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["create_time"] = self.create_time.isoformat() if self.create_time else None
        return _json_safe(d)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- proto -> dataclass


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _curve(points: Any) -> list[SurvivalPoint]:
    return [SurvivalPoint(s.time, s.survival, s.lower, s.upper, int(s.at_risk)) for s in points]


# The cohort's curve (hundreds of points) is the same in every answer of one index version
# and one caller policy; converting it to dataclasses cost ~0.6 ms per answer. It is kept,
# per client process, under a key of everything it depends on plus three of its points, so a
# server whose policy changed under the same index version still misses. Callers get
# their own list of frozen points, so changing one answer never touches another.
_COHORT_CURVES: dict[tuple[Any, ...], list[SurvivalPoint]] = {}
_COHORT_CURVES_KEPT = 8


def _point_key(s: Any) -> tuple[float, float, float, float, int]:
    return (s.time, s.survival, s.lower, s.upper, int(s.at_risk))


def _cohort_curve(resp: Any, points: Any) -> list[SurvivalPoint]:
    n = len(points)
    if n < 8:
        return _curve(points)
    dc = resp.disclosure_control if resp.HasField("disclosure_control") else None
    key = (
        resp.index_version, resp.model_version, resp.prognosis.time_unit,
        None if dc is None else int(dc.min_cell_count),
        n, _point_key(points[0]), _point_key(points[n // 2]), _point_key(points[n - 1]),
    )
    hit = _COHORT_CURVES.get(key)
    if hit is None:
        hit = _curve(points)
        while len(_COHORT_CURVES) >= _COHORT_CURVES_KEPT:
            _COHORT_CURVES.pop(next(iter(_COHORT_CURVES)), None)
        _COHORT_CURVES[key] = hit
    return list(hit)


def _horizons(items: Any) -> list[HorizonEstimate]:
    return [
        HorizonEstimate(h.time, _opt(h, "survival"), _opt(h, "lower"), _opt(h, "upper"))
        for h in items
    ]


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
            thumbnail_png=n.thumbnail_png or None,
            region=_region(n.region) if n.HasField("region") else None,
            explanation=_explanation(n.explanation) if n.HasField("explanation") else None,
        )
        for n in resp.neighbors
    ]
    p = resp.prognosis
    prognosis = Prognosis(
        survival=_curve(p.survival),
        median_survival=_opt(p, "median_survival"),
        median_lower=_opt(p, "median_lower"),
        median_upper=_opt(p, "median_upper"),
        at_horizons=_horizons(p.at_horizons),
        effective_sample_size=p.effective_sample_size,
        neighbors_with_outcome=int(p.neighbors_with_outcome),
        events=int(p.events),
        label_distributions=[
            LabelDistribution(
                d.name,
                [LabelShare(s.label, s.share, s.lower, s.upper, int(s.count)) for s in d.shares],
                readers=list(d.readers),
                multi_reader_neighbor_count=int(d.multi_reader_neighbor_count),
                reader_agreement=_opt(d, "reader_agreement"),
                reader_kappa=_opt(d, "reader_kappa"),
            )
            for d in p.label_distributions
        ],
        value_summaries=[
            ValueSummary(v.name, v.mean, _opt(v, "lower"), _opt(v, "upper"), int(v.count))
            for v in p.value_summaries
        ],
        warnings=list(p.warnings),
        time_unit=p.time_unit,
        cohort_survival=_cohort_curve(resp, p.cohort_survival),
        cohort_median_survival=_opt(p, "cohort_median_survival"),
        cohort_at_horizons=_horizons(p.cohort_at_horizons),
        temperature=p.temperature if p.temperature > 0 else None,
        warning_details=_warnings(p.warning_details),
    )
    d = resp.diagnostics

    def stab(st: Any) -> PredictionStability:
        return PredictionStability(
            int(st.view_count),
            st.mean_neighbor_overlap,
            st.min_neighbor_overlap,
            _opt(st, "median_survival_min"),
            _opt(st, "median_survival_max"),
            int(st.median_reached_count),
        )

    diagnostics = Diagnostics(
        ood_percentile=d.ood_percentile,
        mean_similarity=d.mean_similarity,
        same_scanner_share=_opt(d, "same_scanner_share"),
        cohort_scanner_share=_opt(d, "cohort_scanner_share"),
        warnings=list(d.warnings),
        acquisition_checks=[
            AcquisitionCheck(
                c.attribute, c.query_value, c.neighbor_share, c.cohort_share, c.seen_in_cohort
            )
            for c in d.acquisition_checks
        ],
        stability=stab(d.stability) if d.HasField("stability") else None,
        regions=[
            RegionPrognosis(
                r.observer, r.neighbor_overlap, _opt(r, "median_survival"),
                _opt(r, "median_lower"), _opt(r, "median_upper"), _horizons(r.at_horizons),
                r.effective_sample_size,
            )
            for r in d.region_prognoses
        ],
        region_spread=stab(d.region_spread) if d.HasField("region_spread") else None,
        warning_details=_warnings(d.warning_details),
    )
    return SearchResult(
        neighbors,
        prognosis,
        diagnostics,
        resp.index_version,
        resp.model_version,
        query_thumbnail_png=resp.query_thumbnail_png or None,
        disclosure=_disclosure(resp),
        query_region=_region(resp.query_region) if resp.HasField("query_region") else None,
        federation=_federation(resp),
    )


def _federation(resp: Any) -> FederationReport | None:
    if not resp.HasField("federation"):
        return None
    f = resp.federation
    prefix = "SITE_STATE_"
    return FederationReport(
        [
            SiteReport(
                s.name, cohortsim_pb2.SiteState.Name(s.state).removeprefix(prefix), s.reason,
                int(s.neighbors), s.model_version, int(s.num_studies), s.index_version,
            )
            for s in f.sites
        ],
        int(f.cohort_studies),
    )


def _warnings(items: Any) -> list[CodedWarning]:
    prefix = "WARNING_CODE_"
    return [
        CodedWarning(cohortsim_pb2.WarningCode.Name(w.code).removeprefix(prefix), w.message)
        for w in items
    ]


def _region(r: Any) -> EmbeddedRegion:
    return EmbeddedRegion(int(r.slice_index), tuple(int(v) for v in r.box), r.source)


def _explanation(e: Any) -> Explanation:
    return Explanation(
        int(e.rows), int(e.cols), [float(v) for v in e.weights], e.overlay_png or None,
        float(e.similarity),
    )


def _disclosure(resp: cohortsim_pb2.SearchSimilarResponse) -> DisclosureControl | None:
    if not resp.HasField("disclosure_control"):
        return None
    dc = resp.disclosure_control
    return DisclosureControl(
        int(dc.min_cell_count), int(dc.aggregated_patients), list(dc.withheld_fields)
    )


def prognostic_quality_from_proto(q: cohortsim_pb2.PrognosticQuality) -> PrognosticQuality:
    return PrognosticQuality(
        k=int(q.k),
        temperature=q.temperature,
        temperature_source=q.temperature_source,
        c_index=_opt(q, "c_index"),
        restricted_mean_time=q.restricted_mean_time,
        evaluated_study_count=int(q.evaluated_study_count),
        evaluated_event_count=int(q.evaluated_event_count),
        calibration=[
            HorizonCalibration(
                c.time,
                [
                    CalibrationGroup(
                        g.predicted,
                        _opt(g, "observed"),
                        _opt(g, "observed_lower"),
                        _opt(g, "observed_upper"),
                        int(g.study_count),
                    )
                    for g in c.groups
                ],
                _opt(c, "mean_absolute_error"),
                _opt(c, "mean_absolute_error_lower"),
                _opt(c, "mean_absolute_error_upper"),
            )
            for c in q.calibration
        ],
        c_index_lower=_opt(q, "c_index_lower"),
        c_index_upper=_opt(q, "c_index_upper"),
    )


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
        prognostic_quality=prognostic_quality_from_proto(resp.prognostic_quality)
        if resp.HasField("prognostic_quality")
        else None,
        warnings=_warnings(resp.warnings),
        federation=_federation(resp),
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


class StudyEmbedding(NamedTuple):
    """What EmbedStudy returns: the ``(d,)`` float32 vector and the encoder's version.

    Unpacks as ``vector, model_version = client.embed(...)``; passed whole as
    ``search(embedding=...)`` it sends its model version, so the server refuses it
    (``MODEL_VERSION_MISMATCH``) if the index was built with another encoder.
    """

    vector: np.ndarray
    model_version: str


def build_search_request(
    *,
    embedding: StudyEmbedding | Sequence[float] | np.ndarray | None = None,
    study_uid: str | None = None,
    dicom_paths: Sequence[Path | str | bytes] | None = None,
    k: int = 10,
    where: str = "",
    include_thumbnails: bool = False,
    regions: Sequence[tuple[str, Sequence[float]]] = (),
    include_explanations: bool = False,
    model_version: str | None = None,
    pacs_study_uid: str | None = None,
) -> cohortsim_pb2.SearchSimilarRequest:
    """The request for exactly one of ``embedding``, ``study_uid``, ``dicom_paths``,
    ``pacs_study_uid`` (a StudyInstanceUID the server retrieves from its PACS);
    ``regions``: ``(observer, (z0, y0, x0, z1, y1, x1))`` boxes of a DICOM or PACS query;
    ``include_explanations`` (DICOM queries): per-neighbour occlusion maps.
    ``model_version``: the encoder that made ``embedding`` (taken from a
    :class:`StudyEmbedding` when not given); unset, the server answers with a warning."""
    given = [x is not None for x in (embedding, study_uid, dicom_paths, pacs_study_uid)]
    if sum(given) != 1:
        raise ValueError("give exactly one of embedding, study_uid, dicom_paths, pacs_study_uid")
    if model_version is not None and embedding is None:
        raise ValueError("model_version goes with an embedding query")
    req = cohortsim_pb2.SearchSimilarRequest(
        k=int(k),
        filter=cohortsim_pb2.Filter(where=where),
        include_thumbnails=bool(include_thumbnails),
        include_explanations=bool(include_explanations),
    )
    if embedding is not None:
        if isinstance(embedding, StudyEmbedding):
            if model_version is None:
                model_version = embedding.model_version
            embedding = embedding.vector
        values = np.asarray(embedding, dtype=np.float32).reshape(-1)
        req.embedding.values.extend(values.tolist())
        if model_version is not None:
            req.embedding.model_version = str(model_version)
    elif study_uid is not None:
        req.study_uid = study_uid
    elif dicom_paths is not None:
        req.dicom.files.extend(_read_files(dicom_paths))
    elif pacs_study_uid is not None:
        req.pacs.study_instance_uid = pacs_study_uid
    if regions:
        if dicom_paths is None and pacs_study_uid is None:
            raise ValueError("regions of interest go with a DICOM query (dicom_paths or pacs_study_uid)")
        target = req.dicom if dicom_paths is not None else req.pacs
        for observer, box in regions:
            target.regions.add(observer=str(observer), box=[float(v) for v in box])
    return req


def _embedding(resp: cohortsim_pb2.EmbedStudyResponse) -> StudyEmbedding:
    version = (
        resp.embedding.model_version
        if resp.embedding.HasField("model_version")
        else resp.model_version
    )
    return StudyEmbedding(np.asarray(resp.embedding.values, dtype=np.float32), version)


def _channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = int(max_message_mb) * 1024 * 1024
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    if token is None:
        return None
    token = token.strip()
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("the token is empty or holds line breaks; check the token file")
    return (("authorization", f"Bearer {token}"),)


_HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


# --------------------------------------------------------------------------- more answers


@dataclass
class StudySummary:
    """One study of the index, without its embedding (ListStudies, GetPatient)."""

    study_uid: str
    patient_id: str
    site: str
    modality: str
    study_day: int
    acquisition: dict[str, str]


@dataclass
class PatientRecord:
    """GetPatient: a patient's studies and outcome."""

    patient_id: str
    studies: list[StudySummary]
    time: float | None
    event: bool | None
    labels: dict[str, str]
    values: dict[str, float]
    index_version: str


@dataclass
class StudyPage:
    """One ListStudies page; pass ``next_page_token`` back for the next one ("" = last)."""

    studies: list[StudySummary]
    next_page_token: str
    total_size: int


@dataclass
class CategoryCount:
    value: str
    study_count: int
    patient_count: int


@dataclass
class CohortStats:
    """GetCohortStats; ``labels`` maps (name, value) to a patient count. Researchers see
    withheld counts as 0 and their paths in ``withheld_fields``."""

    study_count: int
    patient_count: int
    sites: list[CategoryCount]
    scanners: list[CategoryCount]
    labels: dict[tuple[str, str], int]
    index_version: str
    withheld_fields: list[str] = field(default_factory=list)


def _study(msg: Any) -> StudySummary:
    return StudySummary(
        msg.study_uid, msg.patient_id, msg.site, msg.modality, int(msg.study_day),
        dict(msg.acquisition),
    )


def _patient(resp: Any) -> PatientRecord:
    o = resp.outcome
    return PatientRecord(
        patient_id=resp.patient_id,
        studies=[_study(s) for s in resp.studies],
        time=o.time if o.HasField("time") else None,
        event=o.event if o.HasField("event") else None,
        labels=dict(o.labels),
        values=dict(o.values),
        index_version=resp.index_version,
    )


def _page(resp: Any) -> StudyPage:
    return StudyPage([_study(s) for s in resp.studies], resp.next_page_token, int(resp.total_size))


def _stats(resp: Any) -> CohortStats:
    def cats(items: Any) -> list[CategoryCount]:
        return [CategoryCount(c.value, int(c.study_count), int(c.patient_count)) for c in items]

    return CohortStats(
        study_count=int(resp.study_count),
        patient_count=int(resp.patient_count),
        sites=cats(resp.sites),
        scanners=cats(resp.scanners),
        labels={(x.name, x.value): int(x.patient_count) for x in resp.labels},
        index_version=resp.index_version,
        withheld_fields=list(resp.disclosure_control.withheld_fields),
    )


STREAM_CHUNK_BYTES = 1 << 20  # SearchSimilarStream chunk size (well under any message cap)


def stream_search_requests(
    dicom_paths: Sequence[Path | str | bytes], request: cohortsim_pb2.SearchSimilarRequest,
    chunk_bytes: int = STREAM_CHUNK_BYTES,
) -> Iterator[cohortsim_pb2.SearchSimilarStreamRequest]:
    """The messages of a SearchSimilarStream call: ``request``, then each file in chunks
    (read one file at a time)."""
    yield cohortsim_pb2.SearchSimilarStreamRequest(request=request)
    for item in dicom_paths:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        for start in range(0, max(len(data), 1), chunk_bytes):
            part = data[start : start + chunk_bytes]
            yield cohortsim_pb2.SearchSimilarStreamRequest(
                chunk=cohortsim_pb2.DicomFileChunk(
                    data=part, last=start + chunk_bytes >= len(data)
                )
            )


def _list_request(page_size: int, page_token: str, where: str) -> Any:
    return cohortsim_pb2.ListStudiesRequest(
        page_size=page_size, page_token=page_token, filter=cohortsim_pb2.Filter(where=where)
    )


# --------------------------------------------------------------------------- asyncio client


class AsyncCohortsimClient:
    """The client core (asyncio): ``async with``; every RPC is a coroutine method.

    ``target`` is ``host:port``; ``timeout`` (seconds) applies to every call;
    ``credentials`` switches to a TLS channel (:func:`service.tls.channel_credentials`);
    ``token`` is sent as ``authorization: Bearer <token>`` on every call. Create it inside
    the event loop that will use it. :class:`CohortsimClient` runs this class on a loop
    of its own, so both offer the same methods with the same answers.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(token)
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
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise CohortsimClientError.from_rpc_error(exc) from None

    async def search(
        self,
        *,
        embedding: StudyEmbedding | Sequence[float] | np.ndarray | None = None,
        study_uid: str | None = None,
        dicom_paths: Sequence[Path | str | bytes] | None = None,
        k: int = 10,
        where: str = "",
        include_thumbnails: bool = False,
        regions: Sequence[tuple[str, Sequence[float]]] = (),
        include_explanations: bool = False,
        model_version: str | None = None,
        pacs_study_uid: str | None = None,
    ) -> SearchResult:
        """The ``k`` most similar studies to one query (exactly one of the three kinds);
        ``include_thumbnails`` asks for the query's and neighbours' PNG thumbnails;
        ``regions`` gives a DICOM query's regions of interest as ``(observer, box)``
        (see ``RegionOfInterest`` in the proto), answered in ``diagnostics.regions``;
        ``model_version`` names the encoder of ``embedding`` (a :class:`StudyEmbedding`
        from :meth:`embed` carries it); ``pacs_study_uid``: a study the server retrieves
        from its PACS."""
        req = build_search_request(
            embedding=embedding,
            study_uid=study_uid,
            dicom_paths=dicom_paths,
            k=k,
            where=where,
            include_thumbnails=include_thumbnails,
            regions=regions,
            include_explanations=include_explanations,
            model_version=model_version,
            pacs_study_uid=pacs_study_uid,
        )
        return search_result_from_proto(await self._call(self._stub.SearchSimilar, req))

    async def embed(self, dicom_paths: Sequence[Path | str | bytes]) -> StudyEmbedding:
        """Embed one study on the server: ``((d,) float32, model_version)``."""
        req = cohortsim_pb2.EmbedStudyRequest(
            dicom=cohortsim_pb2.DicomStudy(files=_read_files(dicom_paths))
        )
        return _embedding(await self._call(self._stub.EmbedStudy, req))

    async def index_info(self) -> IndexInfo:
        """Describe the served index."""
        resp = await self._call(self._stub.GetIndexInfo, cohortsim_pb2.GetIndexInfoRequest())
        return index_info_from_proto(resp)

    async def health(self, service: str = SERVICE_FULL_NAME) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... for ``service`` (``""`` = the whole server)."""
        resp = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return _HEALTH_NAMES.get(resp.status, "UNKNOWN")

    async def search_stream(
        self, dicom_paths: Sequence[Path | str | bytes], *, k: int = 10, where: str = "",
        include_thumbnails: bool = False, chunk_bytes: int = STREAM_CHUNK_BYTES,
    ) -> SearchResult:
        """:meth:`search` for a DICOM study of any size (SearchSimilarStream, chunked)."""
        req = cohortsim_pb2.SearchSimilarRequest(
            k=int(k), filter=cohortsim_pb2.Filter(where=where),
            include_thumbnails=bool(include_thumbnails),
        )
        resp = await self._call(
            self._stub.SearchSimilarStream, stream_search_requests(dicom_paths, req, chunk_bytes)
        )
        return search_result_from_proto(resp.response)

    async def get_patient(self, patient_id: str) -> PatientRecord:
        """A patient's studies and outcome (pseudonym ``P-...``)."""
        req = cohortsim_pb2.GetPatientRequest(patient_id=patient_id)
        return _patient(await self._call(self._stub.GetPatient, req))

    async def list_studies(
        self, *, page_size: int = 0, page_token: str = "", where: str = ""
    ) -> StudyPage:
        """One page of the index's studies (``where``: a filter)."""
        req = _list_request(page_size, page_token, where)
        return _page(await self._call(self._stub.ListStudies, req))

    async def cohort_stats(self, *, where: str = "") -> CohortStats:
        """Counts by site, scanner and label (researchers: small cells withheld)."""
        req = cohortsim_pb2.GetCohortStatsRequest(filter=cohortsim_pb2.Filter(where=where))
        return _stats(await self._call(self._stub.GetCohortStats, req))

    async def ingest(self, studies: Sequence[Sequence[Path | str | bytes]]) -> dict[str, Any]:
        """Admin: add studies (each a list of DICOM files) to the server's store."""
        msgs = (
            cohortsim_pb2.IngestStudiesRequest(study=cohortsim_pb2.DicomStudy(files=_read_files(s)))
            for s in studies
        )
        resp = await self._call(self._stub.IngestStudies, msgs)
        return {
            "received": resp.received_count, "ingested": resp.ingested_count,
            "already_present": resp.already_present_count, "rejections": list(resp.rejections),
        }

    async def delete_patient(self, patient_id: str) -> tuple[bool, int]:
        """Admin: withdraw a patient; ``(newly_deleted, hidden_study_count)``."""
        resp = await self._call(
            self._stub.DeletePatient, cohortsim_pb2.DeletePatientRequest(patient_id=patient_id)
        )
        return bool(resp.newly_deleted), int(resp.hidden_study_count)

    async def reload_index(self) -> tuple[str, bool]:
        """Admin: serve what ``CURRENT`` names now; ``(index_version, reloaded)``."""
        resp = await self._call(self._stub.ReloadIndex, cohortsim_pb2.ReloadIndexRequest())
        return resp.index_version, bool(resp.reloaded)


# --------------------------------------------------------------------------- sync client


class _LoopThread:
    """An event loop running in a daemon thread, for blocking callers of coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="cohortsim-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class CohortsimClient:
    """Blocking client: :class:`AsyncCohortsimClient` run on an event loop of its own
    (one thread per client). Use as a context manager (or call :meth:`close`); the
    arguments and methods are the async client's, each returning its answer."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        token: str | None = None,
    ) -> None:
        _auth_metadata(token)  # a bad token fails here, before a thread starts
        self.target = target
        self.timeout = timeout
        self._loop = _LoopThread()

        async def make() -> AsyncCohortsimClient:
            return AsyncCohortsimClient(
                target,
                timeout=timeout,
                credentials=credentials,
                max_message_mb=max_message_mb,
                token=token,
            )

        self._core = self._loop.run(make())
        self._closed = False

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
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._core.close())
        finally:
            self._loop.stop()

    def search(
        self,
        *,
        embedding: StudyEmbedding | Sequence[float] | np.ndarray | None = None,
        study_uid: str | None = None,
        dicom_paths: Sequence[Path | str | bytes] | None = None,
        k: int = 10,
        where: str = "",
        include_thumbnails: bool = False,
        regions: Sequence[tuple[str, Sequence[float]]] = (),
        include_explanations: bool = False,
        model_version: str | None = None,
        pacs_study_uid: str | None = None,
    ) -> SearchResult:
        """See :meth:`AsyncCohortsimClient.search`."""
        return self._loop.run(
            self._core.search(
                embedding=embedding,
                study_uid=study_uid,
                dicom_paths=dicom_paths,
                k=k,
                where=where,
                include_thumbnails=include_thumbnails,
                regions=regions,
                include_explanations=include_explanations,
                model_version=model_version,
                pacs_study_uid=pacs_study_uid,
            )
        )

    def embed(self, dicom_paths: Sequence[Path | str | bytes]) -> StudyEmbedding:
        """See :meth:`AsyncCohortsimClient.embed`."""
        return self._loop.run(self._core.embed(dicom_paths))

    def index_info(self) -> IndexInfo:
        """See :meth:`AsyncCohortsimClient.index_info`."""
        return self._loop.run(self._core.index_info())

    def health(self, service: str = SERVICE_FULL_NAME) -> str:
        """See :meth:`AsyncCohortsimClient.health`."""
        return self._loop.run(self._core.health(service))

    def search_stream(
        self, dicom_paths: Sequence[Path | str | bytes], *, k: int = 10, where: str = "",
        include_thumbnails: bool = False, chunk_bytes: int = STREAM_CHUNK_BYTES,
    ) -> SearchResult:
        """See :meth:`AsyncCohortsimClient.search_stream`."""
        return self._loop.run(
            self._core.search_stream(
                dicom_paths, k=k, where=where, include_thumbnails=include_thumbnails,
                chunk_bytes=chunk_bytes,
            )
        )

    def get_patient(self, patient_id: str) -> PatientRecord:
        """See :meth:`AsyncCohortsimClient.get_patient`."""
        return self._loop.run(self._core.get_patient(patient_id))

    def list_studies(self, *, page_size: int = 0, page_token: str = "", where: str = "") -> StudyPage:
        """See :meth:`AsyncCohortsimClient.list_studies`."""
        return self._loop.run(
            self._core.list_studies(page_size=page_size, page_token=page_token, where=where)
        )

    def cohort_stats(self, *, where: str = "") -> CohortStats:
        """See :meth:`AsyncCohortsimClient.cohort_stats`."""
        return self._loop.run(self._core.cohort_stats(where=where))

    def ingest(self, studies: Sequence[Sequence[Path | str | bytes]]) -> dict[str, Any]:
        """See :meth:`AsyncCohortsimClient.ingest`."""
        return self._loop.run(self._core.ingest(studies))

    def delete_patient(self, patient_id: str) -> tuple[bool, int]:
        """See :meth:`AsyncCohortsimClient.delete_patient`."""
        return self._loop.run(self._core.delete_patient(patient_id))

    def reload_index(self) -> tuple[str, bool]:
        """See :meth:`AsyncCohortsimClient.reload_index`."""
        return self._loop.run(self._core.reload_index())


__all__ = [
    "SKILL_CODES",
    "AcquisitionCheck",
    "AsyncCohortsimClient",
    "CalibrationGroup",
    "CategoryCount",
    "CodedWarning",
    "CohortStats",
    "CohortsimClient",
    "CohortsimClientError",
    "Diagnostics",
    "DisclosureControl",
    "EmbeddedRegion",
    "Explanation",
    "FederationReport",
    "HorizonCalibration",
    "HorizonEstimate",
    "IndexInfo",
    "LabelDistribution",
    "LabelShare",
    "Neighbor",
    "PatientRecord",
    "PredictionStability",
    "Prognosis",
    "PrognosticQuality",
    "RegionPrognosis",
    "SearchResult",
    "SiteReport",
    "StudyEmbedding",
    "StudyPage",
    "StudySummary",
    "SurvivalPoint",
    "ValueSummary",
    "build_search_request",
    "index_info_from_proto",
    "search_result_from_proto",
    "stream_search_requests",
]
