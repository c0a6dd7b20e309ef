"""The researcher view: aggregates only, no small groups, no differencing, no re-identification.

A caller whose role lacks the ``identities`` right (``researcher``, see
:mod:`service.auth`) gets no neighbour list, no ``patient_id`` / ``study_uid`` anywhere,
and aggregates over at least ``min_cell`` patients (default 11) in which every count
below ``min_cell`` is withheld. This module builds that answer; the servicer calls it in
one place.

Design
------
An aggregate released to a researcher is a function of a **set of patients** only:

1. **One study per patient, equal weights.** The k nearest *distinct* patients are taken
   (each patient's most similar study). Their outcomes are summarised with equal weights,
   so the answer depends on which patients are in the set and on nothing else (not on
   the query's exact position, which similarity weights would leak).
2. **k on a grid of min_cell.** The requested k is rounded up to a multiple of
   ``min_cell`` (``DisclosureControl.aggregated_patients`` says how many were used). Two
   answers to one query with different k then differ by at least ``min_cell`` patients.
3. **Cell rule.** A count ``c`` out of a shown total ``T`` is released only when
   ``c == 0``, ``c == T``, or ``min_cell <= c <= T - min_cell``: neither the cell nor its
   complement (``T - c``, which the reader could compute) may hold 1..min_cell-1 patients.
   Values computed from a withheld count (a label's share and interval, a numeric mean,
   a share of scanners) are withheld with it. Counts of patients who *have* a record
   (with a survival outcome, with a label, with a value) need only be 0 or at least
   ``min_cell``: their complement, patients without the record, reveals no outcome. Label distributions get secondary
   suppression: when the withheld labels together hold fewer than ``min_cell`` patients,
   the next smallest labels are withheld too, so the gap left in the shares never
   isolates a small group. ``DisclosureControl.withheld_fields`` lists what was withheld.
4. **Survival curves on a coarse grid.** Kaplan–Meier step times are individual event
   times, and the drop between two steps reveals how many died in between. The
   researcher curve is reported only at multiples of ``time_grid`` (default 3 time
   units), with at least ``min_cell`` events between consecutive reported points, and
   only while at least ``min_cell`` patients remain at risk. Horizons (12, 24, 60) are
   preferred reporting points; a horizon that cannot be reported under these rules is
   left unset. The median is read off the reported points. The whole cohort's curve is
   coarsened the same way.
5. **Differencing across answers.** Every patient set released to a principal (the
   authenticated caller; one ``anonymous`` principal without authentication) is
   remembered in that principal's record (:class:`service.releases.ReleaseBook`), by
   measure, across SearchSimilar, GetCohortStats and the federated site's AggregateSite.
   A new answer whose set differs from an earlier one by 1..min_cell-1 patients in either
   direction, or that with two earlier sets forms A, B, A ∪ B with a small A ∩ B, is
   refused (PERMISSION_DENIED, ``ANSWER_DIFFERENCING``, ErrorInfo metadata ``rule``). The
   same set again is allowed (the same answer). This covers k stepping, query
   perturbation, filter pairs and before/after-ingest pairs alike, because it is checked
   on what is released, not on how it was asked. One principal's record never refuses
   another's answers; principals who pool their answers are not covered (SECURITY.md).
   The records are rebuilt from the audit log at start when one is configured.
6. **Filters.** A researcher's filter may read site and acquisition columns only
   (:data:`RESEARCHER_FILTER_COLUMNS`), never identifiers or outcomes: with
   ``event = false OR patient_id <> X`` the mere acceptance or refusal of a filter would
   reveal X's outcome. Its sub-cohort (distinct patients matching ``Filter.where``) must
   hold at least ``min_cell`` patients, and must differ from the whole cohort and from
   every sub-cohort already answered to the same principal by 0 or at least ``min_cell``
   patients, nor be the union of two of them with a small overlap
   (``FILTER_BELOW_MIN_CELL``, ``FILTER_DIFFERENCING`` with its ``rule``), so that
   ``A AND NOT x`` next to ``A`` is refused before any search runs. A federated site
   applies the same rules to the filter of ``AggregateSite``.
7. **Re-identification guard.** A neighbour whose similarity to the uploaded study is at
   least ``reid_similarity`` (default 0.95) is taken to be the same patient: all of that
   patient's studies are removed from the aggregate, and the next patients fill the set,
   so the answer looks as if the patient were not in the cohort. The number removed goes
   to the audit record only, never to the researcher. Queries by ``study_uid`` are
   refused for researchers (``STUDY_QUERY_NOT_ALLOWED``): they would confirm that a study
   is in the cohort.
8. **Fail closed.** The answer is built from scratch and then checked against
   :data:`SEARCH_RULES`, a rule for every field of ``SearchSimilarResponse`` (by path).
   A field without a rule is cleared, and a test fails when the proto gains a field
   (e.g. a new count) that has no rule here. Free-text warnings that contain digits are
   dropped (they may quote counts). ``GetIndexInfo`` is treated the same way
   (:data:`INDEX_INFO_RULES`).

What this does not stop (see SECURITY.md): combinations of four or more answers whose
pairwise differences are all large but whose inclusion–exclusion isolates a small group;
two principals differencing their answers together; differencing across server replicas
or after the audit log is replaced (the records are per process); a re-identification
match below ``reid_similarity``. Counts of
censored patients between two reported curve points are not suppressed (censoring is not
an outcome).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from indexing.evaluation import EVALUATION_KEY
from indexing.notices import skill_notices
from indexing.prognosis import ood_percentile, summarize
from indexing.query import OOD_WARN_PERCENTILE, OOD_WARNING, NeighborResult, QueryResult
from service import convert
from service.api import cohortsim_pb2 as pb
from service.auth import Principal
from service.disclosure import (
    CoarseCurve,
    DisclosurePolicy,
    ReleaseRegistry,
    available,
    coarse_curve,
    principal_record,
    record_or_refuse,
    releasable,
)
from service.errors import ServiceError, invalid_argument
from service.releases import AGGREGATE, ANONYMOUS, SURVIVAL, Conflict, ReleaseBook, ReleaseRecord

#: The measure of a researcher filter's sub-cohort in a principal's record (filters are
#: compared with filters only: point 6 of the module docstring).
FILTER = "filter"
#: What a forwarded principal id may look like (a coordinator's ON_BEHALF_OF_KEY header).
_PRINCIPAL_ID = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}")
#: The rules of service.releases, as a refusal's message names them.
_RULE_WORDS = {
    "pair": "two answers whose patients differ by",
    "union": "two answers and their union (A, B, A ∪ B), whose overlap holds",
    "small": "an answer over a group of",
}

# Rules for response fields, by path (field names joined by ".", repeated indices left out).
KEEP = "keep"  # released as built (aggregate-level, or computed from released counts)
DROP = "drop"  # never released to researchers (individual-level or not needed)
COUNT = "count"  # a number of patients/studies: cell rule; the final pass zeroes 1..m-1
DERIVED = "derived"  # computed from a count; the builder withholds it with its count
TEXT = "text"  # free text; the builder drops entries that contain digits

_POINT = {"time": KEEP, "survival": KEEP, "lower": KEEP, "upper": KEEP, "at_risk": COUNT}
_HORIZON = {"time": KEEP, "survival": KEEP, "lower": KEEP, "upper": KEEP}


def _nest(prefix: str, rules: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}.{k}": v for k, v in rules.items()}


#: What the researcher view does with every field of SearchSimilarResponse.
# What a researcher may send as the query of SearchSimilar (the request's `query` oneof)
# and EmbedStudy (its fields): "allowed", or the ErrorInfo reason of the refusal
# (PERMISSION_DENIED). A study id of the cohort or a PACS reference would tell whether a
# study exists (in the cohort, in the hospital's PACS). A test fails when the proto gains
# a query kind without a rule here.
RESEARCHER_QUERY_RULES: dict[str, str] = {
    "SearchSimilarRequest.embedding": "allowed",
    "SearchSimilarRequest.dicom": "allowed",
    "SearchSimilarRequest.study_uid": "STUDY_QUERY_NOT_ALLOWED",
    "SearchSimilarRequest.pacs": "PACS_QUERY_NOT_ALLOWED",
    "EmbedStudyRequest.dicom": "allowed",
    "EmbedStudyRequest.pacs": "PACS_QUERY_NOT_ALLOWED",
}

SEARCH_RULES: dict[str, str] = {
    "neighbors": DROP,
    "index_version": KEEP,
    "model_version": KEEP,
    "query_thumbnail_png": DROP,
    "federation": DROP,  # set by a coordinator, which answers clinicians only
    "query_region": DROP,  # where the query's embedding was cut: per-study, like thumbnails
    "prognosis": KEEP,
    "prognosis.survival": KEEP,
    **_nest("prognosis.survival", _POINT),
    "prognosis.median_survival": KEEP,
    "prognosis.median_lower": KEEP,
    "prognosis.median_upper": KEEP,
    "prognosis.at_horizons": KEEP,
    **_nest("prognosis.at_horizons", _HORIZON),
    "prognosis.effective_sample_size": DERIVED,  # equal weights: = neighbors_with_outcome
    "prognosis.neighbors_with_outcome": COUNT,
    "prognosis.events": COUNT,
    "prognosis.label_distributions": KEEP,
    "prognosis.label_distributions.name": KEEP,
    "prognosis.label_distributions.shares": KEEP,
    "prognosis.label_distributions.shares.label": DERIVED,
    "prognosis.label_distributions.shares.share": DERIVED,
    "prognosis.label_distributions.shares.lower": DERIVED,
    "prognosis.label_distributions.shares.upper": DERIVED,
    "prognosis.label_distributions.shares.count": COUNT,
    "prognosis.label_distributions.readers": KEEP,
    "prognosis.label_distributions.multi_reader_neighbor_count": COUNT,
    "prognosis.label_distributions.reader_agreement": DERIVED,
    "prognosis.label_distributions.reader_kappa": DERIVED,
    "prognosis.value_summaries": KEEP,
    "prognosis.value_summaries.name": KEEP,
    "prognosis.value_summaries.mean": DERIVED,
    "prognosis.value_summaries.lower": DERIVED,
    "prognosis.value_summaries.upper": DERIVED,
    "prognosis.value_summaries.count": COUNT,
    "prognosis.warnings": TEXT,
    "prognosis.warning_details": KEEP,
    "prognosis.warning_details.code": KEEP,  # a fixed enum: reveals no count
    "prognosis.warning_details.message": TEXT,  # cleared when it holds digits
    "prognosis.time_unit": KEEP,
    "prognosis.cohort_survival": KEEP,
    **_nest("prognosis.cohort_survival", _POINT),
    "prognosis.cohort_median_survival": KEEP,
    "prognosis.cohort_at_horizons": KEEP,
    **_nest("prognosis.cohort_at_horizons", _HORIZON),
    "prognosis.temperature": DROP,  # researcher aggregates are unweighted
    "diagnostics": KEEP,
    "diagnostics.ood_percentile": KEEP,
    "diagnostics.mean_similarity": KEEP,
    "diagnostics.same_scanner_share": DERIVED,
    "diagnostics.cohort_scanner_share": DERIVED,
    "diagnostics.warnings": TEXT,
    "diagnostics.warning_details": KEEP,
    "diagnostics.warning_details.code": KEEP,
    "diagnostics.warning_details.message": TEXT,
    "diagnostics.acquisition_checks": DROP,  # shares over the unfiltered neighbours
    "diagnostics.stability": DROP,  # overlaps of neighbour sets
    "diagnostics.region_prognoses": DROP,  # weighted, over unfiltered neighbours
    "diagnostics.region_spread": DROP,  # overlaps of neighbour sets
    "disclosure_control": KEEP,
    "disclosure_control.min_cell_count": KEEP,
    "disclosure_control.aggregated_patients": COUNT,
    "disclosure_control.withheld_fields": KEEP,
}

#: What the researcher view does with every field of GetIndexInfoResponse.
INDEX_INFO_RULES: dict[str, str] = {
    "num_studies": COUNT,
    "dimension": KEEP,
    "metric": KEEP,
    "index_kind": KEEP,
    "model_version": KEEP,
    "index_version": KEEP,
    "gpu": KEEP,
    "create_time": KEEP,
    "create_time.seconds": KEEP,
    "create_time.nanos": KEEP,
    "max_k": KEEP,
    "dicom_supported": KEEP,
    "prognostic_quality": KEEP,
    "prognostic_quality.k": KEEP,
    "prognostic_quality.temperature": KEEP,
    "prognostic_quality.temperature_source": KEEP,
    "prognostic_quality.c_index": KEEP,
    "prognostic_quality.c_index_lower": KEEP,  # a bootstrap interval of a KEEP figure
    "prognostic_quality.c_index_upper": KEEP,
    "prognostic_quality.restricted_mean_time": KEEP,
    "prognostic_quality.evaluated_study_count": COUNT,
    "prognostic_quality.evaluated_event_count": COUNT,
    "prognostic_quality.calibration": KEEP,
    "prognostic_quality.calibration.time": KEEP,
    "prognostic_quality.calibration.mean_absolute_error": KEEP,
    "prognostic_quality.calibration.mean_absolute_error_lower": KEEP,
    "prognostic_quality.calibration.mean_absolute_error_upper": KEEP,
    "prognostic_quality.calibration.groups": KEEP,
    "prognostic_quality.calibration.groups.predicted": DERIVED,
    "prognostic_quality.calibration.groups.observed": DERIVED,
    "prognostic_quality.calibration.groups.observed_lower": DERIVED,
    "prognostic_quality.calibration.groups.observed_upper": DERIVED,
    "prognostic_quality.calibration.groups.study_count": COUNT,
    "federation": DROP,  # a coordinator's per-site counts and versions: clinicians only
    "warnings": KEEP,  # the index's skill: the researcher sees the code always
    "warnings.code": KEEP,
    "warnings.message": TEXT,  # cleared when it holds digits (it may quote counts)
}

_CATEGORY = {"value": KEEP, "study_count": COUNT, "patient_count": COUNT}

#: What the researcher view does with every field of GetCohortStatsResponse: counts by
#: the cell rule (a category's count, and its complement in the cohort, >= min_cell or 0).
COHORT_STATS_RULES: dict[str, str] = {
    "study_count": COUNT,
    "patient_count": COUNT,
    "sites": KEEP,
    **_nest("sites", _CATEGORY),
    "scanners": KEEP,
    **_nest("scanners", _CATEGORY),
    "labels": KEEP,
    "labels.name": KEEP,
    "labels.value": KEEP,
    "labels.patient_count": COUNT,
    "index_version": KEEP,
    "disclosure_control": KEEP,
    "disclosure_control.min_cell_count": KEEP,
    "disclosure_control.aggregated_patients": COUNT,
    "disclosure_control.withheld_fields": KEEP,
}

#: Integer fields that are not counts of people (settings, sizes, timestamps).
NOT_COUNTS: frozenset[str] = frozenset(
    {
        "disclosure_control.min_cell_count",
        "dimension",
        "max_k",
        "create_time.seconds",
        "create_time.nanos",
        "prognostic_quality.k",
    }
)

_DIGIT = re.compile(r"\d")

#: Columns a researcher's Filter.where may read: site and acquisition, never identifiers
#: or outcomes (selecting on an outcome would let an answer's refusal reveal it).
RESEARCHER_FILTER_COLUMNS: frozenset[str] = frozenset(
    {
        "site",
        "modality",
        "study_day",
        "manufacturer",
        "model",
        "kernel",
        "kvp",
        "slice_thickness",
        "pixel_spacing",
    }
)


def permission_denied(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, reason, message, metadata)


def differencing_refused(conflict: Conflict, min_cell: int, what: str, advice: str = "") -> ServiceError:
    """PERMISSION_DENIED ``ANSWER_DIFFERENCING`` naming the rule ``conflict`` broke
    (ErrorInfo metadata ``rule``: pair, union or small)."""
    words = _RULE_WORDS.get(conflict.rule, conflict.rule)
    return permission_denied(
        "ANSWER_DIFFERENCING",
        f"{what} would, with earlier answers to this caller, give {words} fewer than "
        f"{min_cell} patients ({conflict.rule} rule); comparing them could describe a small "
        f"group, so it is refused{advice}",
        min_cell=str(min_cell),
        rule=conflict.rule,
    )


def principal_key(principal: Principal | None) -> str:
    """Whose release record a call consults: the principal's id (token id or certificate
    name), or :data:`service.releases.ANONYMOUS` on a server without authentication."""
    return principal.id if principal is not None else ANONYMOUS


# --------------------------------------------------------------------------- rules pass


def _is_map(fd: Any) -> bool:
    mt = fd.message_type
    return mt is not None and mt.GetOptions().map_entry


def field_paths(descriptor: Any, prefix: str = "", stop: Iterable[str] = ()) -> list[str]:
    """Every field path of a message type (not descending into maps or ``stop`` paths)."""
    stop = set(stop)
    out: list[str] = []
    for fd in descriptor.fields:
        path = prefix + fd.name
        out.append(path)
        if path in stop:
            continue
        if fd.message_type is not None and not _is_map(fd):
            out.extend(field_paths(fd.message_type, path + ".", stop))
    return out


def enforce(msg: Message, rules: dict[str, str], min_cell: int, prefix: str = "") -> list[str]:
    """The last line of defence: clear fields without a rule or ruled DROP, and zero any
    count in 1..min_cell-1. Returns the paths it withheld."""
    withheld: list[str] = []
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        rule = rules.get(path)
        if rule is None or rule == DROP:
            msg.ClearField(fd.name)
            withheld.append(path)
            continue
        if fd.message_type is not None and not _is_map(fd):
            items = value if fd.is_repeated else [value]
            for item in items:
                withheld.extend(enforce(item, rules, min_cell, path + "."))
        elif rule == COUNT and not fd.is_repeated and isinstance(value, int) and 0 < value < min_cell:
            setattr(msg, fd.name, 0)
            withheld.append(path)
    return withheld


# --------------------------------------------------------------------------- the view


@dataclass
class ResearcherAnswer:
    """The governed response and the facts for the audit record (never sent)."""

    response: pb.SearchSimilarResponse
    facts: dict[str, Any] = field(default_factory=dict)


def _scanner(acq: dict[str, Any] | None) -> tuple[str, str] | None:
    if not acq:
        return None
    mf, md = acq.get("manufacturer"), acq.get("model")
    if not mf and not md:
        return None
    return (str(mf or "").strip().casefold(), str(md or "").strip().casefold())


def _has(msg: Any, name: str) -> bool:
    return name in msg.DESCRIPTOR.fields_by_name


class Governance:
    """Applies a :class:`DisclosurePolicy` to callers without the ``identities`` right."""

    def __init__(self, policy: DisclosurePolicy | None = None) -> None:
        self.policy = policy or DisclosurePolicy()
        m, limit = self.policy.min_cell, self.policy.registry_limit
        # per principal: what its answers (search, cohort stats, site aggregates) released,
        # by measure, and its filters' sub-cohorts (measure FILTER)
        self.book = ReleaseBook(
            m, limit=limit, max_principals=self.policy.max_principals,
            max_members=self.policy.max_recorded,
        )
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def record(self, principal: str) -> ReleaseRecord:
        """``principal``'s release record (RESOURCE_EXHAUSTED when the book is full)."""
        return principal_record(self.book, principal)

    def release_principal(self, principal: Principal | None, on_behalf_of: str | None) -> str:
        """Whose record a federated site's AggregateSite consults: the end user a
        coordinator names in ``on_behalf_of`` when the caller is a coordinator listed in
        ``policy.trusted_coordinators``, otherwise the caller itself (a coordinator that
        is not trusted gets one record for all its users)."""
        own = principal_key(principal)
        if on_behalf_of is None or principal is None:
            return own
        if principal.id not in self.policy.trusted_coordinators:
            return own
        if not _PRINCIPAL_ID.fullmatch(on_behalf_of):
            raise invalid_argument(
                "INVALID_ON_BEHALF_OF",
                "the forwarded principal must be 1 to 128 letters, digits or ._:@/+-",
            )
        return on_behalf_of

    @staticmethod
    def restricts(principal: Principal | None) -> bool:
        """True for a caller that gets the researcher view (None: no authentication)."""
        return principal is not None and not principal.has("identities")

    # ----------------------------------------------------------------- replay
    def replay(self, records: Iterable[dict[str, Any]], snapshot: Any = None) -> int:
        """Re-register what earlier answers released (from audit records), each in the
        record of the principal it was released to (``release_principal``, else the
        record's ``principal``).

        Search and site answers carry their patients (``aggregated_patients``); cohort
        statistics (``stats_released``) and filters are evaluated again on ``snapshot``
        (when given). Returns the answers replayed.
        """
        from indexing.errors import FilterError

        n = 0
        for rec in records:
            if rec.get("status") != "OK":
                continue
            kind = rec.get("release_kind")
            patients = rec.get("aggregated_patients")
            if not (patients or kind == "stats"):
                continue
            key = str(rec.get("release_principal") or rec.get("principal") or ANONYMOUS)
            record = self.book.record(key, force=True)
            where = rec.get("filter")
            truncated = "filter_sha256" in rec  # the record kept a prefix only
            where = where.strip() if isinstance(where, str) and not truncated else ""
            if snapshot is None:
                if isinstance(patients, list) and patients:
                    record.add([(AGGREGATE, (str(p) for p in patients))])
                    n += 1
                continue
            if kind == "stats":
                with contextlib.suppress(FilterError):  # a filter the index cannot evaluate
                    if isinstance(patients, list):  # a filter too long for the record
                        chosen = [str(p) for p in patients]
                        record.add([(FILTER, chosen)])
                    elif truncated:
                        continue
                    else:
                        chosen = self._filter_patients(snapshot, where) if where else sorted(
                            self._live_patients(snapshot)
                        )
                    record.add(self._stats_releases(snapshot, chosen))
                    n += 1
            elif isinstance(patients, list) and patients:
                outcomes = self._patient_outcomes(snapshot)
                rows = [(str(p), *outcomes.get(str(p), (None, None, None, None))) for p in patients]
                sets = release_sets(rows)
                measures = rec.get("released_measures")
                if isinstance(measures, list):  # a site's counts: the measures it showed
                    sets = [(name, ps) for name, ps in sets if name in measures]
                record.add(sets)
                if rec.get("cohort_curve_released"):
                    record.add([(SURVIVAL, self._cohort_survival_patients(snapshot))])
                n += 1
            if where:
                with contextlib.suppress(FilterError):
                    record.add([(FILTER, self._filter_patients(snapshot, where))])
        return n

    # ----------------------------------------------------------------- helpers
    def _cached(self, snapshot: Any, key: str, make: Callable[[], Any]) -> Any:
        k = (str(snapshot.version), key)
        with self._lock:
            if k in self._cache:
                return self._cache[k]
        value = make()
        with self._lock:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[k] = value
        return value

    def _patient_ids(self, snapshot: Any) -> np.ndarray:
        return self._cached(
            snapshot,
            "patients",
            lambda: np.asarray(snapshot.metadata.column("patient_id").to_pylist(), dtype=object),
        )

    def _live(self, snapshot: Any, mask: np.ndarray | None = None) -> np.ndarray:
        """``mask`` (default: every row) without the rows of withdrawn patients."""
        n = len(self._patient_ids(snapshot))
        live = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
        deleted = getattr(snapshot, "deleted_rows", None)
        if deleted is not None:
            rows = np.fromiter(deleted(), dtype=np.int64)
            live[rows[rows < n]] = False
        return live

    def _deleted_key(self, snapshot: Any) -> int:
        deleted = getattr(snapshot, "deleted_rows", None)
        return hash(deleted()) if deleted is not None else 0

    def _patient_outcomes(self, snapshot: Any) -> dict[str, tuple[Any, Any, Any, Any]]:
        """Each patient's ``(time, event, labels, values)`` (outcomes are per patient)."""

        def make() -> dict[str, tuple[Any, Any, Any, Any]]:
            meta = snapshot.metadata
            names = [c for c in ("time", "event", "labels", "values") if c in meta.column_names]
            cols = meta.select(["patient_id", *names]).to_pydict()
            out: dict[str, tuple[Any, Any, Any, Any]] = {}
            for i, pid in enumerate(cols["patient_id"]):
                t, e, labels, values = (
                    cols[c][i] if c in cols else None for c in ("time", "event", "labels", "values")
                )
                # any of the patient's rows with a survival outcome; labels and values merged
                had = out.get(str(pid), (None, None, {}, {}))
                if _has_survival(had[0], had[1]) or not _has_survival(t, e):
                    t, e = had[0], had[1]
                out[str(pid)] = (t, e, {**dict(labels or []), **had[2]}, {**dict(values or []), **had[3]})
            return out

        outcomes: dict[str, tuple[Any, Any, Any, Any]] = self._cached(snapshot, "outcomes", make)
        return outcomes

    def _live_patients(self, snapshot: Any) -> frozenset[str]:
        """The distinct patients not withdrawn (cached until the tombstones change)."""
        key = f"live-{self._deleted_key(snapshot)}"
        live: frozenset[str] = self._cached(
            snapshot,
            key,
            lambda: frozenset(str(p) for p in self._patient_ids(snapshot)[self._live(snapshot)].tolist()),
        )
        return live

    def _cohort_survival_patients(self, snapshot: Any) -> frozenset[str]:
        """The live patients the whole cohort's survival curve counts."""
        outcomes = self._patient_outcomes(snapshot)
        return frozenset(
            p for p in self._live_patients(snapshot) if _has_survival(*outcomes.get(p, (None, None))[:2])
        )

    def _filter_patients(self, snapshot: Any, where: str) -> list[str]:
        """The distinct (not withdrawn) patients of the rows ``where`` selects."""
        if hasattr(snapshot, "filter_mask"):
            mask = snapshot.filter_mask(where)  # cached per snapshot
        else:
            from indexing.filter import compile_where

            mask = compile_where(where, snapshot.metadata)
        rows = self._live(snapshot, mask)
        return sorted({str(p) for p in self._patient_ids(snapshot)[rows].tolist()})

    def check_filter(self, snapshot: Any, where: str, *, principal: str = ANONYMOUS) -> list[str]:
        """Refuse a filter on other than site/acquisition columns, or whose sub-cohort is
        small or differs slightly from the cohort or an earlier filter of ``principal``'s."""
        from indexing.filter import parse_where

        m = self.policy.min_cell
        used = sorted({c.casefold() for c in _filter_columns(parse_where(where))})
        refused = [c for c in used if c not in RESEARCHER_FILTER_COLUMNS]
        if refused:
            raise permission_denied(
                "FILTER_COLUMN_NOT_ALLOWED",
                f"researchers may filter on {', '.join(sorted(RESEARCHER_FILTER_COLUMNS))} "
                f"only, not on {', '.join(refused)}: a filter on outcomes or identifiers could "
                "make the answer (or its refusal) reveal one patient's data",
            )
        chosen = self._filter_patients(snapshot, where)
        if len(chosen) < m:
            raise permission_denied(
                "FILTER_BELOW_MIN_CELL",
                f"the filter selects fewer than {m} patients; researchers receive aggregates "
                f"over at least {m} patients only, so widen the filter",
                min_cell=str(m),
            )
        record = self.record(principal)
        record.add([(FILTER, self._live_patients(snapshot))])  # the whole cohort, unfiltered
        found = record_or_refuse(record, [(FILTER, chosen)])
        if found is not None:
            raise permission_denied(
                "FILTER_DIFFERENCING",
                f"the filter's patients, beside the whole cohort's and this caller's earlier "
                f"filters', give {_RULE_WORDS.get(found.rule, found.rule)} fewer than {m} "
                f"patients ({found.rule} rule); comparing the answers would describe a "
                "small group, so this filter is refused",
                min_cell=str(m),
                rule=found.rule,
            )
        return chosen

    def _select(
        self, neighbors: Sequence[NeighborResult], k: int
    ) -> tuple[list[NeighborResult], int]:
        """The first ``k`` distinct patients, without near-exact matches (and their patients)."""
        threshold = self.policy.reid_similarity
        matched = {nb.patient_id for nb in neighbors if nb.similarity >= threshold}
        seen: set[str] = set()
        kept: list[NeighborResult] = []
        for nb in neighbors:
            if nb.patient_id in matched or nb.patient_id in seen:
                continue
            seen.add(nb.patient_id)
            kept.append(nb)
            if len(kept) == k:
                break
        return kept, len(matched)

    # ----------------------------------------------------------------- search
    def researcher_search(
        self,
        snapshot: Any,
        query: convert.SearchQuery,
        *,
        run: Callable[[convert.SearchQuery], QueryResult],
        embed: Callable[[list[bytes]], Any] | None = None,
        time_unit: str = convert.DEFAULT_TIME_UNIT,
        principal: str = ANONYMOUS,
    ) -> ResearcherAnswer:
        """The governed answer to a search (blocking: call it on a worker thread).

        ``run(query)`` searches the snapshot (with the query's k and filter); ``embed``
        embeds DICOM files once (the searches then use the vector); ``principal``: whose
        release record the answer is checked against and added to (:func:`principal_key`).
        """
        m = self.policy.min_cell
        if query.kind == "study_uid":
            raise permission_denied(
                "STUDY_QUERY_NOT_ALLOWED",
                "researchers query with an embedding or DICOM files, not with a study id "
                "of the cohort",
            )
        facts: dict[str, Any] = {}
        if query.where:
            pool = len(self.check_filter(snapshot, query.where, principal=principal))
            facts["filter_patient_count"] = pool
        else:
            pool = len(self._live_patients(snapshot))
        acquisition: dict[str, Any] | None = None
        if query.kind == "dicom":
            if embed is None:
                raise permission_denied("DICOM_NOT_ALLOWED", "send an embedding")
            embedded = embed(query.dicom_files)
            acquisition = dict(embedded.acquisition or {})
            query = dataclasses.replace(
                query, kind="embedding", embedding=embedded.vector, dicom_files=[]
            )
        if _has_field(query, "include_thumbnails"):
            query = dataclasses.replace(query, include_thumbnails=False)
        if _has_field(query, "include_explanations"):  # per-neighbour maps: never released
            query = dataclasses.replace(query, include_explanations=False)
        # At most the pool less min_cell (on the grid): a member removed by the guard
        # (point 7) leaves the same number of patients as a non-member's query, so the
        # answer's size never says whether the query is in the cohort.
        target = min(self.policy.aggregate_size(query.k), ((pool - m) // m) * m)
        too_few = permission_denied(
            "TOO_FEW_PATIENTS",
            "too few patients are available"
            + (" under this filter" if query.where else "")
            + f"; researchers receive aggregates over at least {m} patients, drawn from "
            f"a pool of at least {2 * m}",
            min_cell=str(m),
        )
        if target < m:
            raise too_few
        n = int(snapshot.num_studies)
        fetch = min(n, 2 * target + 16)
        while True:
            result = run(dataclasses.replace(query, k=fetch))
            kept, removed = self._select(result.neighbors, target)
            if len(kept) >= target or fetch >= n or len(result.neighbors) < fetch:
                break
            fetch = min(n, fetch * 2)
        if len(kept) < target:  # more than min_cell patients matched the guard
            raise too_few
        patients = sorted(nb.patient_id for nb in kept)
        releases = release_sets(
            [(nb.patient_id, nb.time, nb.event, nb.labels, nb.values) for nb in kept]
        )
        record = self.record(principal)
        if self.policy.answer_differencing and (found := record_or_refuse(record, releases)):
            raise differencing_refused(
                found, m, "this answer",
                f". Ask for a larger k (a multiple of {m}) or a different query",
            )
        horizons = [h.time for h in result.prognosis.at_horizons] or [12.0, 24.0, 60.0]
        response, withheld = self._build(
            snapshot, result, kept, acquisition, horizons, time_unit, record
        )
        facts.update(
            release_principal=principal,
            cohort_curve_released=bool(response.prognosis.cohort_survival),
            aggregated_patients=patients,
            reid_matches_removed=removed,
            withheld_fields=len(withheld),
        )
        return ResearcherAnswer(response, facts)

    def _build(
        self,
        snapshot: Any,
        result: QueryResult,
        kept: list[NeighborResult],
        acquisition: dict[str, Any] | None,
        horizons: Sequence[float],
        time_unit: str,
        record: ReleaseRecord,
    ) -> tuple[pb.SearchSimilarResponse, list[str]]:
        m, size = self.policy.min_cell, len(kept)
        withheld: list[str] = []
        p = summarize(
            [nb.time for nb in kept],
            [nb.event for nb in kept],
            np.ones(size),
            [nb.labels for nb in kept],
            [nb.values for nb in kept],
            horizons=horizons,
        )
        # the index's skill heads the answer, as in every other view
        p.warnings[:0] = skill_notices((getattr(snapshot, "manifest", None) or {}).get(EVALUATION_KEY))
        prog = convert.prognosis_to_proto(p, time_unit=time_unit)
        if _has(prog, "temperature"):
            prog.ClearField("temperature")

        # survival: counts, coarse curve, median, horizons
        rows = [(nb.time, nb.event) for nb in kept if nb.time is not None and nb.event is not None]
        n_out = len(rows)
        n_ev = sum(1 for _, ev in rows if ev)
        show_out = available(n_out, m)
        if not show_out:
            prog.neighbors_with_outcome = 0
            prog.effective_sample_size = 0.0
            withheld += ["prognosis.neighbors_with_outcome", "prognosis.effective_sample_size"]
        else:
            prog.effective_sample_size = float(n_out)
        if not (show_out and releasable(n_ev, n_out, m)):
            prog.events = 0
            withheld.append("prognosis.events")
        curve = None
        if show_out and n_out:
            curve = coarse_curve(
                [r[0] for r in rows],
                [bool(r[1]) for r in rows],
                min_cell=m,
                grid=self.policy.time_grid,
                horizons=horizons,
            )
        withheld += self._set_curve(prog, "", curve, horizons)
        if _has(prog, "cohort_survival"):
            withheld += self._set_curve(
                prog, "cohort_", self._released_cohort_curve(snapshot, horizons, record), horizons
            )

        withheld += self._labels(prog, kept)
        withheld += self._values(prog, size)
        withheld += _filter_text(prog.warnings, "prognosis.warnings")
        withheld += _filter_details(prog.warning_details, "prognosis.warning_details")

        diag = self._diagnostics(snapshot, kept, acquisition, withheld)
        response = pb.SearchSimilarResponse(
            prognosis=prog,
            diagnostics=diag,
            index_version=str(result.index_version),
            model_version=str(result.model_version),
        )
        withheld += enforce(response, SEARCH_RULES, m)
        dc = response.disclosure_control
        dc.min_cell_count = m
        dc.aggregated_patients = size
        dc.withheld_fields.extend(dict.fromkeys(withheld))
        return response, withheld

    def _set_curve(
        self, prog: Any, prefix: str, curve: CoarseCurve | None, horizons: Sequence[float]
    ) -> list[str]:
        survival, horizons_field = prefix + "survival", prefix + "at_horizons"
        median_field = "cohort_median_survival" if prefix else "median_survival"
        del getattr(prog, survival)[:]
        del getattr(prog, horizons_field)[:]
        for name in (median_field, *(() if prefix else ("median_lower", "median_upper"))):
            prog.ClearField(name)
        withheld: list[str] = []
        if curve is None:
            withheld.append(f"prognosis.{survival}")
        else:
            for t, s, lo, hi, r in curve.points:
                getattr(prog, survival).add(time=t, survival=s, lower=lo, upper=hi, at_risk=r)
            for name, index in ((median_field, 1), ("median_lower", 2), ("median_upper", 3)):
                if prefix and name != median_field:
                    continue
                # the lower band crosses 0.5 first: it bounds the median from below
                value = curve.first_at_or_below(index)
                if value is not None:
                    setattr(prog, name, value)
        for i, h in enumerate(horizons):
            he = getattr(prog, horizons_field).add(time=float(h))
            got = curve.horizons.get(float(h)) if curve is not None else None
            if got is None:
                withheld.append(f"prognosis.{horizons_field}[{i}]")
                continue
            he.survival, he.lower, he.upper = got
        return withheld

    def _released_cohort_curve(
        self, snapshot: Any, horizons: Sequence[float], record: ReleaseRecord
    ) -> CoarseCurve | None:
        """The whole cohort's curve, unless its patients, beside the neighbours' curve of
        this answer and every curve released before to this principal (``record``),
        would isolate a small group (then None: withheld). Withdrawn patients are never
        counted."""
        everyone = self._cohort_survival_patients(snapshot)
        if len(everyone) < self.policy.min_cell:
            return None
        if self.policy.answer_differencing and record_or_refuse(record, [(SURVIVAL, everyone)]):
            return None
        return self._cohort_curve(snapshot, horizons)

    def _cohort_curve(self, snapshot: Any, horizons: Sequence[float]) -> CoarseCurve | None:
        def make() -> CoarseCurve | None:
            outcomes = self._patient_outcomes(snapshot)
            t: list[float] = []
            e: list[bool] = []
            for pid in sorted(self._cohort_survival_patients(snapshot)):
                ti, ev = outcomes[pid][:2]
                t.append(float(ti))
                e.append(bool(ev))
            if len(t) < self.policy.min_cell:
                return None
            return coarse_curve(
                t, e, min_cell=self.policy.min_cell, grid=self.policy.time_grid, horizons=horizons
            )

        key = f"cohort-curve-{tuple(horizons)}-{self._deleted_key(snapshot)}"
        curve: CoarseCurve | None = self._cached(snapshot, key, make)
        return curve

    def _labels(self, prog: Any, kept: list[NeighborResult]) -> list[str]:
        m = self.policy.min_cell
        withheld: list[str] = []
        dists = [_copy(d) for d in prog.label_distributions]
        del prog.label_distributions[:]
        for dist in dists:
            name = dist.name
            total = sum(
                1
                for nb in kept
                if any(k == name or k.startswith(name + "@") for k in (nb.labels or {}))
            )
            where = f"prognosis.label_distributions[{name}]"
            if not available(total, m) or total == 0:
                withheld.append(where)
                continue
            counts = {s.label: int(s.count) for s in dist.shares}
            hidden = {lab for lab, c in counts.items() if not releasable(c, total, m)}
            if hidden and sum(counts[lab] for lab in hidden) < m:
                for lab in sorted(set(counts) - hidden, key=lambda x: (counts[x], x)):
                    hidden.add(lab)
                    if sum(counts[x] for x in hidden) >= m:
                        break
            if hidden == set(counts):
                withheld.append(where)
                continue
            shown = [s for s in dist.shares if s.label not in hidden]
            if hidden:
                withheld.append(f"{where}.shares")
            out = prog.label_distributions.add(name=name, shares=shown)
            if _has(dist, "readers"):
                out.readers.extend(dist.readers)
                rated = int(dist.multi_reader_neighbor_count)
                if available(rated, m):
                    out.multi_reader_neighbor_count = rated
                    for f in ("reader_agreement", "reader_kappa"):
                        if dist.HasField(f):
                            setattr(out, f, getattr(dist, f))
                else:
                    withheld.append(f"{where}.multi_reader_neighbor_count")
        return withheld

    def _values(self, prog: Any, size: int) -> list[str]:
        m = self.policy.min_cell
        withheld: list[str] = []
        keep = []
        for v in prog.value_summaries:
            if available(int(v.count), m) and v.count > 0:
                keep.append(v)
            else:
                withheld.append(f"prognosis.value_summaries[{v.name}]")
        copies = [_copy(v) for v in keep]
        del prog.value_summaries[:]
        prog.value_summaries.extend(copies)
        return withheld

    def _diagnostics(
        self,
        snapshot: Any,
        kept: list[NeighborResult],
        acquisition: dict[str, Any] | None,
        withheld: list[str],
    ) -> pb.QueryDiagnostics:
        m, size = self.policy.min_cell, len(kept)
        k_ood = max(1, min(int(getattr(snapshot, "k_ood", 10)), size))
        sims = np.array([nb.similarity for nb in kept[:k_ood]], dtype=np.float64)
        mean_sim = float(sims.mean()) if sims.size else float("nan")
        reference = np.asarray(getattr(snapshot, "ood_reference", np.zeros(0)))
        pct = ood_percentile(mean_sim, reference) if reference.size else 0.0
        diag = pb.QueryDiagnostics(ood_percentile=pct, mean_similarity=mean_sim)
        if pct >= OOD_WARN_PERCENTILE:
            diag.warnings.append(OOD_WARNING)
            diag.warning_details.append(convert.warning_to_proto(OOD_WARNING))
        key = _scanner(acquisition)
        if key is not None:
            same = sum(1 for nb in kept if _scanner(nb.acquisition) == key)
            if releasable(same, size, m):
                diag.same_scanner_share = same / size
            else:
                withheld.append("diagnostics.same_scanner_share")
            total, count = self._cohort_scanner_count(snapshot, key)
            if total and releasable(count, total, m):
                diag.cohort_scanner_share = count / total
            else:
                withheld.append("diagnostics.cohort_scanner_share")
        return diag

    def _cohort_scanner_count(self, snapshot: Any, key: tuple[str, str]) -> tuple[int, int]:
        def make() -> Counter[tuple[str, str] | None]:
            meta = snapshot.metadata
            if not all(c in meta.column_names for c in ("manufacturer", "model")):
                return Counter()
            cols = meta.select(["manufacturer", "model"]).to_pydict()
            return Counter(
                _scanner({"manufacturer": a, "model": b})
                for a, b in zip(cols["manufacturer"], cols["model"], strict=True)
            )

        counts: Counter[tuple[str, str] | None] = self._cached(snapshot, "scanners", make)
        return sum(counts.values()), counts.get(key, 0)

    # ----------------------------------------------------------------- index info
    def index_info(self, response: pb.GetIndexInfoResponse) -> pb.GetIndexInfoResponse:
        """The researcher view of GetIndexInfo: counts by the cell rule, unknown fields cleared."""
        m = self.policy.min_cell
        out = pb.GetIndexInfoResponse()
        out.CopyFrom(response)
        if _has(out, "prognostic_quality") and out.HasField("prognostic_quality"):
            q = out.prognostic_quality
            total = int(q.evaluated_study_count)
            if not releasable(int(q.evaluated_event_count), total, m):
                q.evaluated_event_count = 0
            for cal in q.calibration:
                for g in cal.groups:
                    if not releasable(int(g.study_count), total, m) or g.study_count < m:
                        for f in ("predicted", "observed", "observed_lower", "observed_upper"):
                            g.ClearField(f)
                        g.study_count = 0
        _filter_details(out.warnings, "warnings")
        enforce(out, INDEX_INFO_RULES, m)
        return out

    # ----------------------------------------------------------------- cohort stats
    def cohort_stats(
        self,
        response: pb.GetCohortStatsResponse,
        snapshot: Any = None,
        rows: Any = None,
        *,
        principal: str = ANONYMOUS,
    ) -> pb.GetCohortStatsResponse:
        """The researcher view of GetCohortStats (:data:`COHORT_STATS_RULES`).

        With ``snapshot`` and ``rows`` (the study rows counted), the patients it covers and
        those with each label are checked against, and added to, ``principal``'s record
        of releases that its searches use too (ANSWER_DIFFERENCING when they conflict).
        """
        m = self.policy.min_cell
        if snapshot is not None and rows is not None and self.policy.answer_differencing:
            ids = self._patient_ids(snapshot)[np.asarray(rows, dtype=np.int64)]
            releases = self._stats_releases(snapshot, sorted({str(p) for p in ids.tolist()}))
            if found := record_or_refuse(self.record(principal), releases):
                raise differencing_refused(found, m, "these statistics")
        return _cohort_stats_view(response, m)

    def _stats_releases(
        self, snapshot: Any, patients: Sequence[str]
    ) -> list[tuple[str, frozenset[str]]]:
        """What cohort statistics over ``patients`` release: the patients and those with
        each label (no survival measure: statistics hold no outcome times)."""
        outcomes = self._patient_outcomes(snapshot)
        labelled = [
            (p, None, None, outcomes.get(p, (None, None, None, None))[2], None) for p in patients
        ]
        return [(n, ps) for n, ps in release_sets(labelled) if n != SURVIVAL]

    # ----------------------------------------------------------------- federated site
    def site_release(
        self, neighbors: Sequence[NeighborResult], released: Any, *, principal: str
    ) -> dict[str, Any]:
        """Check a federated site's suppressed counts ``released``
        (:class:`indexing.aggregates.Aggregates`) over ``neighbors`` against ``principal``'s
        record and add them (ANSWER_DIFFERENCING, naming the rule, when they conflict).
        Only measures with a count left after suppression are recorded: the neighbours
        (when anything is left), those with a survival outcome (``patients`` shown) and
        those with each label (a label value shown). Returns the facts for the audit
        record (the patients covered, the measures recorded, whose record), from which
        :meth:`replay` rebuilds the record at start."""
        m = self.policy.min_cell
        rows = [(nb.patient_id, nb.time, nb.event, nb.labels, None) for nb in neighbors]
        shown_labels = {name for name, values in released.labels.items() if any(values.values())}
        keep = {f"label:{_base_name(str(name))}" for name in shown_labels}
        if int(released.patients) > 0:
            keep.add(SURVIVAL)
        if keep:
            keep.add(AGGREGATE)
        releases = [(n, ps) for n, ps in release_sets(rows) if n in keep]
        if self.policy.answer_differencing and releases:
            found = record_or_refuse(self.record(principal), releases)
            if found is not None:
                raise differencing_refused(found, m, "this site's counts")
        return {
            "release_kind": "site",
            "release_principal": principal,
            "released_measures": sorted(n for n, _ in releases),
            "aggregated_patients": sorted({str(nb.patient_id) for nb in neighbors}) if releases else [],
        }


def _suppress_table(cells: Sequence[Any], total: int, m: int, *, studies: int | None) -> list[Any]:
    """The cells of one table to withhold: the cell rule (primary), then secondary
    suppression so that no withheld cell can be computed from the total and the shown
    cells: none or at least two cells withheld, holding together at least ``m`` patients
    (and ``m`` studies when ``studies`` is the table's study total). Cells are
    ``CategoryCount`` / ``LabelCount`` messages."""

    def small_studies(c: Any) -> bool:
        return studies is not None and not releasable(int(c.study_count), studies, m)

    hidden = [
        i for i, c in enumerate(cells)
        if not releasable(int(c.patient_count), total, m) or small_studies(c)
    ]

    def safe() -> bool:
        if not hidden:
            return True
        people = sum(int(cells[i].patient_count) for i in hidden)
        count = sum(int(getattr(cells[i], "study_count", 0)) for i in hidden)
        return len(hidden) >= 2 and people >= m and (studies is None or count >= m)

    shown = sorted(
        (i for i in range(len(cells)) if i not in hidden),
        key=lambda i: (int(cells[i].patient_count), int(getattr(cells[i], "study_count", 0)), i),
    )
    while not safe() and shown:
        hidden.append(shown.pop(0))  # the next smallest cell
    return [cells[i] for i in hidden]


def _cohort_stats_view(
    response: pb.GetCohortStatsResponse, m: int
) -> pb.GetCohortStatsResponse:
    """GetCohortStats for researchers: every category and label count held to the cell
    rule against its whole (the cohort's patients, or the patients with that label), with
    secondary suppression in every table (:func:`_suppress_table`) so the totals and the
    shown cells never give a withheld one; then :func:`enforce`."""
    out = pb.GetCohortStatsResponse()
    out.CopyFrom(response)
    withheld: list[str] = []
    total = int(out.patient_count)
    for name in ("sites", "scanners"):
        for c in _suppress_table(list(getattr(out, name)), total, m, studies=int(out.study_count)):
            c.patient_count = 0
            c.study_count = 0
            withheld.append(f"{name}[{c.value}]")
    by_name: dict[str, list[Any]] = {}
    for lab in out.labels:
        by_name.setdefault(lab.name, []).append(lab)
    for labs in by_name.values():
        whole = sum(int(lab.patient_count) for lab in labs)
        for lab in _suppress_table(labs, whole, m, studies=None):
            lab.patient_count = 0
            withheld.append(f"labels[{lab.name}={lab.value}]")
    if 0 < total < m:
        withheld.append("patient_count")
    withheld += enforce(out, COHORT_STATS_RULES, m)
    dc = out.disclosure_control
    dc.min_cell_count = m
    dc.aggregated_patients = total if total >= m else 0
    dc.withheld_fields[:] = sorted(set(withheld))
    return out


def _has_survival(time: Any, event: Any) -> bool:
    return time is not None and event is not None and math.isfinite(float(time))


def _base_name(key: str) -> str:
    return key.split("@", 1)[0]


def release_sets(
    rows: Sequence[tuple[str, Any, Any, Any, Any]],
) -> list[tuple[str, frozenset[str]]]:
    """What an aggregate over ``rows`` (``(patient, time, event, labels, values)``)
    releases, by measure: the patients as a whole, those a survival curve counts, and
    those with each label and each value (:mod:`service.releases`)."""
    sets: dict[str, set[str]] = {AGGREGATE: set(), SURVIVAL: set()}
    for pid, time, event, labels, values in rows:
        sets[AGGREGATE].add(pid)
        if _has_survival(time, event):
            sets[SURVIVAL].add(pid)
        for key in labels or {}:
            sets.setdefault(f"label:{_base_name(str(key))}", set()).add(pid)
        for key, v in (values or {}).items():
            if v is not None:
                sets.setdefault(f"value:{key}", set()).add(pid)
    return [(name, frozenset(ps)) for name, ps in sets.items() if ps]


def _filter_columns(expr: Any) -> list[str]:
    """The column names a parsed ``Filter.where`` expression reads (any node type)."""
    from indexing.filter import Column

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Column):
            found.append(node.name)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
        elif isinstance(node, tuple | list):
            for item in node:
                walk(item)

    walk(expr)
    return found


def _copy(msg: Any) -> Any:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _has_field(obj: Any, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(obj))


def _filter_text(items: Any, path: str) -> list[str]:
    """Drop free-text entries that contain digits (they may quote counts)."""
    kept = [s for s in items if not _DIGIT.search(s)]
    dropped = len(items) - len(kept)
    del items[:]
    items.extend(kept)
    return [path] if dropped else []


def _filter_details(items: Any, path: str) -> list[str]:
    """Clear the message of coded warnings whose text contains digits; the code stays
    (a fixed enum value reveals no count)."""
    cleared = [w for w in items if _DIGIT.search(w.message)]
    for w in cleared:
        w.message = ""
    return [f"{path}.message"] if cleared else []


__all__ = [
    "COHORT_STATS_RULES",
    "COUNT",
    "DERIVED",
    "DROP",
    "INDEX_INFO_RULES",
    "KEEP",
    "NOT_COUNTS",
    "RESEARCHER_FILTER_COLUMNS",
    "RESEARCHER_QUERY_RULES",
    "SEARCH_RULES",
    "TEXT",
    "CoarseCurve",
    "DisclosurePolicy",
    "Governance",
    "ReleaseRegistry",
    "ResearcherAnswer",
    "coarse_curve",
    "enforce",
    "field_paths",
    "permission_denied",
    "releasable",
    "release_sets",
]
