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

from indexing.aggregates import Aggregates
from indexing.notices import Notice, WarningCode, code_of, skill_notices
from indexing.prognosis import Prognosis
from indexing.query import Diagnostics, NeighborResult, QueryResult, Stability
from service.api import cohortsim_pb2 as pb
from service.errors import failed_precondition, invalid_argument

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
    include_thumbnails: bool = False
    nprobe: int | None = None  # SearchParameters (approximate indexes); None = index default
    ef_search: int | None = None
    # regions of interest of a DICOM query: (observer, (z0, y0, x0, z1, y1, x1)) in voxel
    # indices of the study's chosen series; empty = the encoder proposes the lesion
    regions: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)
    # per-neighbour occlusion maps over the query's region (DICOM queries only)
    include_explanations: bool = False
    # Vector.model_version of an embedding query; None when the client did not set it
    model_version: str | None = None


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


#: Added to SearchSimilar's diagnostics.warnings for an embedding without model_version.
UNVERSIONED_EMBEDDING_WARNING = Notice(
    WarningCode.QUERY_MODEL_VERSION_UNKNOWN,
    "the embedding carries no model_version, so the server could not check that it was "
    "made by the index's encoder; set Vector.model_version (EmbedStudy returns it)",
)


def check_embedding_model(query: SearchQuery, index_model_version: str) -> list[str]:
    """Refuse an embedding made by another encoder than the index's.

    FAILED_PRECONDITION ``MODEL_VERSION_MISMATCH`` when the query names a different
    model version; returns the warnings for the answer (one when it names none).
    """
    if query.kind != "embedding":
        return []
    if query.model_version is None:
        return [UNVERSIONED_EMBEDDING_WARNING]
    if query.model_version != index_model_version:
        raise failed_precondition(
            "MODEL_VERSION_MISMATCH",
            f"the embedding was made by model {query.model_version!r} but the index holds "
            f"embeddings of model {index_model_version!r}; embed the study with the index's "
            "model (EmbedStudy, or GetIndexInfo for its model_version)",
            expected=index_model_version,
            actual=query.model_version,
        )
    return []


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
        raise invalid_argument("EMPTY_QUERY", "set one of embedding, study_uid, dicom, pacs")
    k = parse_k(request.k, default_k=default_k, max_k=max_k)
    where = request.filter.where.strip() if request.HasField("filter") else ""
    thumbs = bool(request.include_thumbnails)
    explain = bool(request.include_explanations)
    if explain and kind != "dicom":
        raise invalid_argument(
            "EXPLANATIONS_NEED_DICOM",
            "include_explanations needs a DICOM query: the explanation blanks parts of the "
            "query's image, which the server holds only for studies sent as DICOM",
        )
    nprobe, ef_search = parse_search_parameters(request)
    if kind == "embedding":
        vec = parse_embedding(request.embedding, dimension=dimension)
        model = (
            request.embedding.model_version
            if request.embedding.HasField("model_version")
            else None
        )
        return SearchQuery(
            "embedding",
            k,
            where,
            embedding=vec,
            include_thumbnails=thumbs,
            nprobe=nprobe,
            ef_search=ef_search,
            model_version=model,
        )
    if kind == "study_uid":
        uid = request.study_uid.strip()
        if not uid or len(uid) > MAX_STUDY_UID_LENGTH:
            raise invalid_argument(
                "INVALID_STUDY_UID",
                "study_uid must be a study pseudonym of the index (as returned in neighbors)",
            )
        return SearchQuery(
            "study_uid", k, where, study_uid=uid, include_thumbnails=thumbs, nprobe=nprobe, ef_search=ef_search
        )
    files = parse_dicom(request.dicom, max_files=max_files)
    return SearchQuery(
        "dicom", k, where, dicom_files=files, include_thumbnails=thumbs, nprobe=nprobe,
        ef_search=ef_search, regions=parse_regions(request.dicom.regions),
        include_explanations=explain,
    )


MAX_REGIONS = 16
"""Most regions of interest one DICOM query may carry (each is embedded and searched)."""
MAX_OBSERVER_LENGTH = 64


def parse_regions(regions: Any) -> list[tuple[str, tuple[float, ...]]]:
    """``DicomStudy.regions`` -> ``[(observer, box)]``; INVALID_ARGUMENT ``INVALID_REGION``
    unless each box is 6 finite numbers with each upper bound above the lower one."""
    if len(regions) > MAX_REGIONS:
        raise invalid_argument(
            "INVALID_REGION",
            f"{len(regions)} regions of interest; at most {MAX_REGIONS} per query",
        )
    out: list[tuple[str, tuple[float, ...]]] = []
    for i, r in enumerate(regions):
        box = tuple(float(v) for v in r.box)
        observer = r.observer.strip() or f"region {i + 1}"
        if len(observer) > MAX_OBSERVER_LENGTH:
            raise invalid_argument(
                "INVALID_REGION", f"regions[{i}].observer is longer than {MAX_OBSERVER_LENGTH} characters"
            )
        if len(box) != 6 or not all(math.isfinite(v) for v in box):
            raise invalid_argument(
                "INVALID_REGION",
                f"regions[{i}].box must be 6 finite numbers z0, y0, x0, z1, y1, x1 "
                f"(voxel indices of the study's series), got {len(box)} values",
            )
        if any(hi <= lo for lo, hi in zip(box[:3], box[3:], strict=True)):
            raise invalid_argument(
                "INVALID_REGION",
                f"regions[{i}].box is empty: z1, y1, x1 must exceed z0, y0, x0",
            )
        out.append((observer, box))
    return out


def parse_search_parameters(request: pb.SearchSimilarRequest) -> tuple[int | None, int | None]:
    """``search_parameters`` -> ``(nprobe, ef_search)`` (None when unset); the ranges are
    checked against the index by ``indexing.snapshot`` (QueryError -> INVALID_ARGUMENT)."""
    if not request.HasField("search_parameters"):
        return None, None
    p = request.search_parameters
    return (
        int(p.nprobe) if p.HasField("nprobe") else None,
        int(p.ef_search) if p.HasField("ef_search") else None,
    )


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


def warning_to_proto(text: str) -> pb.Warning:
    """An engine warning (:class:`indexing.notices.Notice` or plain text) -> ``Warning``
    with the enum value of the same name (UNSPECIFIED for plain text)."""
    return pb.Warning(code=pb.WarningCode.Value(f"WARNING_CODE_{code_of(text).value}"), message=str(text))


def add_warnings(msg: Any, warnings: list[str]) -> None:
    """Append ``warnings`` to a message's ``warnings`` text list and, coded, to its
    ``warning_details`` (the two lists stay in the same order)."""
    msg.warnings.extend(str(w) for w in warnings)
    msg.warning_details.extend(warning_to_proto(w) for w in warnings)


def region_to_proto(region: Any) -> pb.EmbeddedRegion | None:
    """An :class:`indexing.thumbnails.Region` -> ``EmbeddedRegion`` (None stays unset)."""
    if region is None:
        return None
    return pb.EmbeddedRegion(
        slice_index=int(region.slice_index), box=[int(v) for v in region.box], source=str(region.source)
    )


def explanation_to_proto(e: Any) -> pb.Explanation | None:
    """An :class:`indexing.query.Explanation` -> ``Explanation`` (None stays unset)."""
    if e is None:
        return None
    return pb.Explanation(
        rows=int(e.rows), cols=int(e.cols), weights=[float(v) for v in e.weights],
        overlay_png=e.overlay_png or b"", similarity=float(e.similarity),
    )


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
        thumbnail_png=n.thumbnail or b"",
        region=region_to_proto(n.region),
        explanation=explanation_to_proto(n.explanation),
    )


def neighbor_from_proto(msg: pb.Neighbor, row: int) -> NeighborResult:
    """A site's ``Neighbor`` -> ``NeighborResult`` (``row``: its place in the coordinator's
    merge, not a row of any index the coordinator holds)."""
    out = msg.outcome
    return NeighborResult(
        row=int(row),
        patient_id=msg.patient_id,
        study_uid=msg.study_uid,
        similarity=float(msg.similarity),
        site=msg.site or None,
        acquisition=dict(msg.acquisition),
        time=out.time if out.HasField("time") else None,
        event=out.event if out.HasField("event") else None,
        labels=dict(out.labels),
        values=dict(out.values),
        weight=0.0,
    )


def site_response(part: Any, snapshot: Any) -> pb.SearchSiteResponse:
    """A site's :class:`indexing.engine.SitePart` -> ``SearchSiteResponse``."""
    return pb.SearchSiteResponse(
        neighbors=[neighbor_to_proto(n) for n in part.neighbors],
        index_version=str(snapshot.version),
        model_version=str(snapshot.model_version),
        num_studies=int(snapshot.num_studies),
        ood_percentile=float(part.ood_percentile),
        temperature=float(part.temperature),
    )


def aggregates_to_proto(agg: Aggregates, *, min_cell: int, snapshot: Any) -> pb.AggregateSiteResponse:
    """A site's suppressed :class:`indexing.aggregates.Aggregates` -> ``AggregateSiteResponse``."""
    return pb.AggregateSiteResponse(
        bin_edges=list(agg.edges),
        at_risk=[int(c) for c in agg.at_risk],
        events=[int(c) for c in agg.events],
        weighted_at_risk=[float(w) for w in agg.w_at_risk],
        weighted_events=[float(w) for w in agg.w_events],
        label_counts=[
            pb.LabelCount(name=name, value=value, patient_count=int(c))
            for name, values in sorted(agg.labels.items())
            for value, c in sorted(values.items())
        ],
        patients=int(agg.patients),
        withheld=sorted(agg.withheld),
        min_cell=int(min_cell),
        model_version=str(snapshot.model_version),
        num_studies=int(snapshot.num_studies),
    )


def aggregates_from_proto(msg: pb.AggregateSiteResponse) -> Aggregates:
    """``AggregateSiteResponse`` -> :class:`indexing.aggregates.Aggregates`."""
    labels: dict[str, dict[str, int]] = {}
    for lc in msg.label_counts:
        labels.setdefault(lc.name, {})[lc.value] = int(lc.patient_count)
    return Aggregates(
        tuple(msg.bin_edges),
        np.asarray(msg.at_risk, dtype=np.int64),
        np.asarray(msg.events, dtype=np.int64),
        np.asarray(msg.weighted_at_risk, dtype=np.float64),
        np.asarray(msg.weighted_events, dtype=np.float64),
        labels,
        int(msg.patients),
        set(msg.withheld),
    )


def _survival_points(curve: Any) -> list[pb.SurvivalPoint]:
    return [
        pb.SurvivalPoint(
            time=float(s.time),
            survival=float(s.survival),
            lower=float(s.lower),
            upper=float(s.upper),
            at_risk=int(s.at_risk),
        )
        for s in curve
    ]


def _add_horizons(target: Any, horizons: Any) -> None:
    for h in horizons:
        he = target.add(time=float(h.time))
        _set_optional(he, "survival", h.survival)
        _set_optional(he, "lower", h.lower)
        _set_optional(he, "upper", h.upper)


# The cohort's curve (hundreds of points) is one shared object for every answer of a
# snapshot (indexing.query caches it per snapshot): it is converted once and each
# response copies the converted message (~15 us instead of ~0.35 ms per answer).
_COHORT_CURVES: dict[int, tuple[Any, pb.Prognosis]] = {}
_COHORT_CURVES_KEPT = 8


def _cohort_template(curve: Any) -> pb.Prognosis:
    hit = _COHORT_CURVES.get(id(curve))
    if hit is not None and hit[0] is curve:  # the entry holds the curve: its id is not reused
        return hit[1]
    template = pb.Prognosis(cohort_survival=_survival_points(curve))
    while len(_COHORT_CURVES) >= _COHORT_CURVES_KEPT:
        _COHORT_CURVES.pop(next(iter(_COHORT_CURVES)), None)
    _COHORT_CURVES[id(curve)] = (curve, template)
    return template


def prognosis_to_proto(p: Prognosis, *, time_unit: str) -> pb.Prognosis:
    msg = pb.Prognosis()
    if p.cohort_survival:
        msg.CopyFrom(_cohort_template(p.cohort_survival))
    msg.survival.extend(_survival_points(p.survival))
    msg.temperature = _float(p.temperature)
    msg.effective_sample_size = float(p.effective_n)
    msg.neighbors_with_outcome = int(p.n_with_outcome)
    msg.events = int(p.n_events)
    msg.warnings.extend(list(p.warnings))
    msg.warning_details.extend(warning_to_proto(w) for w in p.warnings)
    msg.time_unit = time_unit
    _set_optional(msg, "median_survival", p.median)
    _set_optional(msg, "median_lower", p.median_lower)
    _set_optional(msg, "median_upper", p.median_upper)
    _set_optional(msg, "cohort_median_survival", p.cohort_median)
    _add_horizons(msg.at_horizons, p.at_horizons)
    _add_horizons(msg.cohort_at_horizons, p.cohort_at_horizons)
    for name, shares in p.label_distributions.items():
        dist = msg.label_distributions.add(
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
        ra = p.reader_agreement.get(name)
        if ra is not None:
            dist.readers.extend(str(r) for r in ra.readers)
            dist.multi_reader_neighbor_count = int(ra.rated_neighbors)
            _set_optional(dist, "reader_agreement", ra.percent_agreement)
            _set_optional(dist, "reader_kappa", ra.fleiss_kappa)
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
        warning_details=[warning_to_proto(w) for w in d.warnings],
    )
    _set_optional(msg, "same_scanner_share", d.same_scanner_share)
    _set_optional(msg, "cohort_scanner_share", d.cohort_scanner_share)
    for c in d.acquisition_checks:
        msg.acquisition_checks.add(
            attribute=c.attribute,
            query_value=str(c.query_value),
            neighbor_share=float(c.neighbor_share),
            cohort_share=float(c.cohort_share),
            seen_in_cohort=bool(c.seen),
        )
    if d.stability is not None:
        _set_stability(msg.stability, d.stability)
    for r in d.regions:
        rp = msg.region_prognoses.add(
            observer=str(r.observer),
            neighbor_overlap=float(r.neighbor_overlap),
            effective_sample_size=_float(r.prognosis.effective_n),
        )
        _set_optional(rp, "median_survival", r.prognosis.median)
        _set_optional(rp, "median_lower", r.prognosis.median_lower)
        _set_optional(rp, "median_upper", r.prognosis.median_upper)
        _add_horizons(rp.at_horizons, r.prognosis.at_horizons)
    if d.region_spread is not None:
        _set_stability(msg.region_spread, d.region_spread)
    return msg


def _set_stability(msg: pb.PredictionStability, st: Stability) -> None:
    msg.view_count = int(st.views)
    msg.mean_neighbor_overlap = float(st.mean_overlap)
    msg.min_neighbor_overlap = float(st.min_overlap)
    msg.median_reached_count = int(st.medians_reached)
    _set_optional(msg, "median_survival_min", st.median_min)
    _set_optional(msg, "median_survival_max", st.median_max)


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
        query_thumbnail_png=result.query_thumbnail or b"",
        query_region=region_to_proto(result.query_region),
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


def prognostic_quality_to_proto(ev: Mapping[str, Any]) -> pb.PrognosticQuality:
    """The manifest's ``prognosis_evaluation`` dict -> ``PrognosticQuality``."""
    msg = pb.PrognosticQuality(
        k=int(ev.get("k") or 0),
        temperature=_float(ev.get("temperature")),
        temperature_source=str(ev.get("temperature_source") or ""),
        restricted_mean_time=_float(ev.get("tau")),
        evaluated_study_count=int(ev.get("evaluated_studies") or 0),
        evaluated_event_count=int(ev.get("evaluated_events") or 0),
    )
    _set_optional(msg, "c_index", ev.get("c_index"))
    ci = ev.get("c_index_interval") or (None, None)
    _set_optional(msg, "c_index_lower", ci[0])
    _set_optional(msg, "c_index_upper", ci[1])
    for cal in ev.get("calibration") or []:
        hc = msg.calibration.add(time=float(cal["time"]))
        _set_optional(hc, "mean_absolute_error", cal.get("mean_absolute_error"))
        mae = cal.get("mean_absolute_error_interval") or (None, None)
        _set_optional(hc, "mean_absolute_error_lower", mae[0])
        _set_optional(hc, "mean_absolute_error_upper", mae[1])
        for g in cal.get("groups") or []:
            cg = hc.groups.add(predicted=float(g["predicted"]), study_count=int(g["study_count"]))
            _set_optional(cg, "observed", g.get("observed"))
            _set_optional(cg, "observed_lower", g.get("observed_lower"))
            _set_optional(cg, "observed_upper", g.get("observed_upper"))
    return msg


def index_info_response(
    info: Mapping[str, Any],
    *,
    max_k: int,
    dicom_supported: bool,
    prognostic_quality: Mapping[str, Any] | None = None,
) -> pb.GetIndexInfoResponse:
    """``Snapshot.info()`` (+ the manifest's ``prognosis_evaluation``) -> ``GetIndexInfoResponse``;
    ``warnings`` are the index-level ones (:func:`indexing.notices.skill_notices`)."""
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
    if prognostic_quality:
        msg.prognostic_quality.CopyFrom(prognostic_quality_to_proto(prognostic_quality))
    msg.warnings.extend(warning_to_proto(w) for w in skill_notices(prognostic_quality))
    return msg


def embed_response(
    vector: np.ndarray, model_version: str, acquisition: Mapping[str, Any] | None = None
) -> pb.EmbedStudyResponse:
    """An embedding ``(d,)`` -> ``EmbedStudyResponse``."""
    values = np.asarray(vector, dtype=np.float32).reshape(-1)
    return pb.EmbedStudyResponse(
        embedding=pb.Vector(values=values.tolist(), model_version=model_version),
        model_version=model_version,
        acquisition=_str_map(acquisition),
    )


__all__ = [
    "DEFAULT_TIME_UNIT",
    "UNVERSIONED_EMBEDDING_WARNING",
    "SearchQuery",
    "check_embedding_model",
    "diagnostics_to_proto",
    "embed_response",
    "index_info_response",
    "neighbor_to_proto",
    "parse_dicom",
    "parse_embedding",
    "parse_k",
    "parse_search_request",
    "prognosis_to_proto",
    "prognostic_quality_to_proto",
    "search_response",
    "warning_to_proto",
]
