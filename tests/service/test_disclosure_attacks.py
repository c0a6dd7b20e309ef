"""The red team's disclosure findings (issue #24), as property tests over random cohorts:
subtraction from totals, the membership oracle, two curves in one answer, stats beside
searches, three answers (A, B, A ∪ B), and consent withdrawal."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from indexing.snapshot import build_snapshot
from indexing.tombstones import TOMBSTONE_FILE, add_tombstones
from service import convert
from service.api import cohortsim_pb2 as pb
from service.disclosure import ReleaseRegistry
from service.errors import ServiceError
from service.governance import DisclosurePolicy, Governance
from service.rpcs import cohort_stats, live_rows
from service.servicer import ServiceState, search

from .conftest import MODEL_VERSION, cohort_schema

M = 11
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- random cohorts


def random_cohort(
    seed: int, n_patients: int, *, sites: int = 3, dim: int = 16
) -> tuple[np.ndarray, pa.Table]:
    """``(embeddings (n, dim), table)``: one study per patient, uneven sites and scanners
    (so that small cells occur), outcomes for most patients."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim))
    cluster = rng.integers(0, 4, n_patients)
    emb = centres[cluster] + 0.6 * rng.normal(size=(n_patients, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    site_p = rng.dirichlet(np.full(sites, 0.6))
    scanners = [("GE", "Revolution"), ("SIEMENS", "Force"), ("PHILIPS", "iCT")]
    scan_p = rng.dirichlet(np.full(len(scanners), 0.6))
    rows = []
    for i in range(n_patients):
        known = rng.random() < 0.9
        mf, md = scanners[int(rng.choice(len(scanners), p=scan_p))]
        rows.append(
            {
                "patient_id": f"P-{seed:08x}{i:08x}",
                "study_uid": f"S-{seed:012x}{i:012x}",
                "site": f"site{int(rng.choice(sites, p=site_p))}",
                "modality": "CT",
                "study_day": 0,
                "manufacturer": mf,
                "model": md,
                "kernel": "STANDARD",
                "kvp": "120",
                "slice_thickness": "1.25",
                "pixel_spacing": "0.7\\0.7",
                "spec": None,
                "ingested_at": datetime(2024, 1, 1, tzinfo=UTC),
                "time": float(rng.exponential(20.0)) if known else None,
                "event": bool(rng.random() < 0.7) if known else None,
                "labels": [("histology", ["adeno", "squamous", "small-cell"][int(rng.integers(3))])]
                if known and rng.random() < 0.9
                else None,
                "values": None,
            }
        )
    return emb, pa.Table.from_pylist(rows, schema=cohort_schema())


def served(tmp: Path, emb: np.ndarray, table: pa.Table) -> ServiceState:
    build_snapshot(tmp, emb, table, model_version=MODEL_VERSION, kind="Flat")
    return ServiceState.load(tmp, device="cpu")


def ask(gov: Governance, state: ServiceState, vector: np.ndarray, k: int, where: str = ""):
    def run(q: convert.SearchQuery):
        return search(state, state.snapshot, q, max_k=max(q.k, 1000))  # type: ignore[arg-type]

    q = convert.SearchQuery("embedding", k, where, embedding=np.asarray(vector, np.float32))
    return gov.researcher_search(state.snapshot, q, run=run)


def outcome_of(table: pa.Table) -> dict[str, tuple]:
    d = table.select(["patient_id", "time", "event", "labels"]).to_pydict()
    return {
        p: (t, e, dict(lab or []))
        for p, t, e, lab in zip(d["patient_id"], d["time"], d["event"], d["labels"], strict=True)
    }


# --------------------------------------------------------------------------- totals


def _derivable_cells(out: pb.GetCohortStatsResponse) -> list[str]:
    """What a reader computes from the shown totals and cells: a withheld cell alone in
    its table is total - shown; withheld cells that together hold 1..m-1 patients (or
    studies) are a small group."""
    found = []
    tables = [("sites", list(out.sites)), ("scanners", list(out.scanners))]
    for name, cells in tables:
        hidden = [c for c in cells if c.patient_count == 0]
        if not hidden or not out.patient_count:
            continue
        people = out.patient_count - sum(c.patient_count for c in cells)
        studies = out.study_count - sum(c.study_count for c in cells)
        if len(hidden) == 1 or 0 < people < M or 0 < studies < M:
            found.append(f"{name}: {len(hidden)} withheld, {people} patients, {studies} studies")
    return found


@given(
    n=st.integers(30, 160),
    sizes=st.lists(st.integers(1, 60), min_size=2, max_size=6),
    scan=st.lists(st.integers(1, 60), min_size=2, max_size=5),
)
@settings(max_examples=200, deadline=None)
def test_no_withheld_cell_follows_from_totals_and_shown_cells(
    n: int, sizes: list[int], scan: list[int]
) -> None:
    """Secondary suppression: GetCohortStats never leaves a withheld cell computable."""

    def split(weights: list[int]) -> list[int]:
        w = np.asarray(weights, float)
        counts = np.floor(n * w / w.sum()).astype(int)
        counts[0] += n - counts.sum()
        return [int(c) for c in counts if c > 0]

    sites, scanners = split(sizes), split(scan)
    resp = pb.GetCohortStatsResponse(
        study_count=n + 1,  # one patient with two studies in the first cell
        patient_count=n,
        sites=[pb.CategoryCount(value=f"s{i}", patient_count=c, study_count=c + (i == 0))
               for i, c in enumerate(sites)],
        scanners=[pb.CategoryCount(value=f"x{i}", patient_count=c, study_count=c + (i == 0))
                  for i, c in enumerate(scanners)],
    )
    out = Governance(DisclosurePolicy(min_cell=M)).cohort_stats(resp)
    assert _derivable_cells(out) == []
    for c in [*out.sites, *out.scanners]:
        assert c.patient_count == 0 or (c.patient_count >= M and n - c.patient_count >= M) or c.patient_count == n


def test_the_red_teams_site_of_five_is_not_total_minus_shown() -> None:
    resp = pb.GetCohortStatsResponse(
        study_count=375, patient_count=300,
        sites=[pb.CategoryCount(value="a", patient_count=150, study_count=190),
               pb.CategoryCount(value="b", patient_count=120, study_count=146),
               pb.CategoryCount(value="c", patient_count=25, study_count=33),
               pb.CategoryCount(value="d", patient_count=5, study_count=6)],
        labels=[pb.LabelCount(name="ph", value="A", patient_count=4),
                pb.LabelCount(name="ph", value="B", patient_count=150),
                pb.LabelCount(name="ph", value="C", patient_count=146)],
    )
    out = Governance().cohort_stats(resp)
    assert _derivable_cells(out) == []
    shown = {c.value: c.patient_count for c in out.sites}
    assert shown["d"] == 0 and shown["c"] == 0 and shown["a"] == 150  # c withheld beside d
    labels = {lab.value: lab.patient_count for lab in out.labels}
    assert labels["A"] == 0 and sum(1 for v in labels.values() if v == 0) >= 2


# --------------------------------------------------------------------------- membership


@given(seed=st.integers(0, 10_000), n=st.integers(22, 90), use_filter=st.booleans(),
       extra=st.integers(-11, 11))
@SLOW
def test_answer_size_does_not_say_whether_the_query_is_a_member(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, use_filter: bool, extra: int
) -> None:
    emb, table = random_cohort(seed, n, sites=2)
    state = served(tmp_path_factory.mktemp("c"), emb, table)
    where = "site = 'site0'" if use_filter else ""
    pool = [i for i, s in enumerate(table.column("site").to_pylist()) if not where or s == "site0"]
    assume(len(pool) >= M)
    rng = np.random.default_rng(seed)
    member = int(rng.choice(pool))
    near = emb[member] + 0.02 * rng.normal(size=emb.shape[1]).astype(np.float32)
    far = rng.normal(size=emb.shape[1]).astype(np.float32)
    assume(float(np.max(emb @ (far / np.linalg.norm(far)))) < 0.9)
    k = max(1, len(pool) + extra)

    def size(vector: np.ndarray) -> object:
        try:
            return ask(Governance(), state, vector, k, where).response.disclosure_control.aggregated_patients
        except ServiceError as err:
            return err.reason

    assert size(near) == size(far)


# --------------------------------------------------------------------------- two curves


@given(seed=st.integers(0, 10_000), n=st.integers(30, 90), extra=st.integers(-12, 0))
@SLOW
def test_neighbours_curve_and_cohort_curve_never_differ_by_a_small_group(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, extra: int
) -> None:
    emb, table = random_cohort(seed, n)
    state = served(tmp_path_factory.mktemp("c"), emb, table)
    rng = np.random.default_rng(seed)
    try:
        answer = ask(Governance(), state, rng.normal(size=emb.shape[1]), n + extra)
    except ServiceError:
        return
    prog = answer.response.prognosis
    outcomes = outcome_of(table)
    covered = {p for p in answer.facts["aggregated_patients"] if outcomes[p][0] is not None}
    everyone = {p for p, o in outcomes.items() if o[0] is not None}
    if prog.survival and prog.cohort_survival:
        gap = len(everyone - covered)
        assert gap == 0 or gap >= M, f"the two curves differ by {gap} patients"
        gap0 = prog.cohort_survival[0].at_risk - prog.survival[0].at_risk
        assert gap0 == 0 or gap0 >= M


# --------------------------------------------------------------------------- across RPCs


@given(seed=st.integers(0, 10_000), n=st.integers(40, 90), extra=st.integers(-22, 0))
@SLOW
def test_cohort_stats_and_a_search_over_one_filter_are_compared(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, extra: int
) -> None:
    """Label counts of GetCohortStats(F) beside a search's label shares over F: the label
    sets they cover never differ by 1..m-1 patients (the search is refused instead)."""
    emb, table = random_cohort(seed, n, sites=2)
    state = served(tmp_path_factory.mktemp("c"), emb, table)
    gov = Governance()
    where = "site = 'site0'"
    try:
        gov.check_filter(state.snapshot, where)
    except ServiceError:
        return
    rows = live_rows(state.snapshot, where)
    gov.cohort_stats(cohort_stats(state.snapshot, rows), state.snapshot, rows)
    outcomes = outcome_of(table)
    pids = table.column("patient_id").to_pylist()
    labelled = {pids[r] for r in rows.tolist() if outcomes[pids[r]][2]}
    try:
        answer = ask(gov, state, np.random.default_rng(seed).normal(size=emb.shape[1]),
                     len(rows) + extra, where)
    except ServiceError as err:
        assert err.reason in ("ANSWER_DIFFERENCING", "TOO_FEW_PATIENTS", "FILTER_DIFFERENCING")
        return
    got = {p for p in answer.facts["aggregated_patients"] if outcomes[p][2]}
    if answer.response.prognosis.label_distributions:
        gap = len(labelled - got)
        assert gap == 0 or gap >= M


# --------------------------------------------------------------------------- three answers


@given(
    a_only=st.integers(11, 40), b_only=st.integers(11, 40), both=st.integers(1, M - 1),
)
@settings(max_examples=60, deadline=None)
def test_three_answers_a_b_and_their_union_are_refused(a_only: int, b_only: int, both: int) -> None:
    """A, B and A ∪ B (pairwise far apart) give A ∩ B by inclusion–exclusion."""
    a = {f"a{i}" for i in range(a_only)} | {f"c{i}" for i in range(both)}
    b = {f"b{i}" for i in range(b_only)} | {f"c{i}" for i in range(both)}
    for order in itertools.permutations([a, b, a | b]):
        reg = ReleaseRegistry(M)
        accepted = [s for s in order if reg.check_and_add(s)]
        assert len(accepted) < 3, "A, B and A ∪ B were all released"


def test_disjoint_union_and_large_overlaps_are_allowed() -> None:
    reg = ReleaseRegistry(M)
    a = {f"a{i}" for i in range(22)}
    b = {f"b{i}" for i in range(22)}
    assert reg.check_and_add(a) and reg.check_and_add(b) and reg.check_and_add(a | b)
    c = {f"a{i}" for i in range(11)} | {f"c{i}" for i in range(22)}
    assert reg.check_and_add(c)  # overlaps a by 11


# --------------------------------------------------------------------------- consent


def test_cohort_curves_stop_counting_a_withdrawn_patient_at_once(tmp_path: Path) -> None:
    emb, table = random_cohort(3, 60)
    state = served(tmp_path, emb, table)
    outcomes = outcome_of(table)
    pid = next(p for p, o in outcomes.items() if o[0] is not None)
    q = convert.SearchQuery("embedding", 5, "", embedding=emb[0])

    def clinician_at_risk() -> int:
        return search(state, state.snapshot, q, max_k=1000).prognosis.cohort_survival[0].at_risk

    def researcher_at_risk() -> int:
        r = ask(Governance(), state, emb[0], 11).response.prognosis
        return r.cohort_survival[0].at_risk if r.cohort_survival else -1

    before_c, before_r = clinician_at_risk(), researcher_at_risk()
    with_outcome = sum(1 for o in outcomes.values() if o[0] is not None)
    assert before_c == before_r == with_outcome
    add_tombstones(tmp_path / TOMBSTONE_FILE, [pid])
    assert clinician_at_risk() == with_outcome - 1
    assert researcher_at_risk() == with_outcome - 1


def test_a_withdrawal_does_not_release_the_withdrawn_patients_difference(tmp_path: Path) -> None:
    """The same researcher record sees the cohort curve before and after one withdrawal:
    the second curve would differ from the first by one patient, so it is withheld."""
    emb, table = random_cohort(4, 60)
    state = served(tmp_path, emb, table)
    gov = Governance()
    first = ask(gov, state, emb[0], 11).response.prognosis
    assert first.cohort_survival
    pid = next(p for p, o in outcome_of(table).items() if o[0] is not None)
    add_tombstones(tmp_path / TOMBSTONE_FILE, [pid])
    second = ask(gov, state, emb[0], 11)
    assert not second.response.prognosis.cohort_survival
    assert "prognosis.cohort_survival" in second.response.disclosure_control.withheld_fields

