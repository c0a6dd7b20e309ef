"""A shard coordinator keeps its researchers' release records (one per principal) and
rebuilds them from its audit log at start, as a single server does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.audit import AuditLog
from service.auth import TokenStore
from service.background import BackgroundServer
from service.federation import Site

from .test_shards import _Coordinator, _queries, _search, shard_servers, sharded  # noqa: F401

ALICE, BOB = "a" * 40, "b" * 40


def _outcome(port: int, q: np.ndarray, k: int, token: str) -> str:
    try:
        _search(port, q.astype(np.float32), k=k, token=token)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def test_a_restarted_shard_coordinator_still_refuses_a_differencing_pair(
    sharded: dict[str, Any], shard_servers: list[Site], tmp_path: Path  # noqa: F811
) -> None:
    tokens = TokenStore.from_mapping({
        ALICE: {"role": "researcher", "id": "alice"}, BOB: {"role": "researcher", "id": "bob"},
    })
    q = _queries(sharded["emb"])[0]
    rng = np.random.default_rng(4)
    # a near-repeat of q whose 22 patients differ from q's by 1..10 (refused by one server)
    nearby = None
    with BackgroundServer(sharded["one"], device="cpu", auth_tokens=tokens) as one:
        assert _outcome(one.port, q, 22, ALICE) == "OK"
        for scale in (0.05, 0.1, 0.15, 0.2, 0.3):
            cand = q + scale * rng.normal(size=q.shape)
            if _outcome(one.port, cand, 22, ALICE) == "PERMISSION_DENIED":
                nearby = cand
                break
    assert nearby is not None, "no near-repeat shifted the answer by 1..10 patients"
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)  # closed here: an in-process coordinator leaves its log open
    with _Coordinator(shard_servers, auth_tokens=tokens, audit_log=log) as coord:
        assert _outcome(coord.port, q, 22, ALICE) == "OK"
    log.close()
    log = AuditLog(path)
    try:
        with _Coordinator(shard_servers, auth_tokens=tokens, audit_log=log) as coord:  # a restart
            assert _outcome(coord.port, nearby, 22, ALICE) == "PERMISSION_DENIED"
            assert _outcome(coord.port, nearby, 22, BOB) == "OK"  # bob's record is his own
    finally:
        log.close()
