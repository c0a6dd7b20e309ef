"""Helpers for the security tests: token files, error reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.auth import hash_token, new_token

ROLES = ("clinician", "researcher", "admin", "service")


def write_tokens(path: Path, *, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """A 0600 token file with one token per role (researcher's stored as a salted hash);
    returns role -> token."""
    tokens = {role: new_token() for role in ROLES}
    data: dict[str, Any] = {}
    for role, token in tokens.items():
        key = hash_token(token) if role == "researcher" else token
        data[key] = {"role": role, "id": f"{role}-1"}
    data.update(extra or {})
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return tokens


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def rpc_error(call: Any, request: Any, **kw: Any) -> tuple[grpc.StatusCode, str, str | None]:
    """Call expecting failure: (code, message, ErrorInfo reason or None)."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=20, **kw)
    err = info.value
    reason = None
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            ei = error_details_pb2.ErrorInfo()
            if detail.Unpack(ei):
                reason = ei.reason
    return err.code(), err.details() or "", reason
