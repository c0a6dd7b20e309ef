"""The audit log: one chained record per call, tamper evidence, fail closed."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.audit import GENESIS, AuditError, AuditLog, read_records, record_hash, verify
from service.background import BackgroundServer
from service.cli import app
from service.governance import DisclosurePolicy
from service.server import server_state

from .security_env import bearer, rpc_error, write_tokens


def _log(path: Path, n: int = 5) -> list[dict]:
    log = AuditLog(path, fsync=False)
    out = [log.append({"principal": f"p{i}", "method": "/x/Y", "status": "OK"}) for i in range(n)]
    log.close()
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_records_are_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path)
    assert [r["seq"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[0]["prev"] == GENESIS
    for a, b in itertools.pairwise(recs):
        assert b["prev"] == a["hash"] == record_hash(a)
    result = verify(path)
    assert result.ok and result.records == 5 and result.head == recs[-1]["hash"]
    assert [r["principal"] for r in read_records(path)] == [f"p{i}" for i in range(5)]
    assert os.stat(path).st_mode & 0o077 == 0  # created owner-only


def _edit(lines: list[str]) -> list[str]:
    rec = json.loads(lines[2])
    rec["principal"] = "someone-else"
    return [*lines[:2], json.dumps(rec, sort_keys=True) + "\n", *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "bad_line", "words"),
    [
        (_edit, 3, "edited"),
        (lambda ls: [*ls[:1], *ls[2:]], 2, "removed, inserted or reordered"),  # remove line 2
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "removed, inserted or reordered"),
        (lambda ls: ls[1:], 1, "removed, inserted or reordered"),  # remove the first
        (lambda ls: [*ls[:3], ls[1], *ls[3:]], 4, "removed, inserted or reordered"),  # duplicate
        (lambda ls: [*ls[:4], ls[4][:-1]], 5, "incomplete"),
        (lambda ls: [*ls[:3], "garbage\n", *ls[3:]], 4, "not a JSON record"),
    ],
)
def test_verify_names_the_first_bad_record(tmp_path: Path, tamper, bad_line: int, words: str) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path)
    path.write_text("".join(tamper(_lines(path))))
    result = verify(path)
    assert not result.ok
    assert result.bad_line == bad_line, result.reason
    assert words in result.reason


def test_rewritten_chain_is_caught_by_the_kept_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path)
    head = recs[-1]["hash"]
    path.write_text("".join(_lines(path)[:3]))  # the last two records cut off
    assert verify(path).ok  # a shorter chain is still a chain ...
    result = verify(path, expect_head=head)  # ... but not the one that was anchored
    assert not result.ok and "removed from its end" in result.reason
    assert verify(tmp_path / "audit.jsonl", expect_head=recs[2]["hash"]).ok


def test_reopening_continues_the_chain_and_refuses_a_broken_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path, 3)
    log = AuditLog(path, fsync=False)
    rec = log.append({"principal": "later"})
    assert (rec["seq"], rec["prev"]) == (3, recs[-1]["hash"])
    with pytest.raises(AuditError, match="in use by another process"):
        AuditLog(path)
    log.close()
    assert verify(path).ok
    path.write_text("".join(_edit(_lines(path))))
    with pytest.raises(AuditError, match="fails verification at line 3"):
        AuditLog(path)


def test_a_failed_write_raises_and_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.append({"n": 1})
    good = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    os.dup2(full, log._fd)
    os.close(full)
    with pytest.raises(AuditError, match="cannot write"):
        log.append({"n": 2})
    os.dup2(good, log._fd)
    os.close(good)
    rec = log.append({"n": 3})
    log.close()
    assert rec["seq"] == 1 and verify(path).ok


def test_cli_audit_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", str(path)])
    assert ok.exit_code == 0 and "chain intact" in ok.output and recs[-1]["hash"] in ok.output
    path.write_text("".join(_edit(_lines(path))))
    bad = runner.invoke(app, ["audit", "verify", str(path)])
    assert bad.exit_code == 1
    assert "line 3" in bad.output and "edited" in bad.output
    missing = runner.invoke(app, ["audit", "verify", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2


# --------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def audited(index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("audited")
    tokens = write_tokens(root / "tokens.json")
    path = root / "audit.jsonl"
    policy = DisclosurePolicy(reid_similarity=0.99)  # this cohort's neighbours reach 0.96
    with BackgroundServer(
        index_dir, device="cpu", auth_tokens=root / "tokens.json", audit_log=path, policy=policy
    ) as srv, grpc.insecure_channel(srv.target) as ch:
        yield srv, ch, tokens, path


def _records(path: Path, at_least: int = 0) -> list[dict]:
    """The records; waits (up to 5 s) for ``at_least`` of them: a failed call's record is
    written just after its status leaves (gRPC sends an abort's status at once)."""
    deadline = time.monotonic() + 5.0
    while True:
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        if len(recs) >= at_least or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


def test_every_call_is_recorded_with_who_what_and_which_pseudonyms(audited, cohort) -> None:
    _srv, ch, tokens, path = audited
    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
    before = len(_records(path))
    emb, _ = cohort
    req = cohortsim_pb2.SearchSimilarRequest(
        embedding=cohortsim_pb2.Vector(values=emb[7].tolist()), k=5
    )
    md = [*bearer(tokens["clinician"]), ("x-request-id", "req-0042")]
    resp = stub.SearchSimilar(req, metadata=md, timeout=20)
    uid_req = cohortsim_pb2.SearchSimilarRequest(study_uid=resp.neighbors[1].study_uid, k=3)
    stub.SearchSimilar(uid_req, metadata=bearer(tokens["clinician"]), timeout=20)
    rpc_error(stub.SearchSimilar, req)  # no token
    rpc_error(stub.SearchSimilar, req, metadata=bearer(tokens["service"]))  # no right
    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=20)

    recs = _records(path, before + 4)[before:]
    assert len(recs) == 4  # health checks are not recorded
    ok, by_uid, anon, denied = recs
    assert ok["principal"] == "clinician-1" and ok["role"] == "clinician" and ok["auth"] == "token"
    assert ok["method"].endswith("/SearchSimilar") and ok["status"] == "OK"
    assert ok["request_id"] == "req-0042" and ok["query_kind"] == "embedding" and ok["k"] == 5
    assert ok["patients"] == [n.patient_id for n in resp.neighbors]
    assert ok["studies"] == [n.study_uid for n in resp.neighbors]
    assert by_uid["query_kind"] == "study_uid" and by_uid["query_study"] == resp.neighbors[1].study_uid
    assert (anon["principal"], anon["status"], anon["reason"]) == (
        "anonymous",
        "UNAUTHENTICATED",
        "MISSING_CREDENTIALS",
    )
    assert "patients" not in anon
    assert (denied["principal"], denied["role"], denied["status"], denied["reason"]) == (
        "service-1",
        "service",
        "PERMISSION_DENIED",
        "ROLE_NOT_ALLOWED",
    )
    assert all(len(r["request_id"]) >= 8 for r in recs)
    assert tokens["clinician"] not in path.read_text()  # tokens never reach the record
    assert verify(path).ok


def test_researcher_record_holds_the_aggregate_and_the_reid_count(audited, cohort) -> None:
    _srv, ch, tokens, path = audited
    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
    emb, table = cohort
    row = 150  # a patient with one study
    req = cohortsim_pb2.SearchSimilarRequest(
        embedding=cohortsim_pb2.Vector(values=emb[row].tolist()), k=33
    )
    resp = stub.SearchSimilar(req, metadata=bearer(tokens["researcher"]), timeout=20)
    assert not resp.neighbors
    rec = _records(path)[-1]
    assert rec["role"] == "researcher" and rec["patients"] == [] and rec["studies"] == []
    assert len(rec["aggregated_patients"]) == 33
    assert rec["reid_matches_removed"] == 1
    assert table.column("patient_id")[row].as_py() not in rec["aggregated_patients"]


def test_fail_closed_when_the_record_cannot_be_written(audited, cohort) -> None:
    srv, ch, tokens, path = audited
    stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
    from service.server import _PARTS

    audit = _PARTS[srv._server].audit  # type: ignore[index]
    assert audit is not None and server_state(srv._server) is not None  # type: ignore[arg-type]
    good = os.dup(audit._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, audit._fd)
    os.close(full)
    try:
        code, _msg, reason = rpc_error(
            stub.GetIndexInfo,
            cohortsim_pb2.GetIndexInfoRequest(),
            metadata=bearer(tokens["clinician"]),
        )
    finally:
        os.dup2(good, audit._fd)
        os.close(good)
    assert code == grpc.StatusCode.UNAVAILABLE and reason == "AUDIT_UNAVAILABLE"
    info = stub.GetIndexInfo(
        cohortsim_pb2.GetIndexInfoRequest(), metadata=bearer(tokens["clinician"]), timeout=20
    )
    assert info.num_studies == 200
    assert verify(path).ok


def test_unwritable_audit_log_stops_the_server_from_starting(index_dir: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("")
    with (
        pytest.raises(AuditError, match="cannot open the audit log"),
        BackgroundServer(index_dir, device="cpu", audit_log=not_a_folder / "audit.jsonl"),
    ):
        pass


def test_restart_replays_researcher_answers(index_dir: Path, tmp_path: Path, cohort) -> None:
    """A differencing pair split across a restart is still refused."""
    tokens = write_tokens(tmp_path / "tokens.json")
    path = tmp_path / "audit.jsonl"
    emb, _ = cohort
    rng = np.random.default_rng(3)
    q = emb[20] + 0.05 * rng.normal(size=emb.shape[1]).astype(np.float32)
    kw = {"device": "cpu", "auth_tokens": tmp_path / "tokens.json", "audit_log": path}

    def ask(target: str, vector: np.ndarray, k: int):
        with grpc.insecure_channel(target) as ch:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            req = cohortsim_pb2.SearchSimilarRequest(
                embedding=cohortsim_pb2.Vector(values=vector.tolist()), k=k
            )
            md = bearer(tokens["researcher"])
            try:
                return stub.SearchSimilar(req, metadata=md, timeout=20), None
            except grpc.RpcError:
                return None, rpc_error(stub.SearchSimilar, req, metadata=md)

    with BackgroundServer(index_dir, **kw) as srv:
        first, _ = ask(srv.target, q, 11)
        assert first is not None
    # the same query with a slightly different vector: the set shifts by a few patients
    shifted = None
    for scale in (0.15, 0.2, 0.25, 0.3, 0.4):
        cand = q + scale * rng.normal(size=q.shape).astype(np.float32)
        with BackgroundServer(index_dir, **kw) as srv:
            _answer, error = ask(srv.target, cand, 11)
        if error is not None:
            shifted = error
            break
    assert shifted is not None, "no nearby query changed the set by 1..10 patients"
    code, _, reason = shifted
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "ANSWER_DIFFERENCING"
    assert verify(path).ok
