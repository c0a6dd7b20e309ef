"""TLS and mutual TLS with certificates made at test time: plain text and unknown clients fail."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.auth import AuthConfigError
from service.background import BackgroundServer
from service.cli import app
from service.client import CohortsimClient, CohortsimClientError
from service.tls import TlsConfig, channel_credentials

from .pki import TestCA
from .security_env import write_tokens


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    ca = TestCA(root / "ca")
    rogue = TestCA(root / "rogue", name="rogue CA")
    return {
        "ca": ca,
        "server": ca.issue("localhost", server=True),
        "client": ca.issue("ward7-app", server=False),
        "unmapped": ca.issue("lab-laptop", server=False),
        "rogue": rogue.issue("ward7-app", server=False),
    }


def _index_info(target: str, creds: grpc.ChannelCredentials | None, **kw: object) -> int:
    with CohortsimClient(target, credentials=creds, timeout=10, **kw) as c:  # type: ignore[arg-type]
        return c.index_info().num_studies


@pytest.fixture(scope="module")
def tls_server(index_dir: Path, pki):
    server = pki["server"]
    with BackgroundServer(index_dir, device="cpu", tls=TlsConfig(server.cert, server.key)) as srv:
        yield srv


def test_tls_answers_a_client_that_trusts_the_ca(tls_server, pki) -> None:
    creds = channel_credentials(pki["ca"].cert_path)
    assert _index_info(tls_server.target, creds) == 200


def test_plain_text_connection_fails(tls_server) -> None:
    with pytest.raises(CohortsimClientError) as info:
        _index_info(tls_server.target, None)
    assert info.value.code == "UNAVAILABLE"


def test_client_that_does_not_trust_the_server_fails(tls_server, pki) -> None:
    creds = channel_credentials(pki["rogue"].cert.parent / "rogue-CA.pem")
    with pytest.raises(CohortsimClientError) as info:
        _index_info(tls_server.target, creds)
    assert info.value.code == "UNAVAILABLE"


@pytest.fixture(scope="module")
def mtls_server(index_dir: Path, pki, tmp_path_factory: pytest.TempPathFactory):
    server, ca = pki["server"], pki["ca"]
    tokens_path = tmp_path_factory.mktemp("mtls") / "tokens.json"
    tokens = write_tokens(tokens_path, extra={"cert:ward7-app": {"role": "clinician", "id": "ward7"}})
    audit = tokens_path.parent / "audit.jsonl"
    tls = TlsConfig(server.cert, server.key, client_ca=ca.cert_path)
    with BackgroundServer(
        index_dir, device="cpu", tls=tls, auth_tokens=tokens_path, audit_log=audit
    ) as srv:
        yield srv, tokens, audit


def test_mutual_tls_accepts_a_valid_client_certificate(mtls_server, pki) -> None:
    srv, _, audit = mtls_server
    client = pki["client"]
    creds = channel_credentials(pki["ca"].cert_path, client.cert, client.key)
    assert _index_info(srv.target, creds) == 200  # mapped certificate: no token needed
    last = json.loads(audit.read_text().splitlines()[-1])
    assert (last["principal"], last["auth"], last["certificate"], last["role"]) == (
        "ward7",
        "certificate",
        "ward7-app",
        "clinician",
    )


def test_mutual_tls_refuses_a_client_without_certificate(mtls_server, pki) -> None:
    srv, tokens, _ = mtls_server
    creds = channel_credentials(pki["ca"].cert_path)
    with pytest.raises(CohortsimClientError) as info:
        _index_info(srv.target, creds, token=tokens["clinician"])  # a token is not enough
    assert info.value.code == "UNAVAILABLE"


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server, pki) -> None:
    srv, tokens, _ = mtls_server
    rogue = pki["rogue"]
    creds = channel_credentials(pki["ca"].cert_path, rogue.cert, rogue.key)
    with pytest.raises(CohortsimClientError) as info:
        _index_info(srv.target, creds, token=tokens["clinician"])
    assert info.value.code == "UNAVAILABLE"


def test_valid_but_unmapped_certificate_still_needs_a_token(mtls_server, pki) -> None:
    srv, tokens, audit = mtls_server
    other = pki["unmapped"]
    creds = channel_credentials(pki["ca"].cert_path, other.cert, other.key)
    with pytest.raises(CohortsimClientError) as info:
        _index_info(srv.target, creds)
    assert info.value.code == "UNAUTHENTICATED"
    assert _index_info(srv.target, creds, token=tokens["admin"]) == 200
    last = json.loads(audit.read_text().splitlines()[-1])
    assert (last["principal"], last["role"], last["certificate"]) == ("admin-1", "admin", "lab-laptop")


def test_private_key_readable_by_others_is_refused(pki, tmp_path: Path, index_dir: Path) -> None:
    server = pki["server"]
    key = tmp_path / "server.key"
    key.write_bytes(server.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(AuthConfigError, match="chmod 600"):
        TlsConfig(server.cert, key).server_credentials()
    result = CliRunner().invoke(
        app,
        ["serve", "--index", str(index_dir), "--port", "0", "--tls-cert", str(server.cert), "--tls-key", str(key)],
    )
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_not_a_pem_file_is_refused(tmp_path: Path, pki) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("hello")
    with pytest.raises(AuthConfigError, match="not a PEM"):
        TlsConfig(bad, pki["server"].key).server_credentials()
    with pytest.raises(AuthConfigError, match="both"):
        channel_credentials(pki["ca"].cert_path, pki["client"].cert, None)


def test_cli_query_over_mutual_tls_with_a_token_file(mtls_server, pki, tmp_path: Path) -> None:
    srv, tokens, _ = mtls_server
    client = pki["client"]
    token_file = tmp_path / "token"
    token_file.write_text(tokens["researcher"] + "\n")
    token_file.chmod(0o600)
    args = [
        "query", "--server", srv.target, "--study-uid", "S-" + "0" * 24, "--json",
        "--tls-ca", str(pki["ca"].cert_path), "--tls-cert", str(client.cert), "--tls-key", str(client.key),
        "--token-file", str(token_file),
    ]
    result = CliRunner().invoke(app, args)
    # researchers may not query by study id: the call got through TLS and auth to the policy
    assert result.exit_code == 2, result.output
    assert "PERMISSION_DENIED" in result.output and "STUDY_QUERY_NOT_ALLOWED" in result.output


def test_raw_stub_over_tls(tls_server, pki) -> None:
    creds = channel_credentials(pki["ca"].cert_path)
    with grpc.secure_channel(tls_server.target, creds) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        assert stub.GetIndexInfo(cohortsim_pb2.GetIndexInfoRequest(), timeout=10).num_studies == 200


def test_metrics_with_the_apis_mutual_tls(index_dir: Path, pki) -> None:
    """metrics_tls: /metrics over HTTPS with the API's certificate; with a client CA, a
    scraper without a client certificate is refused; without TLS settings, refused to start."""
    import ssl
    import urllib.request

    from service.server import server_metrics

    server, client = pki["server"], pki["client"]
    tls = TlsConfig(server.cert, server.key, pki["ca"].cert_path)
    with BackgroundServer(
        index_dir, device="cpu", tls=tls, metrics_port=0, metrics_tls=True, watch_interval=None
    ) as srv:
        _, port = server_metrics(srv._server)  # type: ignore[arg-type]
        url = f"https://localhost:{port}/metrics"
        ctx = ssl.create_default_context(cafile=str(pki["ca"].cert_path))
        with pytest.raises(OSError):  # no client certificate
            urllib.request.urlopen(url, context=ctx, timeout=5).read()
        ctx.load_cert_chain(str(client.cert), str(client.key))
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            assert b"cohortsim_index_info" in r.read()
        with pytest.raises(OSError):  # plain HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    with pytest.raises(ValueError, match="metrics_tls needs"), BackgroundServer(
        index_dir, device="cpu", metrics_port=0, metrics_tls=True
    ):
        pass
