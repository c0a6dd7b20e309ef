"""One record of releases per principal (issue #24): every RPC that releases aggregates
(SearchSimilar, GetCohortStats, AggregateSite) consults and adds to the caller's own
record; one researcher never refuses another; the number of principals is capped
without eviction; the records survive a restart through the audit log. Property tests
over random cohorts and filters check that no sequence of accepted releases of one
principal lets a set of 1..10 patients be derived by the rules the record covers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import convert
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import Principal
from service.background import BackgroundServer
from service.errors import ServiceError
from service.governance import (
    FILTER,
    DisclosurePolicy,
    Governance,
    principal_key,
    release_sets,
)
from service.releases import ANONYMOUS, SURVIVAL, ReleaseBook, ReleaseBookFull
from service.rpcs import cohort_stats, live_rows
from service.servicer import search

from .security_env import bearer, rpc_error
from .test_disclosure_attacks import outcome_of, random_cohort, served

M = 11
Sets = list[tuple[str, frozenset[str]]]


def people(prefix: str, n: int) -> set[str]:
    return {f"{prefix}{i}" for i in range(n)}


# --------------------------------------------------------------------------- the book


def test_one_principals_releases_never_refuse_anothers() -> None:
    book = ReleaseBook(M)
    a = people("a", 20) | people("c", 3)
    b = people("b", 20) | people("c", 3)
    assert book.record("alice").check_and_add([("aggregate", a)]) is None
    assert book.record("alice").check_and_add([("aggregate", b)]) is None
    refused = book.record("alice").check_and_add([("aggregate", a | b)])
    assert refused is not None and (refused.rule, refused.isolated) == ("union", 3)
    # a global record would refuse bob's union too (alice holds A and B)
    assert book.record("bob").check_and_add([("aggregate", a | b)]) is None
    assert book.record("bob").check_and_add([("aggregate", a | people("z", 4))]) is not None
    assert book.principals() == ["alice", "bob"]


def test_a_full_book_refuses_new_principals_and_forgets_none() -> None:
    book = ReleaseBook(M, max_principals=2)
    book.record("alice").check_and_add([("aggregate", people("a", 30))])
    book.record("bob")
    with pytest.raises(ReleaseBookFull) as info:
        book.record("carol")
    assert info.value.reason == "release_principals_full"
    assert "carol" not in book and len(book) == 2
    # alice's record is still there: her near-duplicate is still refused
    assert book.record("alice").check_and_add([("aggregate", people("a", 29))]) is not None
    book.record("dave", force=True)  # replay of earlier releases is never refused
    assert "dave" in book


def test_the_books_memory_is_bounded_and_a_refused_batch_leaves_nothing() -> None:
    book = ReleaseBook(M, max_members=50)
    assert book.record("alice").check_and_add([("aggregate", people("a", 30))]) is None
    with pytest.raises(ReleaseBookFull):  # 30 + 11 + 20 entries > 50
        book.record("bob").check_and_add([("aggregate", people("b", 11)), ("survival", people("b", 20))])
    assert book.budget.used == 30 and len(book.record("bob")) == 0
    assert book.record("bob").check_and_add([("aggregate", people("b", 20))]) is None
    assert book.budget.used == 50


def test_a_full_book_is_a_clear_refusal_at_the_service_edge(tmp_path: Path) -> None:
    emb, table = random_cohort(5, 60)
    state = served(tmp_path, emb, table)
    gov = Governance(DisclosurePolicy(max_principals=1))
    rows = live_rows(state.snapshot)  # type: ignore[arg-type]
    stats = cohort_stats(state.snapshot, rows)  # type: ignore[arg-type]
    gov.cohort_stats(stats, state.snapshot, rows, principal="alice")
    with pytest.raises(ServiceError) as info:
        gov.cohort_stats(stats, state.snapshot, rows, principal="bob")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "RELEASE_PRINCIPALS_FULL"
    gov.cohort_stats(stats, state.snapshot, rows, principal="alice")  # the same answer again
    small = Governance(DisclosurePolicy(max_recorded=70))  # fewer entries than one answer holds
    with pytest.raises(ServiceError) as info:
        small.cohort_stats(stats, state.snapshot, rows, principal="alice")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "RELEASE_RECORDS_FULL"


def test_whose_record_a_site_keeps() -> None:
    gov = Governance(DisclosurePolicy(trusted_coordinators=frozenset({"coord"})))
    coord = Principal("coord", "clinician", "certificate", certificate="coord")
    other = Principal("lab", "clinician", "token")
    assert gov.release_principal(coord, "alice") == "alice"
    assert gov.release_principal(coord, None) == "coord"
    assert gov.release_principal(other, "alice") == "lab"  # not trusted: its own record
    assert gov.release_principal(None, "alice") == ANONYMOUS == principal_key(None)
    with pytest.raises(ServiceError) as info:
        gov.release_principal(coord, "alice\nbob")
    assert info.value.reason == "INVALID_ON_BEHALF_OF"


def test_a_sites_counts_are_checked_against_the_end_users_record() -> None:
    """AggregateSite without filters: A, B and A ∪ B as three neighbour sets; only the
    measures the suppressed counts show are recorded."""
    from types import SimpleNamespace

    from indexing.aggregates import aggregate, suppress

    def nbs(ps: set[str], labelled: bool = True) -> list[SimpleNamespace]:
        return [SimpleNamespace(patient_id=p, time=float(i % 30), event=i % 2 == 0,
                                labels={"histology": "adeno"} if labelled else None)
                for i, p in enumerate(sorted(ps))]

    def counts(neighbors: list[SimpleNamespace]) -> object:
        return suppress(aggregate([n.time for n in neighbors], [n.event for n in neighbors],
                                  [0.9] * len(neighbors), [n.labels for n in neighbors]), M)

    gov = Governance()
    a = people("a", 20) | people("c", 3)
    b = people("b", 20) | people("c", 3)
    for s in (a, b):
        facts = gov.site_release(nbs(s), counts(nbs(s)), principal="alice")
        assert facts["released_measures"] == ["aggregate", "label:histology", "survival"]
    with pytest.raises(ServiceError) as info:
        gov.site_release(nbs(a | b), counts(nbs(a | b)), principal="alice")
    assert info.value.reason == "ANSWER_DIFFERENCING" and info.value.metadata["rule"] == "union"
    gov.site_release(nbs(a | b), counts(nbs(a | b)), principal="bob")
    few = people("d", 5)  # every count suppressed: nothing released, nothing recorded
    assert gov.site_release(nbs(few), counts(nbs(few)), principal="alice")["released_measures"] == []


# --------------------------------------------------------------------------- invariants


def derivable_small_sets(accepted: Sequence[frozenset[str]]) -> list[str]:
    """Sets of 1..M-1 patients that the accepted releases of one measure give by the
    rules the record covers: a difference of two (other than a set released as such),
    the overlap of two whose union is a third, a small set released after another.
    Empty when none."""
    found = []
    distinct = list(dict.fromkeys(accepted))  # the same set again is the same answer
    for i, a in enumerate(distinct):
        if 0 < len(a) < M and i > 0:
            found.append(f"small set of {len(a)} released after {i} others")
    for a, b in itertools.permutations(distinct, 2):
        if 0 < len(a - b) < M and (a - b) not in distinct:  # new, not a released set again
            found.append(f"difference of {len(a - b)}")
    for a, b in itertools.combinations(distinct, 2):
        if 0 < len(a & b) < M and (a | b) in distinct and (a | b) not in (a, b):
            found.append(f"union overlap of {len(a & b)}")
    return found


def by_measure(releases: Sequence[Sets]) -> dict[str, list[frozenset[str]]]:
    out: dict[str, list[frozenset[str]]] = {}
    for sets in releases:
        for measure, ps in sets:
            out.setdefault(measure, []).append(ps)
    return out


# random cohorts of patients with attributes, and filters over them (AND / OR of equalities)
_ATTRS = {"site": 4, "scanner": 3, "label": 4}


@st.composite
def cohorts_and_asks(draw: st.DrawFn) -> tuple[dict[str, dict[str, int]], list[tuple[str, str, set[str]]]]:
    n = draw(st.integers(25, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    attrs = {
        f"p{i}": {name: int(rng.choice(v, p=rng.dirichlet(np.full(v, 0.7)))) for name, v in _ATTRS.items()}
        for i in range(n)
    }

    def atom() -> set[str]:
        name = draw(st.sampled_from(sorted(_ATTRS)))
        value = draw(st.integers(0, _ATTRS[name] - 1))
        return {p for p, a in attrs.items() if a[name] == value}

    def a_filter() -> set[str]:
        s = atom()
        for _ in range(draw(st.integers(0, 2))):
            s = s | atom() if draw(st.booleans()) else s & atom()
        return s

    asks: list[tuple[str, str, set[str]]] = []
    earlier: list[set[str]] = []
    for _ in range(draw(st.integers(3, 14))):
        who = draw(st.sampled_from(["alice", "bob"]))
        measure = draw(st.sampled_from(["aggregate", "label:histology"]))
        how = draw(st.sampled_from(["filter", "union", "nudge", "overlap"]))
        if how == "union" and len(earlier) >= 2:  # A ∪ B of two earlier asks
            i, j = draw(st.integers(0, len(earlier) - 1)), draw(st.integers(0, len(earlier) - 1))
            s = earlier[i] | earlier[j]
        elif how == "overlap" and earlier:  # others, plus a few patients of an earlier set
            base = earlier[draw(st.integers(0, len(earlier) - 1))]
            rest = sorted(set(attrs) - base)
            size = draw(st.integers(0, len(rest)))
            s = set(rng.choice(rest, size=size, replace=False).tolist()) if rest else set()
            if base:
                s |= set(rng.choice(sorted(base), size=min(len(base), draw(st.integers(1, M - 1))), replace=False).tolist())
        elif how == "nudge" and earlier:  # an earlier set with a few patients more or fewer
            base = earlier[draw(st.integers(0, len(earlier) - 1))]
            pool = sorted(set(attrs) - base) if draw(st.booleans()) else sorted(base)
            few = set(draw(st.lists(st.sampled_from(pool), max_size=M - 1))) if pool else set()
            s = base | few if few.isdisjoint(base) else base - few
        else:
            s = a_filter()
        earlier.append(s)
        asks.append((who, measure, s))
    return attrs, asks


@given(cohorts_and_asks())
@settings(max_examples=300, deadline=None)
def test_no_accepted_sequence_of_one_principal_derives_a_small_group(
    drawn: tuple[dict[str, dict[str, int]], list[tuple[str, str, set[str]]]],
) -> None:
    _, asks = drawn
    book = ReleaseBook(M)
    accepted: dict[str, list[Sets]] = {"alice": [], "bob": []}
    outcome: dict[str, list[bool]] = {"alice": [], "bob": []}
    for who, measure, s in asks:
        ok = book.record(who).check_and_add([(measure, s)]) is None
        outcome[who].append(ok)
        if ok:
            accepted[who].append([(measure, frozenset(s))])
    for who in ("alice", "bob"):
        for measure, sets in by_measure(accepted[who]).items():
            assert not derivable_small_sets(sets), (who, measure, derivable_small_sets(sets))
        # one principal's answers depend on its own asks only
        alone = ReleaseBook(M)
        mine = [(m, s) for w, m, s in asks if w == who]
        assert [alone.record(who).check_and_add([(m, s)]) is None for m, s in mine] == outcome[who]


# --------------------------------------------------------------------------- across RPCs


def _filters() -> st.SearchStrategy[str]:
    site = st.sampled_from(["site0", "site1", "site2"]).map(lambda s: f"site = '{s}'")
    scanner = st.sampled_from(["GE", "SIEMENS", "PHILIPS"]).map(lambda m: f"manufacturer = '{m}'")
    atom = st.one_of(site, scanner)
    return st.one_of(
        st.just(""),
        atom,
        st.tuples(atom, atom, st.sampled_from(["AND", "OR"])).map(lambda t: f"({t[0]}) {t[2]} ({t[1]})"),
    )


_ASK = st.tuples(
    st.sampled_from(["alice", "bob"]),
    st.sampled_from(["stats", "search"]),
    _filters(),
    st.integers(5, 80),  # k of a search
    st.integers(0, 3),  # which query vector
)


def _run_asks(
    state: object, emb: np.ndarray, table: object, asks: Sequence[tuple[str, str, str, int, int]],
) -> tuple[list[bool], dict[str, list[Sets]]]:
    """Ask ``asks`` of one fresh Governance; (accepted per ask, released sets per principal)."""
    gov = Governance()
    snapshot = state.snapshot  # type: ignore[attr-defined]
    outcomes = outcome_of(table)  # type: ignore[arg-type]
    vectors = np.random.default_rng(0).normal(size=(4, emb.shape[1])).astype(np.float32)
    accepted: list[bool] = []
    released: dict[str, list[Sets]] = {"alice": [], "bob": []}
    for who, kind, where, k, v in asks:
        try:
            if kind == "stats":
                if where:
                    gov.check_filter(snapshot, where, principal=who)
                rows = live_rows(snapshot, where)
                gov.cohort_stats(cohort_stats(snapshot, rows), snapshot, rows, principal=who)
                ids = snapshot.metadata.column("patient_id").take(rows).to_pylist()
                sets = gov._stats_releases(snapshot, sorted(set(ids)))
            else:
                q = convert.SearchQuery("embedding", k, where, embedding=vectors[v])
                answer = gov.researcher_search(
                    snapshot, q, principal=who,
                    run=lambda q: search(state, snapshot, q, max_k=max(q.k, 1000)),  # type: ignore[arg-type]
                )
                rows_of = [(p, *outcomes[p][:2], outcomes[p][2], None) for p in answer.facts["aggregated_patients"]]
                sets = release_sets(rows_of)
                if answer.facts["cohort_curve_released"]:
                    everyone = {p for p, o in outcomes.items() if o[0] is not None and o[1] is not None}
                    sets.append((SURVIVAL, frozenset(everyone)))
        except ServiceError as err:
            assert err.reason in (
                "ANSWER_DIFFERENCING", "FILTER_DIFFERENCING", "FILTER_BELOW_MIN_CELL", "TOO_FEW_PATIENTS"
            ), err.reason
            accepted.append(False)
            continue
        accepted.append(True)
        released[who].append(sets)
    return accepted, released


@given(seed=st.integers(0, 10_000), n=st.integers(40, 110), asks=st.lists(_ASK, min_size=2, max_size=7))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_searches_and_cohort_stats_share_one_record_per_principal(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, asks: list[tuple[str, str, str, int, int]]
) -> None:
    """Random cohorts, filters, searches and cohort statistics of two researchers: what
    one principal was released, over both RPCs together, never gives a small group by
    the covered rules; and each principal's answers are those it gets alone."""
    emb, table = random_cohort(seed, n)
    state = served(tmp_path_factory.mktemp("c"), emb, table)
    accepted, released = _run_asks(state, emb, table, asks)
    for who, sets in released.items():
        for measure, group in by_measure(sets).items():
            if measure == FILTER:
                continue
            assert not derivable_small_sets(group), (who, measure, derivable_small_sets(group))
    for who in ("alice", "bob"):
        mine = [i for i, a in enumerate(asks) if a[0] == who]
        alone, _ = _run_asks(state, emb, table, [asks[i] for i in mine])
        assert alone == [accepted[i] for i in mine]


# --------------------------------------------------------------------------- over gRPC


ALICE, BOB = "a" * 40, "b" * 40
#: north holds 100 patients; north or (a SIEMENS scanner without a kernel) adds 8 south ones
NORTH = "site = 'north'"
NORTH_PLUS = "site = 'north' OR (kernel IS NULL AND manufacturer = 'SIEMENS')"


def _tokens(path: Path) -> Path:
    path.write_text(json.dumps({
        ALICE: {"role": "researcher", "id": "alice"},
        BOB: {"role": "researcher", "id": "bob"},
    }))
    path.chmod(0o600)
    return path


def _stats(target: str, token: str, where: str) -> tuple[pb.GetCohortStatsResponse | None, str | None]:
    with grpc.insecure_channel(target) as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        request = pb.GetCohortStatsRequest(filter=pb.Filter(where=where))
        try:
            return stub.GetCohortStats(request, metadata=bearer(token), timeout=30), None
        except grpc.RpcError:
            return None, rpc_error(stub.GetCohortStats, request, metadata=bearer(token))[2]


def test_each_researcher_has_its_own_record_and_it_survives_a_restart(
    index_dir: Path, cohort, tmp_path: Path
) -> None:
    _, table = cohort
    north = set(np.asarray(table.column("patient_id"))[live_rows_mask(table, NORTH)])
    plus = set(np.asarray(table.column("patient_id"))[live_rows_mask(table, NORTH_PLUS)])
    assert north < plus and 0 < len(plus - north) < M, "the fixture must give a small difference"
    kw = {"device": "cpu", "auth_tokens": _tokens(tmp_path / "tokens.json"),
          "audit_log": tmp_path / "audit.jsonl"}
    with BackgroundServer(index_dir, **kw) as srv:
        assert _stats(srv.target, ALICE, NORTH)[0] is not None
        assert _stats(srv.target, ALICE, NORTH_PLUS)[1] == "FILTER_DIFFERENCING"
        assert _stats(srv.target, BOB, NORTH_PLUS)[0] is not None  # alice's record is not bob's
    with BackgroundServer(index_dir, **kw) as srv:  # rebuilt from the audit log
        assert _stats(srv.target, ALICE, NORTH_PLUS)[1] == "FILTER_DIFFERENCING"
        assert _stats(srv.target, BOB, NORTH)[1] == "FILTER_DIFFERENCING"
        assert _stats(srv.target, ALICE, NORTH)[0] is not None  # the same answer again
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    stats = [r for r in records if r.get("method", "").endswith("GetCohortStats") and r["status"] == "OK"]
    assert {r["release_principal"] for r in stats} == {"alice", "bob"}
    assert all(r["release_kind"] == "stats" for r in stats)


def test_cohort_stats_over_a_filter_too_long_for_the_audit_record_are_replayed(
    index_dir: Path, cohort, tmp_path: Path
) -> None:
    """The audit record keeps 256 characters of a filter: statistics over a longer one
    are recorded with their patients, and still count after a restart."""
    long_north = NORTH + "".join(f" AND kvp <> '{i}'" for i in range(30))
    assert len(long_north) > 256
    kw = {"device": "cpu", "auth_tokens": _tokens(tmp_path / "tokens.json"),
          "audit_log": tmp_path / "audit.jsonl"}
    with BackgroundServer(index_dir, **kw) as srv:
        assert _stats(srv.target, ALICE, long_north)[0] is not None
    with BackgroundServer(index_dir, **kw) as srv:
        assert _stats(srv.target, ALICE, NORTH_PLUS)[1] in ("FILTER_DIFFERENCING", "ANSWER_DIFFERENCING")
        assert _stats(srv.target, BOB, NORTH_PLUS)[0] is not None


def live_rows_mask(table: object, where: str) -> np.ndarray:
    from indexing.filter import compile_where

    return np.asarray(compile_where(where, table), dtype=bool)
