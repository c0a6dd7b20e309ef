"""The red team's audit-log findings (issue #24): anonymous callers must not be able to
stop the service through its audit log, and a damaged or moved log is handled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.audit import AuditError, AuditLog, read_records, verify
from service.background import BackgroundServer
from service.cli import app

from .security_env import rpc_error, write_tokens


def _log(path: Path, n: int, **kw) -> list[dict]:
    log = AuditLog(path, fsync=False, **kw)
    out = [log.append({"principal": f"p{i}", "method": "/x/Y", "status": "OK", "pad": "x" * 300})
           for i in range(n)]
    log.close()
    return out


# --------------------------------------------------------------------------- over gRPC


def test_anonymous_huge_filter_writes_a_bounded_line_and_the_rate_applies_first(
    index_dir: Path, tmp_path: Path
) -> None:
    write_tokens(tmp_path / "tokens.json")
    path = tmp_path / "audit.jsonl"
    huge = "site = '" + "x" * (4 << 20) + "'"  # a 4 MiB filter, no token
    with BackgroundServer(
        index_dir, device="cpu", auth_tokens=tmp_path / "tokens.json", audit_log=path,
        rate_limit=0.5, max_receive_mb=16,
    ) as srv, grpc.insecure_channel(
        srv.target, options=[("grpc.max_send_message_length", 16 << 20)]
    ) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        req = cohortsim_pb2.SearchSimilarRequest(
            embedding=cohortsim_pb2.Vector(values=[0.1] * 32), k=5,
            filter=cohortsim_pb2.Filter(where=huge),
        )
        codes = [rpc_error(stub.SearchSimilar, req)[2] for _ in range(10)]
        assert codes[0] == "MISSING_CREDENTIALS"
        assert "RATE_LIMITED" in codes, "the rate limit did not apply before authentication"
    lines = path.read_bytes().splitlines()
    assert max(len(line) for line in lines) < 4096
    first = json.loads(lines[0])
    assert first["principal"] == "anonymous" and first["filter"] == huge[:256]
    assert first["filter_sha256"] == hashlib.sha256(huge.encode()).hexdigest()
    assert first["filter_chars"] == len(huge)
    assert verify(path).ok


# --------------------------------------------------------------------------- the file


def test_line_separators_from_requests_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    text = "a\u2028b\u0085c\u2029d\nfoo"
    log = AuditLog(path, fsync=False)
    log.append({"request_id": text, "status": "OK"})
    log.append({"principal": "next"})
    log.close()
    raw = path.read_bytes()
    for ch in ("\u2028", "\u0085", "\u2029"):
        assert ch.encode() not in raw
    assert len(raw.decode().splitlines()) == 2  # what a line-based shipper sees
    assert verify(path).ok
    assert next(read_records(path))["request_id"] == text


def test_a_torn_tail_is_recovered_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path, 4)
    torn = b'{"method":"/x/Y","pad":"' + b"y" * 5000  # a write cut by kill -9
    with path.open("ab") as f:
        f.write(torn)
    log = AuditLog(path, fsync=False)
    nxt = log.append({"principal": "after"})
    log.close()
    assert verify(path).ok
    records = list(read_records(path))
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4, 5]
    note = records[4]
    assert note["event"] == "audit_tail_recovered" and note["prev"] == recs[-1]["hash"]
    assert note["torn_bytes"] == len(torn)
    assert note["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert (tmp_path / note["torn_file"]).read_bytes() == torn  # kept as evidence
    assert nxt["seq"] == 5


@pytest.mark.parametrize("damage", ["edit", "remove", "reorder", "torn_middle"])
def test_other_damage_still_refuses_to_start(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "edit":
        lines[1] = lines[1].replace(b'"p1"', b'"pX"')
    elif damage == "remove":
        del lines[2]
    elif damage == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines[2] = lines[2][:40]  # an incomplete line that is not the last
    path.write_bytes(b"".join(lines) + b'{"torn')
    with pytest.raises(AuditError, match="fails verification"):
        AuditLog(path, fsync=False)


@pytest.mark.parametrize("how", ["move", "delete"])
def test_a_log_moved_or_deleted_while_serving_fails_closed(tmp_path: Path, how: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync=False)
    log.append({"n": 1})
    if how == "move":
        path.rename(tmp_path / "elsewhere.jsonl")
    else:
        path.unlink()
    with pytest.raises(AuditError, match="moved or deleted"):
        log.append({"n": 2})
    with pytest.raises(AuditError, match="moved or deleted"):  # and stays closed
        log.append({"n": 3})
    log.close()


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    from service.audit import rotated_files

    path = tmp_path / "audit.jsonl"
    recs = _log(path, 60, max_bytes=4096)
    files = rotated_files(path)
    assert len(files) >= 4 and all(f.stat().st_size <= 4096 for f in files)
    result = verify(path, expect_head=recs[-1]["hash"])
    assert result.ok and result.records == 60 and result.files == len(files) + 1
    assert [r["seq"] for r in read_records(path)] == list(range(60))
    # reopening continues the chain from the rotated files
    more = _log(path, 1, max_bytes=4096)
    assert more[0]["seq"] == 60 and more[0]["prev"] == recs[-1]["hash"]
    out = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert out.exit_code == 0 and "61 records" in out.output
    # a rotated file removed from the middle is named
    files[1].rename(tmp_path / "shipped-away")
    bad = verify(path)
    assert not bad.ok and bad.bad_file == files[2] and "removed, inserted or reordered" in bad.reason
    out = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert out.exit_code == 1 and files[2].name in out.output
