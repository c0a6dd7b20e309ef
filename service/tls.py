"""TLS and mutual TLS for the server and the client.

Server: ``TlsConfig(cert, key, client_ca)``; with a ``client_ca`` every client must show a
certificate signed by it (mutual TLS), otherwise the handshake fails. With TLS
configured the server listens on a TLS port only, so plain-text connections fail. The
private key must be readable by its owner only (:func:`service.auth.read_secret_file`).

Client: :func:`channel_credentials` (the CA that signed the server's certificate, and
for mutual TLS the client's own certificate and key).

The verified client certificate's subject common name becomes the principal's
``certificate`` (and the audit record's principal when no token is sent); see
:func:`peer_common_name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.auth import AuthConfigError, read_secret_file

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


def _read_pem(path: Path | str, what: str, mark: bytes) -> bytes:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the {what} {file}: {exc.strerror or exc}") from None
    if mark not in data:
        raise AuthConfigError(f"the {what} {file} is not a PEM file (no {mark.decode()} block)")
    return data


def _read_key(path: Path | str, what: str) -> bytes:
    data = read_secret_file(path, what)
    if _KEY_MARK not in data:
        raise AuthConfigError(f"the {what} {path} is not a PEM private key")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS: certificate chain and key (PEM); ``client_ca`` turns on mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read and check the files; :class:`AuthConfigError` names the file at fault."""
        chain = _read_pem(self.cert, "TLS certificate", _CERT_MARK)
        key = _read_key(self.key, "TLS private key")
        roots = None
        if self.client_ca is not None:
            roots = _read_pem(self.client_ca, "TLS client CA", _CERT_MARK)
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=roots, require_client_auth=roots is not None
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def channel_credentials(
    ca: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: ``ca`` verifies the server (None: the system's roots);
    ``cert`` and ``key`` (both or neither) identify the client for mutual TLS."""
    if (cert is None) != (key is None):
        raise AuthConfigError("give both the client certificate and its key, or neither")
    roots = _read_pem(ca, "TLS CA certificate", _CERT_MARK) if ca is not None else None
    chain = _read_pem(cert, "client certificate", _CERT_MARK) if cert is not None else None
    private = _read_key(key, "client private key") if key is not None else None
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=private, certificate_chain=chain
    )


def peer_common_name(context: Any) -> str | None:
    """The subject common name of the client certificate verified on this call, or None.

    Only certificates the TLS layer verified against the client CA reach here.
    """
    try:
        auth = context.auth_context()
    except Exception:
        return None
    if not auth or "x509_common_name" not in auth:
        return None
    values = auth.get("x509_common_name") or []
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


__all__ = ["TlsConfig", "channel_credentials", "peer_common_name"]
