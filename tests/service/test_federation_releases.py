"""The release record at the sites of a federation (issue #20): three ``cohortsim
serve`` site processes that trust one coordinator identity keep what they released per
end user; a researcher's A, B and A ∪ B through the coordinator is refused at the sites
(naming the union rule), another researcher is not affected, and a coordinator that is
not trusted gets one record for all its users."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.auth import TokenStore
from service.disclosure import DisclosurePolicy
from service.federation import ON_BEHALF_OF_KEY, Site

from .conftest import MODEL_VERSION, make_cohort
from .security_env import rpc_error
from .test_federation import EDGES, SITES, _InProcessCoordinator, _start, cohort_parts  # noqa: F401

COORD, OTHER = "k" * 40, "o" * 40  # the coordinator's credential at the sites; another one
ALICE, BOB = "1" * 40, "2" * 40  # researchers at the coordinator
K = 200  # more than a site holds: each answer covers its filter's whole sub-cohort


def _filters() -> tuple[str, str, str]:
    """Researcher filters (site and scanner columns only) over studies of two scanners:
    A = north; B = south and the north studies without a kernel of one scanner (A ∩ B: 3
    or 4 patients a site); A ∪ B = both sites. Each pair differs by at least 13
    patients at every site; only the three together isolate A ∩ B."""
    scanners = "manufacturer IN ('GE', 'SIEMENS')"
    return (
        f"site = 'north' AND {scanners}",
        f"(site = 'south' AND {scanners}) OR (site = 'north' AND kernel IS NULL AND manufacturer = 'GE')",
        scanners,
    )


def test_the_filters_isolate_a_small_overlap_at_every_site() -> None:
    from indexing.filter import compile_where

    _, table = make_cohort(seed=7)
    pids = np.asarray(table.column("patient_id"))
    site = np.arange(table.num_rows) % len(SITES)  # the fixture's split
    a, b, union = (compile_where(w, table) for w in _filters())
    for s in range(len(SITES)):
        pa_, pb_, pu = (set(pids[m & (site == s)]) for m in (a, b, union))
        assert pu == pa_ | pb_ and 1 <= len(pa_ & pb_) <= 10
        assert len(pa_ - pb_) >= 11 and len(pb_ - pa_) >= 11


@pytest.fixture(scope="module")
def trusting_sites(cohort_parts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # noqa: F811
    """The three sites as processes with tokens, trusting the coordinator id ``coord``."""
    root = tmp_path_factory.mktemp("trusting")
    tokens = root / "site-tokens.json"
    tokens.write_text(json.dumps({
        COORD: {"role": "clinician", "id": "coord"},
        OTHER: {"role": "clinician", "id": "coord-b"},
    }))
    tokens.chmod(0o600)
    token_file = root / "coord.token"
    token_file.write_text(COORD)
    token_file.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for name in SITES:
            proc, port = _start(
                ["serve", "--index", str(cohort_parts["dirs"][name]), "--port", "0", "--device", "cpu",
                 "--time-bins", ",".join(str(e) for e in EDGES), "--auth-tokens", str(tokens),
                 "--trusted-coordinator", "coord"],
                root / f"{name}.log",
                r"serving .*",
            )
            procs.append(proc)
            ports[name] = port
        yield {"ports": ports, "token_file": token_file}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ask(port: int, token: str, vector: np.ndarray, where: str) -> pb.SearchSimilarResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        request = pb.SearchSimilarRequest(
            embedding=pb.Vector(values=vector.tolist(), model_version=MODEL_VERSION), k=K,
            filter=pb.Filter(where=where),
        )
        return stub.SearchSimilar(request, timeout=60, metadata=(("authorization", f"Bearer {token}"),))


def test_a_researchers_a_b_and_union_is_refused_at_the_sites_another_is_not(
    cohort_parts: dict[str, Any], trusting_sites: dict[str, Any]  # noqa: F811
) -> None:
    a, b, union = _filters()
    q = cohort_parts["emb"][3]
    sites = [Site(name, f"127.0.0.1:{port}", token_file=trusting_sites["token_file"])
             for name, port in trusting_sites["ports"].items()]
    users = TokenStore.from_mapping({
        ALICE: {"role": "researcher", "id": "alice"}, BOB: {"role": "researcher", "id": "bob"},
    })
    with _InProcessCoordinator(sites, deadline_s=30.0, auth_tokens=users) as coord:
        first = _ask(coord.port, ALICE, q, a)
        second = _ask(coord.port, ALICE, q, b)
        assert first.disclosure_control.aggregated_patients >= 11
        assert second.disclosure_control.aggregated_patients >= 11
        with pytest.raises(grpc.RpcError) as info:
            _ask(coord.port, ALICE, q, union)
        # bob's record is his own: the union alice was refused is answered for him
        answered = _ask(coord.port, BOB, q, union)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    # each site refuses: the filter's sub-cohort is the union of the two before it
    assert details.count("FILTER_DIFFERENCING:union") == len(SITES), details
    assert answered.disclosure_control.aggregated_patients > first.disclosure_control.aggregated_patients
    assert {s.name: pb.SiteState.Name(s.state) for s in answered.federation.sites} == {
        s: "SITE_STATE_ANSWERED" for s in SITES
    }


def _aggregate(port: int, token: str, user: str, vector: np.ndarray, where: str, *, k: int = K) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        request = pb.AggregateSiteRequest(
            embedding=pb.Vector(values=vector.tolist(), model_version=MODEL_VERSION), k=k,
            filter=pb.Filter(where=where),
        )
        metadata = (("authorization", f"Bearer {token}"), (ON_BEHALF_OF_KEY, user))
        try:
            return stub.AggregateSite(request, timeout=60, metadata=metadata)
        except grpc.RpcError:
            return rpc_error(stub.AggregateSite, request, metadata=metadata)


def test_a_site_keeps_one_record_for_a_coordinator_it_does_not_trust(
    cohort_parts: dict[str, Any], trusting_sites: dict[str, Any]  # noqa: F811
) -> None:
    """``coord-b`` names a new user on every call: the site ignores the names (it does
    not trust coord-b) and refuses the third call of the A, B, A ∪ B; the trusted
    coordinator's user ``carol`` gets the same union answered."""
    a, b, union = _filters()
    q = cohort_parts["emb"][50]
    port = trusting_sites["ports"]["north"]
    assert isinstance(_aggregate(port, OTHER, "u1", q, a), pb.AggregateSiteResponse)
    assert isinstance(_aggregate(port, OTHER, "u2", q, b), pb.AggregateSiteResponse)
    code, message, reason = _aggregate(port, OTHER, "u3", q, union)
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "FILTER_DIFFERENCING"
    assert "union rule" in message
    # the site holds a researcher's filter to the researcher columns: an outcome or an
    # identifier in a filter would make a refusal reveal a patient's outcome
    code, _, reason = _aggregate(port, COORD, "carol", q, "event = true")
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "FILTER_COLUMN_NOT_ALLOWED"
    assert isinstance(_aggregate(port, COORD, "carol", q, union), pb.AggregateSiteResponse)


def test_a_sites_records_survive_a_restart(cohort_parts: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    """AggregateSite releases (their filters and counts) go to the site's audit log with
    their end user and are replayed at start: dave's union after a restart is still
    refused, erin's answered; frank's counts without a filter are recorded too (one
    neighbour more is refused by the pair rule after the restart, gina's answered)."""
    from service.background import BackgroundServer

    a, b, union = _filters()
    q = cohort_parts["emb"][101]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({COORD: {"role": "clinician", "id": "coord"}}))
    tokens.chmod(0o600)
    kw: dict[str, Any] = {
        "device": "cpu", "auth_tokens": tokens, "audit_log": tmp_path / "audit.jsonl",
        "policy": DisclosurePolicy(time_bins=EDGES, trusted_coordinators=frozenset({"coord"})),
    }
    with BackgroundServer(cohort_parts["dirs"]["south"], **kw) as site:
        assert isinstance(_aggregate(site.port, COORD, "dave", q, a), pb.AggregateSiteResponse)
        assert isinstance(_aggregate(site.port, COORD, "dave", q, b), pb.AggregateSiteResponse)
    with BackgroundServer(cohort_parts["dirs"]["south"], **kw) as site:
        code, _, reason = _aggregate(site.port, COORD, "dave", q, union)
        assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "FILTER_DIFFERENCING"
        assert isinstance(_aggregate(site.port, COORD, "erin", q, union), pb.AggregateSiteResponse)
        first = _aggregate(site.port, COORD, "frank", q, "", k=40)
        assert isinstance(first, pb.AggregateSiteResponse)
    with BackgroundServer(cohort_parts["dirs"]["south"], **kw) as site:
        code, message, reason = _aggregate(site.port, COORD, "frank", q, "", k=41)  # one more
        assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "ANSWER_DIFFERENCING"
        assert "pair rule" in message
        assert isinstance(_aggregate(site.port, COORD, "gina", q, "", k=41), pb.AggregateSiteResponse)
