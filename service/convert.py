"""The only place where protobuf messages meet domain types.

Requests -> validated plain values (:class:`SearchQuery`, lists of bytes), and domain
results (``indexing.query.QueryResult``, ``Snapshot.info()``, embeddings) -> responses.
Optional proto fields are left unset for None / NaN; no protobuf type leaves this module
towards ``indexing`` or ``encoders``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from google.protobuf import timestamp_pb2

from indexing.prognosis import Prognosis
from indexing.query import Diagnostics, NeighborResult, QueryResult
from service.api import cohortsim_pb2 as pb
from service.errors import invalid_argument

QueryKind = Literal["embedding", "study_uid", "dicom"]

DEFAULT_TIME_UNIT = "months"
MAX_STUDY_UID_LENGTH = 256


@dataclass(frozen=True)
class SearchQuery:
    """A validated SearchSimilar request.

    Exactly the field of ``kind`` is meaningful: ``embedding`` ``(d,)`` float32 (finite,
    non-zero, index dimension), ``study_uid`` (non-empty) or ``dicom_files`` (1..max_files).
    """

    kind: QueryKind
    k: int
    where: str = ""
    embedding: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    study_uid: str = ""
    dicom_files: list[bytes] = field(default_factory=list)


# --------------------------------------------------------------------------- requests


def parse_k(k: int, *, default_k: int, max_k: int) -> int:
    """0 -> ``default_k``; otherwise 1..max_k, else INVALID_ARGUMENT ``INVALID_K``."""
    if k == 0:
        return min(default_k, max_k)
    if not 1 <= k <= max_k:
        raise invalid_argument(
            "INVALID_K",
            f"k must be between 1 and {max_k} (0 asks for the default {default_k}); got {k}",
            max_k=str(max_k),
        )
    return int(k)


def parse_embedding(vector: pb.Vector, *, dimension: int) -> np.ndarray:
    """``Vector`` -> ``(d,)`` float32, checked against the index dimension."""
    values = np.asarray(vector.values, dtype=np.float32)
    if values.size != dimension:
        what = "is empty" if values.size == 0 else f"has {values.size} values"
        raise invalid_argument(
            "WRONG_DIMENSION",
            f"the embedding {what} but the index dimension is {dimension}; embed the study "
            "with the index's model (GetIndexInfo gives its model_version)",
            expected=str(dimension),
            actual=str(values.size),
        )
    if not np.isfinite(values).all():
        raise invalid_argument(
            "NON_FINITE_EMBEDDING",
            "the embedding holds NaN or infinite values; re-embed the study",
        )
    if not np.any(values):
        raise invalid_argument(
            "ZERO_EMBEDDING", "the embedding is the zero vector, which has no direction"
        )
    return values


def parse_dicom(study: pb.DicomStudy, *, max_files: int) -> list[bytes]:
    """``DicomStudy`` -> its files; refuses an empty study or more than ``max_files``."""
    n = len(study.files)
    if n == 0:
        raise invalid_argument(
            "NO_FILES", "dicom.files is empty; send the DICOM files of one study"
        )
    if n > max_files:
        raise invalid_argument(
            "TOO_MANY_FILES",
            f"the study has {n} files but this server accepts at most {max_files} per "
            "request; send only the series to embed",
            max_files=str(max_files),
        )
    return list(study.files)


def parse_search_request(
    request: pb.SearchSimilarRequest,
    *,
    dimension: int,
    default_k: int,
    max_k: int,
    max_files: int,
) -> SearchQuery:
    """Validate a SearchSimilar request; raises ServiceError (INVALID_ARGUMENT)."""
    kind = request.WhichOneof("query")
    if kind is None:
        raise invalid_argument("EMPTY_QUERY", "set one of embedding, study_uid, dicom")
    k = parse_k(request.k, default_k=default_k, max_k=max_k)
    where = request.filter.where.strip() if request.HasField("filter") else ""
    if kind == "embedding":
        vec = parse_embedding(request.embedding, dimension=dimension)
        return SearchQuery("embedding", k, where, embedding=vec)
    if kind == "study_uid":
        uid = request.study_uid.strip()
        if not uid or len(uid) > MAX_STUDY_UID_LENGTH:
            raise invalid_argument(
                "INVALID_STUDY_UID",
                "study_uid must be a study pseudonym of the index (as returned in neighbors)",
            )
        return SearchQuery("study_uid", k, where, study_uid=uid)
    files = parse_dicom(request.dicom, max_files=max_files)
    return SearchQuery("dicom", k, where, dicom_files=files)


# --------------------------------------------------------------------------- responses


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _set_optional(msg: Any, name: str, value: Any) -> None:
    f = _finite(value)
    if f is not None:
        setattr(msg, name, f)


def _float(v: Any) -> float:
    """A required double: None becomes NaN (proto3 has no null for plain doubles)."""
    return float("nan") if v is None else float(v)


def _str_map(d: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (d or {}).items() if v is not None}


def _float_map(d: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        f = _finite(v)
        if f is not None:
            out[str(k)] = f
    return out


def neighbor_to_proto(n: NeighborResult) -> pb.Neighbor:
    outcome = pb.Outcome(labels=_str_map(n.labels), values=_float_map(n.values))
    _set_optional(outcome, "time", n.time)
    if n.event is not None:
        outcome.event = bool(n.event)
    return pb.Neighbor(
        patient_id=str(n.patient_id),
        study_uid=str(n.study_uid),
        similarity=float(n.similarity),
        site=n.site or "",
        acquisition=_str_map(n.acquisition),
        outcome=outcome,
        weight=float(n.weight),
    )


def prognosis_to_proto(p: Prognosis, *, time_unit: str) -> pb.Prognosis:
    msg = pb.Prognosis(
        survival=[
            pb.SurvivalPoint(
                time=float(s.time),
                survival=float(s.survival),
                lower=float(s.lower),
                upper=float(s.upper),
                at_risk=int(s.at_risk),
            )
            for s in p.survival
        ],
        effective_sample_size=float(p.effective_n),
        neighbors_with_outcome=int(p.n_with_outcome),
        events=int(p.n_events),
        warnings=list(p.warnings),
        time_unit=time_unit,
    )
    _set_optional(msg, "median_survival", p.median)
    _set_optional(msg, "median_lower", p.median_lower)
    _set_optional(msg, "median_upper", p.median_upper)
    for h in p.at_horizons:
        he = msg.at_horizons.add(time=float(h.time))
        _set_optional(he, "survival", h.survival)
        _set_optional(he, "lower", h.lower)
        _set_optional(he, "upper", h.upper)
    for name, shares in p.label_distributions.items():
        msg.label_distributions.add(
            name=str(name),
            shares=[
                pb.LabelShare(
                    label=str(s.label),
                    share=float(s.share),
                    lower=float(s.lower),
                    upper=float(s.upper),
                    count=int(s.count),
                )
                for s in shares
            ],
        )
    for name, v in p.value_summaries.items():
        vs = msg.value_summaries.add(name=str(name), mean=_float(v.mean), count=int(v.n))
        _set_optional(vs, "lower", v.lower)
        _set_optional(vs, "upper", v.upper)
    return msg


def diagnostics_to_proto(d: Diagnostics) -> pb.QueryDiagnostics:
    msg = pb.QueryDiagnostics(
        ood_percentile=_float(d.ood_percentile),
        mean_similarity=_float(d.mean_similarity),
        warnings=list(d.warnings),
    )
    _set_optional(msg, "same_scanner_share", d.same_scanner_share)
    _set_optional(msg, "cohort_scanner_share", d.cohort_scanner_share)
    return msg


def search_response(
    result: QueryResult, *, time_unit: str = DEFAULT_TIME_UNIT
) -> pb.SearchSimilarResponse:
    """``QueryResult`` -> ``SearchSimilarResponse`` (neighbours best first)."""
    return pb.SearchSimilarResponse(
        neighbors=[neighbor_to_proto(n) for n in result.neighbors],
        prognosis=prognosis_to_proto(result.prognosis, time_unit=time_unit),
        diagnostics=diagnostics_to_proto(result.diagnostics),
        index_version=str(result.index_version),
        model_version=str(result.model_version),
    )


def _timestamp(value: Any) -> timestamp_pb2.Timestamp | None:
    if not value:
        return None
    try:
        dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def index_info_response(
    info: Mapping[str, Any], *, max_k: int, dicom_supported: bool
) -> pb.GetIndexInfoResponse:
    """``Snapshot.info()`` -> ``GetIndexInfoResponse``."""
    msg = pb.GetIndexInfoResponse(
        num_studies=int(info["num_studies"]),
        dimension=int(info["dimension"]),
        metric=str(info.get("metric", "")),
        index_kind=str(info.get("index_kind", "")),
        model_version=str(info.get("model_version", "")),
        index_version=str(info.get("index_version", "")),
        gpu=bool(info.get("gpu", False)),
        max_k=int(max_k),
        dicom_supported=bool(dicom_supported),
    )
    ts = _timestamp(info.get("created_at"))
    if ts is not None:
        msg.create_time.CopyFrom(ts)
    return msg


def embed_response(
    vector: np.ndarray, model_version: str, acquisition: Mapping[str, Any] | None = None
) -> pb.EmbedStudyResponse:
    """An embedding ``(d,)`` -> ``EmbedStudyResponse``."""
    values = np.asarray(vector, dtype=np.float32).reshape(-1)
    return pb.EmbedStudyResponse(
        embedding=pb.Vector(values=values.tolist()),
        model_version=model_version,
        acquisition=_str_map(acquisition),
    )


__all__ = [
    "DEFAULT_TIME_UNIT",
    "SearchQuery",
    "diagnostics_to_proto",
    "embed_response",
    "index_info_response",
    "neighbor_to_proto",
    "parse_dicom",
    "parse_embedding",
    "parse_k",
    "parse_search_request",
    "prognosis_to_proto",
    "search_response",
]
