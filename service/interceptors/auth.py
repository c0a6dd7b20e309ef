"""Authentication and authorisation of every call (see :mod:`service.auth`).

UNAUTHENTICATED (``MISSING_CREDENTIALS`` / ``INVALID_TOKEN``) when the caller shows no
valid bearer token and no mapped client certificate; PERMISSION_DENIED
(``ROLE_NOT_ALLOWED``, ``METHOD_NOT_ALLOWED``) when the role lacks the method's right.
Health checks pass without credentials. Messages never repeat the token.

After the method, an answer to a caller without the ``identities`` right that names a
patient or study anywhere, or that has a ``disclosure_control`` field left unset (the
researcher view was skipped), is withheld (PERMISSION_DENIED ``IDENTITIES_WITHHELD``):
a safety net under ``service.governance`` for code paths added later.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc

from service.auth import AUTHENTICATED, METHOD_RIGHTS, PUBLIC, TokenStore, bearer_token
from service.errors import ServiceError, abort
from service.interceptors.call import CallInfo, GuardInterceptor
from service.tls import peer_common_name

log = logging.getLogger(__name__)


def _names_anyone(msg: Any) -> bool:
    """True when a ``patient_id`` or ``study_uid`` is set anywhere in ``msg``."""
    if not hasattr(msg, "ListFields"):
        return False
    for fd, value in msg.ListFields():
        if fd.name in ("patient_id", "study_uid") and value:
            return True
        nested = fd.message_type is not None and not fd.message_type.GetOptions().map_entry
        if nested and any(_names_anyone(v) for v in (value if fd.is_repeated else [value])):
            return True
    return False


def _ungoverned(msg: Any) -> bool:
    """A response type with a ``disclosure_control`` field that the researcher view did not
    fill (e.g. a new code path that bypasses it)."""
    fields = getattr(getattr(msg, "DESCRIPTOR", None), "fields_by_name", {})
    return "disclosure_control" in fields and not msg.HasField("disclosure_control")


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


class _AuthGuard:
    def __init__(self, tokens: TokenStore, rights: dict[str, str]) -> None:
        self.tokens = tokens
        self.rights = rights

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        right = self.rights.get(call.method)
        if right == PUBLIC:
            return
        token = bearer_token(context.invocation_metadata())
        cn = peer_common_name(context)
        call.certificate = cn
        principal = None
        if token is not None:
            principal = self.tokens.authenticate(token)
            if principal is None:
                call.auth_failure = "invalid_token"
                await abort(
                    context,
                    ServiceError(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "INVALID_TOKEN",
                        "the bearer token is not valid on this server; check the token you "
                        "were given (sent as 'authorization: Bearer <token>')",
                    ),
                )
            assert principal is not None  # abort raised otherwise
            if cn is not None:
                principal = dataclasses.replace(principal, certificate=cn)
        elif cn is not None:
            principal = self.tokens.certificate_principal(cn)
        if principal is None:
            call.auth_failure = "missing_credentials"
            await abort(
                context,
                ServiceError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "MISSING_CREDENTIALS",
                    "this server needs credentials: send 'authorization: Bearer <token>' "
                    "(cohortsim query --token-file FILE)",
                ),
            )
        assert principal is not None
        call.principal = principal
        if right is None:
            await abort(
                context,
                ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "METHOD_NOT_ALLOWED",
                    f"no role may call {_short(call.method)} on this server",
                ),
            )
            return
        if right == AUTHENTICATED or principal.has(right):
            return
        await abort(
            context,
            ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "ROLE_NOT_ALLOWED",
                f"the role {principal.role} may not call {_short(call.method)} (it needs the "
                f"right '{right}'); ask the operator for a credential with that right",
                {"role": principal.role, "right": right},
            ),
        )

    async def exit(
        self, call: CallInfo, request: Any, response: Any, error: BaseException | None, context: Any
    ) -> None:
        """Last check for callers without the ``identities`` right: an answer that names a
        patient or study, or skipped the researcher view, is not sent (fail closed)."""
        p = call.principal
        if error is not None or response is None or p is None or p.has("identities"):
            return
        if _names_anyone(response) or _ungoverned(response):
            log.error("withheld an ungoverned answer to %s (role %s)", _short(call.method), p.role)
            await abort(
                context,
                ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "IDENTITIES_WITHHELD",
                    f"this answer would name patients, which the role {p.role} may not see; "
                    "it was withheld",
                ),
            )


class AuthInterceptor(GuardInterceptor):
    """Checks credentials and rights before any method runs."""

    def __init__(self, tokens: TokenStore, *, rights: dict[str, str] | None = None) -> None:
        super().__init__(_AuthGuard(tokens, dict(METHOD_RIGHTS if rights is None else rights)))


__all__ = ["AuthInterceptor"]
