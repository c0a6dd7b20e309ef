"""The researcher view: no identities, no small cells, no differencing, no re-identification."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf.descriptor import FieldDescriptor

from indexing.prognosis import kaplan_meier
from indexing.snapshot import build_snapshot
from service import convert
from service.api import cohortsim_pb2 as pb
from service.auth import Principal
from service.errors import ServiceError
from service.governance import (
    COHORT_STATS_RULES,
    COUNT,
    DROP,
    INDEX_INFO_RULES,
    KEEP,
    NOT_COUNTS,
    SEARCH_RULES,
    DisclosurePolicy,
    Governance,
    ReleaseRegistry,
    available,
    coarse_curve,
    enforce,
    field_paths,
    releasable,
    release_sets,
)
from service.servicer import ServiceState, search

from .conftest import MODEL_VERSION, make_cohort

M = 11
_F = FieldDescriptor
INT_TYPES = {
    _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_SINT32,
    _F.TYPE_SINT64, _F.TYPE_FIXED32, _F.TYPE_FIXED64, _F.TYPE_SFIXED32, _F.TYPE_SFIXED64,
}


# --------------------------------------------------------------------------- rules


def _int_paths(descriptor, rules: dict[str, str]) -> list[str]:
    stop = [p for p, r in rules.items() if r == DROP]
    out = []
    for path in field_paths(descriptor, stop=stop):
        fd = descriptor
        for part in path.split("."):
            field = fd.fields_by_name[part]
            fd = field.message_type
        if field.type in INT_TYPES and field.message_type is None:
            out.append(path)
    return out


@pytest.mark.parametrize(
    ("message", "rules"),
    [
        (pb.SearchSimilarResponse, SEARCH_RULES),
        (pb.GetIndexInfoResponse, INDEX_INFO_RULES),
        (pb.GetCohortStatsResponse, COHORT_STATS_RULES),
    ],
)
def test_every_response_field_has_a_rule(message, rules) -> None:
    """Fails when the proto gains a field the researcher view has no rule for: add it to
    service.governance (a count as COUNT, with its suppression in the builder)."""
    stop = [p for p, r in rules.items() if r == DROP]
    paths = field_paths(message.DESCRIPTOR, stop=stop)
    missing = [p for p in paths if p not in rules]
    assert not missing, f"no researcher rule for {missing}"
    all_paths = set(field_paths(message.DESCRIPTOR))
    stale = [p for p in rules if p not in all_paths]
    assert not stale, f"rules for fields that no longer exist: {stale}"


@pytest.mark.parametrize(
    ("message", "rules"),
    [
        (pb.SearchSimilarResponse, SEARCH_RULES),
        (pb.GetIndexInfoResponse, INDEX_INFO_RULES),
        (pb.GetCohortStatsResponse, COHORT_STATS_RULES),
    ],
)
def test_every_integer_field_is_a_suppressed_count_or_declared_not_a_count(message, rules) -> None:
    for path in _int_paths(message.DESCRIPTOR, rules):
        assert rules[path] == COUNT or path in NOT_COUNTS, (
            f"{path} is an integer: rule it COUNT (suppressed) or list it in NOT_COUNTS"
        )


def test_enforce_clears_unruled_fields_and_small_counts() -> None:
    resp = pb.SearchSimilarResponse(index_version="v1")
    resp.neighbors.add(patient_id="P-1", study_uid="S-1")
    resp.prognosis.events = 3
    resp.prognosis.neighbors_with_outcome = 40
    resp.prognosis.survival.add(time=1.0, at_risk=10)
    withheld = enforce(resp, {**SEARCH_RULES, "index_version": KEEP}, M)
    assert not resp.neighbors and resp.prognosis.events == 0
    assert resp.prognosis.neighbors_with_outcome == 40 and resp.prognosis.survival[0].at_risk == 0
    assert set(withheld) == {"neighbors", "prognosis.events", "prognosis.survival.at_risk"}
    rules = dict(SEARCH_RULES)
    del rules["index_version"]  # a field with no rule is withheld: fail closed
    assert enforce(resp, rules, M) == ["index_version"] and resp.index_version == ""


# --------------------------------------------------------------------------- cell rule


@pytest.mark.parametrize(
    ("count", "total", "ok"),
    [(0, 30, True), (1, 30, False), (10, 30, False), (11, 30, True), (19, 30, True),
     (20, 30, False), (29, 30, False), (30, 30, True), (5, 5, False), (11, 21, False)],
)
def test_cell_rule(count: int, total: int, ok: bool) -> None:
    assert releasable(count, total, M) is ok


def test_availability_rule() -> None:
    assert available(0, M) and available(11, M) and not available(10, M) and not available(1, M)


def test_policy() -> None:
    p = DisclosurePolicy()
    assert (p.min_cell, p.aggregate_size(1), p.aggregate_size(11), p.aggregate_size(12)) == (
        11, 11, 11, 22,
    )
    for bad in ({"min_cell": 1}, {"reid_similarity": 0.0}, {"time_grid": 0.0}):
        with pytest.raises(ValueError):
            DisclosurePolicy(**bad)  # type: ignore[arg-type]


def test_release_registry() -> None:
    reg = ReleaseRegistry(M)
    a = {f"P-{i}" for i in range(22)}
    assert reg.check_and_add(a)
    assert reg.check_and_add(a)  # the same set again: the same answer
    assert not reg.check_and_add(a - {"P-0"})  # one patient fewer
    assert not reg.check_and_add(a | {"P-x"})  # one more
    assert not reg.check_and_add((a - {"P-0"}) | {"P-y"})  # one swapped
    assert reg.check_and_add({f"P-{i}" for i in range(11)})  # 11 fewer: allowed
    assert reg.check_and_add({f"Q-{i}" for i in range(11)})  # disjoint
    assert not reg.check_and_add({"Z-1", "Z-2"})  # a small group on its own
    full = ReleaseRegistry(M, limit=1)
    full.check_and_add(a)
    with pytest.raises(ServiceError) as info:
        full.check_and_add({f"R-{i}" for i in range(22)})
    assert info.value.reason == "RELEASE_REGISTRY_FULL"


# --------------------------------------------------------------------------- survival grid


@pytest.mark.parametrize("seed", range(6))
def test_coarse_curve_never_isolates_a_small_group(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(15, 200))
    t = rng.exponential(20.0, n).round(1)
    e = rng.random(n) < 0.7
    curve = coarse_curve(t, e, min_cell=M, grid=3.0, horizons=(12, 24, 60))
    exact = kaplan_meier(t, e, np.ones(n))
    times = np.array([p.time for p in exact])
    assert curve.points[0] == (0.0, 1.0, 1.0, 1.0, n)
    for (t0, _, _, _, r0), (t1, s1, lo1, hi1, r1) in zip(curve.points, curve.points[1:], strict=False):
        assert t1 > t0 and abs(t1 / 3.0 - round(t1 / 3.0)) < 1e-9  # grid times only
        assert np.count_nonzero(e & (t > t0) & (t <= t1)) >= M  # >= m events per step
        assert r1 >= M and r0 - r1 >= M  # at risk, and departures, never a small group
        assert r1 == np.count_nonzero(t >= t1)
        p = exact[int(np.searchsorted(times, t1, "right")) - 1]
        assert (s1, lo1, hi1) == (p.survival, p.lower, p.upper)  # the exact KM value there
    reported = {p[0] for p in curve.points}
    assert set(curve.horizons) <= reported


def test_coarse_curve_of_a_small_group_is_only_its_start() -> None:
    curve = coarse_curve(np.arange(1.0, 21.0), np.ones(20, bool), min_cell=M, grid=3.0, horizons=(12,))
    assert [p[0] for p in curve.points] == [0.0] and curve.horizons == {}


# --------------------------------------------------------------------------- researcher search


@pytest.fixture(scope="module")
def state(index_dir: Path) -> ServiceState:
    return ServiceState.load(index_dir, device="cpu")


def _run(state: ServiceState):
    def run(q: convert.SearchQuery):
        return search(state, state.snapshot, q, max_k=max(q.k, 1000))  # type: ignore[arg-type]

    return run


def _query(vector: np.ndarray, k: int, where: str = "") -> convert.SearchQuery:
    return convert.SearchQuery("embedding", k, where, embedding=np.asarray(vector, np.float32))


def _ask(gov: Governance, state: ServiceState, q: convert.SearchQuery):
    return gov.researcher_search(state.snapshot, q, run=_run(state))


def _walk_counts(msg, prefix: str = ""):
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for item in value if fd.is_repeated else [value]:
                yield from _walk_counts(item, path + ".")
        elif SEARCH_RULES.get(path) == COUNT:
            yield path, value


@pytest.mark.parametrize("k", [11, 22, 33, 55, 110])
def test_no_identifiers_and_no_small_counts(state: ServiceState, cohort, k: int) -> None:
    emb, table = cohort
    rng = np.random.default_rng(k)
    ids = set(table.column("patient_id").to_pylist()) | set(table.column("study_uid").to_pylist())
    for _i in range(4):
        gov = Governance()
        q = emb[int(rng.integers(200))] + 0.3 * rng.normal(size=emb.shape[1])
        answer = _ask(gov, state, _query(q, k))
        r = answer.response
        raw = r.SerializeToString()
        assert not r.neighbors
        assert not any(x.encode() in raw for x in ids), "a pseudonym leaked into the answer"
        assert r.disclosure_control.aggregated_patients == k
        counts = list(_walk_counts(r))
        assert counts, "nothing counted"
        for path, value in counts:
            assert value == 0 or value >= M, (path, value)
        prog = r.prognosis
        if prog.events:  # events and censored are both >= m (or 0)
            rest = prog.neighbors_with_outcome - prog.events
            assert rest == 0 or rest >= M
        for dist in prog.label_distributions:
            for s in dist.shares:
                assert s.count >= M
        ats = [p.at_risk for p in prog.survival]
        assert all(a - b >= M for a, b in itertools.pairwise(ats))
        assert not any(ch.isdigit() for w in prog.warnings for ch in w)
        assert len(answer.facts["aggregated_patients"]) == k


def test_k_is_rounded_up_to_the_grid(state: ServiceState, cohort) -> None:
    emb, _ = cohort
    r = _ask(Governance(), state, _query(emb[3] + 0.2, 12)).response
    assert r.disclosure_control.aggregated_patients == 22


def test_study_uid_queries_are_refused(state: ServiceState) -> None:
    q = convert.SearchQuery("study_uid", 11, study_uid="S-" + "0" * 24)
    with pytest.raises(ServiceError) as info:
        _ask(Governance(), state, q)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.reason == "STUDY_QUERY_NOT_ALLOWED"


def _patients(gov: Governance, state: ServiceState, q: convert.SearchQuery) -> set[str]:
    result = _run(state)(dataclasses.replace(q, k=60))
    kept, _ = gov._select(result.neighbors, gov.policy.aggregate_size(q.k))
    return {nb.patient_id for nb in kept}


def _rows(state: ServiceState, patients: set[str]) -> list[tuple]:
    meta = state.snapshot.metadata.to_pydict()
    seen: dict[str, tuple] = {}
    for i, p in enumerate(meta["patient_id"]):
        if p in patients and p not in seen:
            seen[p] = (p, meta["time"][i], meta["event"][i], dict(meta["labels"][i] or []),
                       dict(meta["values"][i] or []))
    return list(seen.values())


def test_differencing_two_nearby_queries_is_refused(state: ServiceState, cohort) -> None:
    emb, _ = cohort
    rng = np.random.default_rng(7)
    gov = Governance()
    base = _query(emb[40] + 0.1 * rng.normal(size=emb.shape[1]), 11)
    first = _patients(gov, state, base)
    _ask(gov, state, base)
    assert _ask(gov, state, base).response.disclosure_control.aggregated_patients == 11  # same set
    # 11 more patients: allowed unless a sub-aggregate (those with a survival outcome, a
    # label, a value) then differs by fewer than 11 (those would describe a small group)
    wider = dataclasses.replace(base, k=22)
    before = dict(release_sets(_rows(state, first)))
    after = dict(release_sets(_rows(state, _patients(gov, state, wider))))
    small = any(0 < len(after.get(k, frozenset()) ^ before.get(k, frozenset())) < M for k in after | before)
    try:
        assert _ask(gov, state, wider).response and not small
    except ServiceError as err:
        assert small and err.reason == "ANSWER_DIFFERENCING"
    near = None
    for _ in range(200):
        cand = dataclasses.replace(base, embedding=base.embedding + 0.15 * rng.normal(size=emb.shape[1]).astype(np.float32))
        d = len(_patients(gov, state, cand) ^ first)
        if 0 < d < 2 * M - 2:
            near = cand
            break
    assert near is not None
    with pytest.raises(ServiceError) as info:
        _ask(gov, state, near)
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ANSWER_DIFFERENCING")
    assert "fewer than 11" in info.value.message


def test_filters_that_single_out_a_few_patients_are_refused(state: ServiceState, cohort) -> None:
    emb, table = cohort
    gov = Governance()
    snap = state.snapshot
    assert len(gov.check_filter(snap, "site = 'north'")) == 100
    # "north but not one scanner" differs from "north" by one (GE Revolution in north: ...)
    q = _query(emb[0], 11, where="site = 'north'")
    ok = gov.researcher_search(snap, q, run=_run(state))
    assert ok.facts["filter_patient_count"] == 100

    def refused(where: str) -> str:
        with pytest.raises(ServiceError) as info:
            gov.check_filter(snap, where)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        return str(info.value.reason)

    assert refused("patient_id <> 'P-0000000000000000'") == "FILTER_COLUMN_NOT_ALLOWED"
    assert refused("event = false OR site = 'north'") == "FILTER_COLUMN_NOT_ALLOWED"
    assert refused("labels['histology'] = 'adeno'") == "FILTER_COLUMN_NOT_ALLOWED"
    # kernel is null for every 5th study: few north patients have a null kernel AND the GE scanner
    small = "site = 'north' AND kernel IS NULL AND manufacturer = 'GE'"
    assert len(set(table.filter(pa.compute.and_(
        pa.compute.and_(pa.compute.equal(table["site"], "north"), pa.compute.is_null(table["kernel"])),
        pa.compute.equal(table["manufacturer"], "GE"))).column("patient_id").to_pylist())) < M
    assert refused(small) == "FILTER_BELOW_MIN_CELL"
    # "north, minus that small group" vs "north": the difference is the small group
    assert refused("site = 'north' AND NOT (kernel IS NULL AND manufacturer = 'GE')") == "FILTER_DIFFERENCING"
    # the whole cohort minus a small group vs the whole cohort
    assert refused("NOT (site = 'north' AND kernel IS NULL AND manufacturer = 'GE')") == "FILTER_DIFFERENCING"
    assert len(gov.check_filter(snap, "manufacturer IN ('GE', 'SIEMENS')")) >= M


def test_reidentification_guard_answers_as_if_the_patient_were_absent(
    state: ServiceState, cohort, tmp_path: Path
) -> None:
    """A researcher uploading a member's own study learns nothing about that member."""
    emb, table = cohort
    row = 150  # a patient with a single study
    member = table.column("patient_id")[row].as_py()
    policy = DisclosurePolicy(reid_similarity=0.99)
    answer = Governance(policy).researcher_search(
        state.snapshot, _query(emb[row], 33), run=_run(state)
    )
    assert answer.facts["reid_matches_removed"] == 1
    assert member not in answer.facts["aggregated_patients"]

    keep = np.array([i != row for i in range(len(emb))])
    build_snapshot(tmp_path, emb[keep], table.filter(pa.array(keep)), model_version=MODEL_VERSION)
    without = ServiceState.load(tmp_path, device="cpu")
    other = Governance(policy).researcher_search(
        without.snapshot, _query(emb[row], 33), run=_run(without)
    )
    assert other.facts["reid_matches_removed"] == 0
    assert answer.facts["aggregated_patients"] == other.facts["aggregated_patients"]
    a, b = answer.response.prognosis, other.response.prognosis
    for name in ("survival", "at_horizons", "label_distributions", "value_summaries", "events",
                 "neighbors_with_outcome", "median_survival"):
        assert getattr(a, name) == getattr(b, name), name


def test_restricts_only_callers_without_identities() -> None:
    assert Governance.restricts(Principal("r", "researcher", "token"))
    assert not Governance.restricts(Principal("c", "clinician", "token"))
    assert not Governance.restricts(None)


def test_index_info_researcher_view(state: ServiceState) -> None:
    resp = pb.GetIndexInfoResponse(num_studies=200, dimension=32, index_version="v")
    resp.prognostic_quality.evaluated_study_count = 200
    resp.prognostic_quality.evaluated_event_count = 195  # 5 censored: a small cell
    cal = resp.prognostic_quality.calibration.add(time=12)
    cal.groups.add(predicted=0.5, observed=0.4, study_count=8)
    cal.groups.add(predicted=0.7, observed=0.6, study_count=20)
    out = Governance().index_info(resp)
    assert out.num_studies == 200 and out.dimension == 32
    q = out.prognostic_quality
    assert q.evaluated_event_count == 0
    assert q.calibration[0].groups[0].study_count == 0
    assert not q.calibration[0].groups[0].HasField("observed")
    assert q.calibration[0].groups[1].observed == pytest.approx(0.6)


def test_small_cohort_is_refused(tmp_path: Path) -> None:
    emb, table = make_cohort()
    build_snapshot(tmp_path, emb[:8], table.slice(0, 8), model_version=MODEL_VERSION)
    small = ServiceState.load(tmp_path, device="cpu")
    with pytest.raises(ServiceError) as info:
        Governance().researcher_search(small.snapshot, _query(emb[0], 11), run=_run(small))
    assert info.value.reason == "TOO_FEW_PATIENTS"
