"""Who is calling and what they may do: bearer tokens, certificate subjects, roles, rights.

Token file (``cohortsim serve --auth-tokens FILE``): one JSON object; each key is a
credential, each value a role or ``{"role": ..., "id": ...}``::

    {
      "sha256$9f3c...$4b1e...":     {"role": "clinician",  "id": "ward7-app"},
      "dGhpcyBpcyBhIHRva2VuIGZvc": {"role": "researcher", "id": "study-42"},
      "cert:batch-node-1":          {"role": "admin",      "id": "rebuild-job"}
    }

- A key ``sha256$<salt hex>$<digest hex>`` is a salted hash of a token (digest =
  SHA-256(salt || token)); ``cohortsim auth token`` makes a random token and its entry.
  Any other key not starting with ``cert:`` is the token itself (at least
  :data:`MIN_TOKEN_LENGTH` characters). Tokens are random (256 bits from ``auth token``),
  so one salted SHA-256 suffices: there is nothing to guess; the salt stops one
  token's hash from matching another file's. Human-chosen passwords are not supported.
- A key ``cert:<common name>`` gives a role to a client that presents a certificate
  with that subject common name, verified against ``--tls-client-ca`` (mutual TLS).
- ``id`` names the principal in the audit record (default: ``tok-<8 hex of its hash>``
  or the common name); the token itself is never logged or recorded.

Clients send ``authorization: Bearer <token>``. No or an unknown token (and no mapped
certificate) -> UNAUTHENTICATED; a role without the method's right -> PERMISSION_DENIED.
A bearer token, when sent, decides the role even over a mapped certificate.

Roles and their rights (:data:`ROLE_RIGHTS`); methods and the right each needs
(:data:`METHOD_RIGHTS`; a method missing there is refused to everyone, and a test fails
when the proto gains an RPC without an entry):

- ``clinician``: search with neighbours' pseudonymous ids and outcomes, embed, index info.
- ``researcher``: search answered with aggregates only (``service.governance``), embed,
  index info.
- ``admin``: ingest, delete, reload, rebuild, index info; no patient data.
- ``service``: health and metrics only.

Health (``grpc.health.v1.Health``) needs no token, so probes keep working; reflection
needs any valid credential.

Secret files (the token file, TLS private keys) that group or others can read are refused
(:func:`read_secret_file`), like the site secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.owner_only import read_owner_only

ROLES = ("clinician", "researcher", "admin", "service")

#: What each role may do. ``identities``: answers that name patients (pseudonyms) and their
#: individual outcomes; without it a search is answered with governed aggregates only.
ROLE_RIGHTS: dict[str, frozenset[str]] = {
    "clinician": frozenset({"search", "identities", "embed", "index_info", "cohort_stats"}),
    # cohort_stats: answered through Governance.cohort_stats (small cells withheld)
    "researcher": frozenset({"search", "embed", "index_info", "cohort_stats"}),
    "admin": frozenset({"index_info", "ingest", "delete", "reload", "rebuild"}),
    "service": frozenset({"health", "metrics"}),
}

#: No credential needed (probes).
PUBLIC = "public"
#: Any valid credential, whatever its role.
AUTHENTICATED = "authenticated"

_SVC = "/cohortsim.v1.PatientSimilarityService/"

#: gRPC method -> the right it needs. Methods not listed are refused (PERMISSION_DENIED).
#: Entries for RPCs not (yet) in the proto are harmless and make their arrival safe.
METHOD_RIGHTS: dict[str, str] = {
    _SVC + "SearchSimilar": "search",
    _SVC + "SearchSimilarStream": "search",
    _SVC + "EmbedStudy": "embed",
    _SVC + "GetIndexInfo": "index_info",
    _SVC + "GetPatient": "identities",
    _SVC + "ListStudies": "identities",
    # researchers get cohort statistics under service.governance.COHORT_STATS_RULES
    _SVC + "GetCohortStats": "cohort_stats",
    _SVC + "IngestStudies": "ingest",
    _SVC + "DeletePatient": "delete",
    _SVC + "ReloadIndex": "reload",
    # a federated site's neighbours carry pseudonyms and outcomes: a coordinator needs a
    # clinician's credential (token or mutual-TLS certificate) at each site
    _SVC + "SearchSite": "identities",
    # counts only, suppressed at the site (min cell) before they leave
    _SVC + "AggregateSite": "search",
    _SVC + "RebuildIndex": "rebuild",
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": AUTHENTICATED,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": AUTHENTICATED,
}

MIN_TOKEN_LENGTH = 24
HASH_SCHEME = "sha256"
CERT_PREFIX = "cert:"
SALT_BYTES = 16


class AuthConfigError(ValueError):
    """A token file, key or certificate that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``id``: the token id or certificate common name (goes into the audit record);
    ``via``: ``"token"``, ``"certificate"`` or ``"none"`` (no authentication configured);
    ``certificate``: the verified client certificate's common name, when one was shown.
    """

    id: str
    role: str
    via: str
    certificate: str | None = None

    def has(self, right: str) -> bool:
        return right in ROLE_RIGHTS.get(self.role, frozenset())


# --------------------------------------------------------------------------- secret files


def read_secret_file(path: Path | str, what: str) -> bytes:
    """The bytes of a secret file that only its owner can read, else :class:`AuthConfigError`."""
    try:
        return read_owner_only(path, what)
    except PermissionError as exc:
        raise AuthConfigError(str(exc)) from None


# --------------------------------------------------------------------------- tokens


def hash_token(token: str, *, salt: bytes | None = None) -> str:
    """The token-file key for ``token``: ``sha256$<salt hex>$<digest hex>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.sha256(salt + token.encode("utf-8")).hexdigest()
    return f"{HASH_SCHEME}${salt.hex()}${digest}"


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _default_id(material: str) -> str:
    return "tok-" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True)
class _Entry:
    role: str
    id: str
    plain: bytes | None = None  # the token (plain entries)
    salt: bytes | None = None  # salted-hash entries
    digest: bytes | None = None


class TokenStore:
    """Credentials from a token file; :meth:`authenticate` maps a bearer token to a principal."""

    def __init__(self, entries: list[_Entry], certificates: Mapping[str, tuple[str, str]]) -> None:
        self._entries = entries
        self._certificates = dict(certificates)

    def __len__(self) -> int:
        return len(self._entries) + len(self._certificates)

    @classmethod
    def load(cls, path: Path | str) -> TokenStore:
        """Read and check a token file (owner-only permissions, JSON object, known roles)."""
        raw = read_secret_file(path, "token file")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AuthConfigError(f"token file {path} is not valid JSON: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "token mapping") -> TokenStore:
        """Build from the parsed JSON (see the module docstring for the format)."""
        if not isinstance(data, dict) or not data:
            raise AuthConfigError(
                f"{source} must be a non-empty JSON object mapping tokens to roles"
            )
        entries: list[_Entry] = []
        certificates: dict[str, tuple[str, str]] = {}
        ids: set[str] = set()
        for n, (key, value) in enumerate(data.items(), start=1):
            where = f"{source}, entry {n}"  # never echo the key: it may be a token
            if not isinstance(key, str) or not key.strip():
                raise AuthConfigError(f"{where}: the key must be a non-empty string")
            role, given_id = _parse_value(value, where)
            if key.startswith(CERT_PREFIX):
                cn = key[len(CERT_PREFIX) :].strip()
                if not cn:
                    raise AuthConfigError(f"{where}: 'cert:' must be followed by a common name")
                entry_id = given_id or cn
                certificates[cn] = (role, entry_id)
            elif key.startswith(HASH_SCHEME + "$"):
                salt, digest = _parse_hash(key, where)
                entry_id = given_id or _default_id(key)
                entries.append(_Entry(role, entry_id, salt=salt, digest=digest))
            else:
                if len(key) < MIN_TOKEN_LENGTH:
                    raise AuthConfigError(
                        f"{where}: the token has {len(key)} characters; use at least "
                        f"{MIN_TOKEN_LENGTH} (make one with `cohortsim auth token`)"
                    )
                entry_id = given_id or _default_id(hash_token(key, salt=b""))
                entries.append(_Entry(role, entry_id, plain=key.encode("utf-8")))
            if entry_id in ids:
                raise AuthConfigError(f"{where}: the id {entry_id!r} is used twice")
            ids.add(entry_id)
        return cls(entries, certificates)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a bearer token, or None (every entry is compared, in constant time)."""
        given = token.encode("utf-8")
        found: _Entry | None = None
        for e in self._entries:
            if e.plain is not None:
                ok = hmac.compare_digest(given, e.plain)
            else:
                assert e.salt is not None and e.digest is not None  # set by from_mapping
                ok = hmac.compare_digest(hashlib.sha256(e.salt + given).digest(), e.digest)
            if ok and found is None:
                found = e
        return None if found is None else Principal(found.id, found.role, "token")

    def certificate_principal(self, common_name: str) -> Principal | None:
        """The principal mapped to a verified client certificate's common name, or None."""
        hit = self._certificates.get(common_name)
        if hit is None:
            return None
        return Principal(hit[1], hit[0], "certificate", certificate=common_name)


def _parse_value(value: Any, where: str) -> tuple[str, str | None]:
    role: Any
    given_id: Any
    if isinstance(value, str):
        role, given_id = value, None
    elif isinstance(value, dict):
        unknown = set(value) - {"role", "id"}
        if unknown:
            raise AuthConfigError(f"{where}: unknown keys {sorted(unknown)}; use role and id")
        role, given_id = value.get("role"), value.get("id")
        if given_id is not None and (not isinstance(given_id, str) or not given_id.strip()):
            raise AuthConfigError(f"{where}: id must be a non-empty string")
    else:
        raise AuthConfigError(f"{where}: the value must be a role or {{\"role\": ..., \"id\": ...}}")
    if role not in ROLES:
        raise AuthConfigError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
    return str(role), (given_id.strip() if isinstance(given_id, str) else None)


def _parse_hash(key: str, where: str) -> tuple[bytes, bytes]:
    parts = key.split("$")
    try:
        if len(parts) != 3:
            raise ValueError
        salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        raise AuthConfigError(
            f"{where}: a hashed token must read sha256$<salt hex>$<64 hex digits>"
        ) from None
    if len(digest) != 32 or not salt:
        raise AuthConfigError(f"{where}: a hashed token must read sha256$<salt hex>$<64 hex digits>")
    return salt, digest


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header in call metadata, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, rest = text.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
        return ""  # present but malformed: counts as a wrong token
    return None


def token_file_entry(token: str, role: str, id: str | None = None) -> dict[str, Any]:
    """The token-file entry (salted hash -> role and id) for a token."""
    if role not in ROLES:
        raise AuthConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    value: dict[str, Any] = {"role": role}
    if id:
        value["id"] = id
    return {hash_token(token): value}


def write_private_file(path: Path | str, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


__all__ = [
    "AUTHENTICATED",
    "METHOD_RIGHTS",
    "PUBLIC",
    "ROLES",
    "ROLE_RIGHTS",
    "AuthConfigError",
    "Principal",
    "TokenStore",
    "bearer_token",
    "hash_token",
    "new_token",
    "read_secret_file",
    "token_file_entry",
    "write_private_file",
]
