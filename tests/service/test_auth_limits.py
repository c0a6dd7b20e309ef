"""Per-principal limits: calls per second and calls in flight -> RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.auth import Principal
from service.background import BackgroundServer
from service.interceptors.call import CallInfo
from service.interceptors.limits import RateLimitInterceptor

from .security_env import bearer, rpc_error, write_tokens


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code, details, trailing=None):
        self.code, self.details = code, details
        raise _Aborted


def _call(pid: str) -> CallInfo:
    return CallInfo("/cohortsim.v1.PatientSimilarityService/SearchSimilar", "r", "ipv4:1.2.3.4:5",
                    principal=Principal(pid, "clinician", "token"))


def test_concurrent_calls_per_principal_are_capped() -> None:
    guard = RateLimitInterceptor(max_concurrent=2)._guard

    async def scenario() -> None:
        a1, a2, a3, b1 = _call("alice"), _call("alice"), _call("alice"), _call("bob")
        await guard.enter(a1, None, _Context())
        await guard.enter(a2, None, _Context())
        ctx = _Context()
        with pytest.raises(_Aborted):
            await guard.enter(a3, None, ctx)
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in ctx.details
        await guard.enter(b1, None, _Context())  # another principal is not affected
        await guard.exit(a1, None, None, None, _Context())
        await guard.enter(a3, None, _Context())  # a slot is free again

    asyncio.run(scenario())


def test_health_is_not_limited() -> None:
    guard = RateLimitInterceptor(rate=0.001, burst=1)._guard

    async def scenario() -> None:
        for _ in range(5):
            await guard.enter(CallInfo("/grpc.health.v1.Health/Check", "r", "p"), None, _Context())

    asyncio.run(scenario())


def test_bad_settings() -> None:
    for kw in ({"rate": 0.0}, {"burst": 0}, {"max_concurrent": 0}):
        with pytest.raises(ValueError):
            RateLimitInterceptor(**kw)  # type: ignore[arg-type]


def test_rate_limit_per_principal_over_grpc(index_dir: Path, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json")
    with BackgroundServer(
        index_dir, device="cpu", auth_tokens=tmp_path / "tokens.json", rate_limit=0.5
    ) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        req = cohortsim_pb2.GetIndexInfoRequest()
        md = bearer(tokens["clinician"])
        stub.GetIndexInfo(req, metadata=md, timeout=10)  # burst of max(1, 2 * 0.5) = 1
        code, msg, reason = rpc_error(stub.GetIndexInfo, req, metadata=md)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "RATE_LIMITED"
        assert "retry in" in msg
        stub.GetIndexInfo(req, metadata=bearer(tokens["admin"]), timeout=10)  # own bucket
