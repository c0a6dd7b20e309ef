"""Tokens, roles and rights: UNAUTHENTICATED / PERMISSION_DENIED, health open, secrets guarded."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from service.api import SERVICE_FULL_NAME, cohortsim_pb2, cohortsim_pb2_grpc
from service.auth import (
    METHOD_RIGHTS,
    ROLE_RIGHTS,
    AuthConfigError,
    TokenStore,
    bearer_token,
    hash_token,
    read_secret_file,
)
from service.background import BackgroundServer
from service.cli import app

from .security_env import bearer, rpc_error, write_tokens

TOKEN = "t" * 32


# --------------------------------------------------------------------------- token file


def test_plain_and_hashed_tokens_authenticate() -> None:
    other = "u" * 40
    store = TokenStore.from_mapping(
        {
            TOKEN: "clinician",
            hash_token(other): {"role": "researcher", "id": "study-42"},
            "cert:ward7-app": {"role": "clinician", "id": "ward7"},
        }
    )
    p = store.authenticate(TOKEN)
    assert p is not None and p.role == "clinician" and p.via == "token"
    assert TOKEN not in p.id  # the id never carries the token
    q = store.authenticate(other)
    assert q is not None and (q.role, q.id) == ("researcher", "study-42")
    assert store.authenticate("v" * 32) is None
    assert store.authenticate("") is None
    c = store.certificate_principal("ward7-app")
    assert c is not None and (c.role, c.id, c.via) == ("clinician", "ward7", "certificate")
    assert store.certificate_principal("someone-else") is None


def test_hash_is_salted() -> None:
    a, b = hash_token(TOKEN), hash_token(TOKEN)
    assert a != b and a.startswith("sha256$") and len(a.split("$")[2]) == 64


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({}, "non-empty JSON object"),
        ([TOKEN], "non-empty JSON object"),
        ({"short": "clinician"}, "at least 24"),
        ({TOKEN: "superuser"}, "unknown role"),
        ({TOKEN: {"role": "admin", "colour": "red"}}, "unknown keys"),
        ({TOKEN: 3}, "value must be a role"),
        ({"sha256$zz$00": "admin"}, "sha256$<salt hex>"),
        ({"sha256$00$" + "a" * 10: "admin"}, "sha256$<salt hex>"),
        ({TOKEN: {"role": "admin", "id": "x"}, "w" * 30: {"role": "service", "id": "x"}}, "used twice"),
        ({"cert:": "admin"}, "common name"),
    ],
)
def test_bad_token_files_are_refused(data: object, fragment: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        TokenStore.from_mapping(data)
    assert fragment in str(info.value)
    assert TOKEN not in str(info.value)  # never echo a token


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_files_readable_by_others_are_refused(tmp_path: Path, mode: int) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({TOKEN: "admin"}))
    f.chmod(mode)
    with pytest.raises(AuthConfigError, match="chmod 600"):
        TokenStore.load(f)
    f.chmod(0o600)
    assert len(TokenStore.load(f)) == 1
    assert read_secret_file(f, "token file").startswith(b"{")


def test_token_file_not_json(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    f.write_text("{not json")
    f.chmod(0o600)
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        TokenStore.load(f)


def test_bearer_header_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("authorization", "Bearer")]) == ""
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_every_rpc_of_the_proto_has_a_right() -> None:
    """A new RPC must be given a right here (it is refused to everyone until then)."""
    service = cohortsim_pb2.DESCRIPTOR.services_by_name["PatientSimilarityService"]
    missing = [
        m.name
        for m in service.methods
        if f"/{SERVICE_FULL_NAME}/{m.name}" not in METHOD_RIGHTS
    ]
    assert not missing, f"add these RPCs to service.auth.METHOD_RIGHTS: {missing}"
    rights = {r for rs in ROLE_RIGHTS.values() for r in rs}
    for method, right in METHOD_RIGHTS.items():
        assert right in rights | {"public", "authenticated", "cohort_stats"}, method


# --------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    return path, write_tokens(path)


@pytest.fixture(scope="module")
def auth_server(index_dir: Path, tokens: tuple[Path, dict[str, str]]):
    with BackgroundServer(index_dir, device="cpu", auth_tokens=tokens[0]) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(auth_server: BackgroundServer):
    with grpc.insecure_channel(auth_server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel):
    return cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)


@pytest.fixture(scope="module")
def request_(cohort) -> cohortsim_pb2.SearchSimilarRequest:
    emb, _ = cohort
    v = emb[5] + 0.3 * np.random.default_rng(1).normal(size=emb.shape[1]).astype(np.float32)
    return cohortsim_pb2.SearchSimilarRequest(embedding=cohortsim_pb2.Vector(values=v.tolist()), k=10)


def test_missing_token_is_unauthenticated(stub, request_) -> None:
    code, msg, reason = rpc_error(stub.SearchSimilar, request_)
    assert code == grpc.StatusCode.UNAUTHENTICATED and reason == "MISSING_CREDENTIALS"
    assert "Bearer" in msg


@pytest.mark.parametrize("header", ["Bearer " + "x" * 40, "Basic abc", "Bearer"])
def test_wrong_token_is_unauthenticated(stub, request_, header: str) -> None:
    code, msg, reason = rpc_error(
        stub.SearchSimilar, request_, metadata=[("authorization", header)]
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and reason == "INVALID_TOKEN"
    assert "x" * 40 not in msg


def test_clinician_sees_pseudonymous_neighbours(stub, request_, tokens) -> None:
    resp = stub.SearchSimilar(request_, metadata=bearer(tokens[1]["clinician"]), timeout=20)
    assert len(resp.neighbors) == 10
    assert all(n.patient_id.startswith("P-") for n in resp.neighbors)
    assert not resp.HasField("disclosure_control")


def test_researcher_gets_aggregates_only(stub, request_, tokens) -> None:
    resp = stub.SearchSimilar(request_, metadata=bearer(tokens[1]["researcher"]), timeout=20)
    assert len(resp.neighbors) == 0
    assert resp.disclosure_control.min_cell_count == 11
    assert resp.disclosure_control.aggregated_patients == 11  # k=10 rounded up to 11


@pytest.mark.parametrize(
    ("role", "method", "request_factory"),
    [
        ("service", "SearchSimilar", None),
        ("admin", "SearchSimilar", None),
        ("service", "GetIndexInfo", cohortsim_pb2.GetIndexInfoRequest),
        ("admin", "EmbedStudy", cohortsim_pb2.EmbedStudyRequest),
    ],
)
def test_role_without_the_right_is_denied(stub, request_, tokens, role, method, request_factory) -> None:
    req = request_ if request_factory is None else request_factory()
    code, msg, reason = rpc_error(getattr(stub, method), req, metadata=bearer(tokens[1][role]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "ROLE_NOT_ALLOWED"
    assert role in msg and method in msg


def test_admin_and_researcher_may_read_index_info(stub, tokens) -> None:
    for role in ("admin", "researcher", "clinician"):
        info = stub.GetIndexInfo(
            cohortsim_pb2.GetIndexInfoRequest(), metadata=bearer(tokens[1][role]), timeout=20
        )
        assert info.num_studies == 200


def test_health_needs_no_token(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_FULL_NAME), timeout=20)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_credential(channel, tokens) -> None:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as info:
        list(refl.ServerReflectionInfo(iter([req]), timeout=20))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answers = list(
        refl.ServerReflectionInfo(iter([req]), metadata=bearer(tokens[1]["service"]), timeout=20)
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert SERVICE_FULL_NAME in names


def test_python_client_sends_the_token(auth_server, tokens, request_) -> None:
    from service.client import CohortsimClient, CohortsimClientError

    with CohortsimClient(auth_server.target, token=tokens[1]["clinician"]) as c:
        assert c.index_info().num_studies == 200
    with CohortsimClient(auth_server.target) as c, pytest.raises(CohortsimClientError) as info:
        c.index_info()
    assert info.value.code == "UNAUTHENTICATED"


def test_cli_serve_refuses_a_readable_token_file(index_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({TOKEN: "admin"}))
    f.chmod(0o644)
    result = CliRunner().invoke(app, ["serve", "--index", str(index_dir), "--port", "0", "--auth-tokens", str(f)])
    assert result.exit_code == 2
    assert "chmod 600" in result.output and "cohortsim: error:" in result.output


def test_cli_auth_token_makes_a_usable_entry() -> None:
    result = CliRunner().invoke(app, ["auth", "token", "--role", "researcher", "--id", "r1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    store = TokenStore.from_mapping(data["entry"])
    p = store.authenticate(data["token"])
    assert p is not None and (p.role, p.id) == ("researcher", "r1")


def test_an_answer_that_skipped_the_researcher_view_is_withheld(stub, request_, tokens, monkeypatch) -> None:
    """The interceptor's safety net: if a code path forgets the governance step, a
    researcher still never receives pseudonyms."""
    from service.governance import Governance

    monkeypatch.setattr(Governance, "restricts", staticmethod(lambda principal: False))
    code, _msg, reason = rpc_error(
        stub.SearchSimilar, request_, metadata=bearer(tokens[1]["researcher"])
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "IDENTITIES_WITHHELD"
    resp = stub.SearchSimilar(request_, metadata=bearer(tokens[1]["clinician"]), timeout=20)
    assert resp.neighbors  # clinicians are not affected


def test_researcher_filters_over_grpc(stub, tokens, cohort) -> None:
    emb, _ = cohort
    md = bearer(tokens[1]["researcher"])
    req = cohortsim_pb2.SearchSimilarRequest(
        embedding=cohortsim_pb2.Vector(values=emb[3].tolist()),  # cluster 3: south rows
        k=11,
        filter=cohortsim_pb2.Filter(where="site = 'south'"),
    )
    resp = stub.SearchSimilar(req, metadata=md, timeout=20)
    assert not resp.neighbors and resp.disclosure_control.aggregated_patients == 11
    req.filter.where = "site = 'south' OR event = true"
    code, _, reason = rpc_error(stub.SearchSimilar, req, metadata=md)
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "FILTER_COLUMN_NOT_ALLOWED"
