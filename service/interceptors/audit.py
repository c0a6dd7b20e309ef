"""One audit record per call, written before the answer leaves (fail closed).

The record (see :mod:`service.audit` for the chaining) holds: ``time``, ``request_id``,
``peer``, ``principal`` (token id, or the client certificate's common name, or
``anonymous``), ``auth`` (token / certificate / none), ``certificate``, ``role``,
``method``, ``query_kind``, ``k``, ``filter``, ``query_study`` (a study_uid query),
``dicom_files`` (how many files were uploaded: never their content), ``patients`` and
``studies`` (the pseudonyms the answer returned), ``status`` and ``reason`` (the
ErrorInfo reason of a failure), ``duration_ms``, and what the servicer added for the
call: for researchers ``aggregated_patients`` (the patients an aggregate covered),
``reid_matches_removed`` and ``withheld_fields``.

Text taken from the request (the filter, a queried pseudonym) is bounded: beyond
:data:`MAX_TEXT` characters the record keeps a prefix, the full length and the SHA-256
of the whole (``filter_sha256``, ``filter_chars``), so a huge request cannot write a
huge line, and the hash still identifies what was sent.

If the record cannot be written, a call that succeeded fails with UNAVAILABLE
(``AUDIT_UNAVAILABLE``) instead of being answered. Health checks are not recorded
(probes would flood the log; they carry no data).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import grpc

from service.audit import AuditError, AuditLog
from service.auth import METHOD_RIGHTS, PUBLIC
from service.errors import ServiceError, abort, reason_from_trailing
from service.interceptors.call import CallInfo, GuardInterceptor, status_of

log = logging.getLogger(__name__)

_ID_FIELDS = ("patient_id", "study_uid")
MAX_TEXT = 256  # characters of request text kept in a record


def bounded(name: str, text: str, limit: int = MAX_TEXT) -> dict[str, Any]:
    """``{name: text}``, or a prefix of it with its length and SHA-256 when it is longer
    than ``limit`` characters."""
    if len(text) <= limit:
        return {name: text}
    return {
        name: text[:limit],
        f"{name}_chars": len(text),
        f"{name}_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
    }


def _reason(context: Any) -> str | None:
    try:
        trailing = context.trailing_metadata()
    except Exception:
        return None
    return reason_from_trailing(trailing)


def describe_request(request: Any) -> dict[str, Any]:
    """Query kind, k, filter and queried pseudonyms of a request (never DICOM content)."""
    out: dict[str, Any] = {}
    if request is None or not hasattr(request, "DESCRIPTOR"):
        return out
    fields = request.DESCRIPTOR.fields_by_name
    if "query" in request.DESCRIPTOR.oneofs_by_name:
        kind = request.WhichOneof("query")
        out["query_kind"] = kind
        if kind == "study_uid":
            out.update(bounded("query_study", request.study_uid))
        elif kind == "dicom":
            out["dicom_files"] = len(request.dicom.files)
    elif "dicom" in fields and request.HasField("dicom"):
        out["dicom_files"] = len(request.dicom.files)
    if "k" in fields:
        out["k"] = int(request.k)
    if "filter" in fields and request.HasField("filter"):
        out.update(bounded("filter", request.filter.where))
    for name in _ID_FIELDS:
        if name in fields and "query" not in request.DESCRIPTOR.oneofs_by_name:
            value = getattr(request, name)
            if isinstance(value, str) and value:
                out.update(bounded("query_" + name.split("_")[0], value))
    return out


def returned_pseudonyms(response: Any) -> dict[str, list[str]]:
    """Every ``patient_id`` and ``study_uid`` anywhere in a response, in order, deduplicated."""
    found: dict[str, dict[str, None]] = {name: {} for name in _ID_FIELDS}

    def walk(msg: Any) -> None:
        for fd, value in msg.ListFields():
            if fd.name in found and isinstance(value, str):
                found[fd.name][value] = None
            elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
                for item in value if fd.is_repeated else [value]:
                    walk(item)

    if response is not None and hasattr(response, "ListFields"):
        walk(response)
    return {
        "patients": list(found["patient_id"]),
        "studies": list(found["study_uid"]),
    }


class _AuditGuard:
    def __init__(self, audit: AuditLog, *, include_health: bool = False) -> None:
        self.audit = audit
        self.include_health = include_health

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        return None

    def _record(
        self, call: CallInfo, request: Any, response: Any, status: str, context: Any
    ) -> dict[str, Any]:
        p = call.principal
        record: dict[str, Any] = {
            "request_id": call.request_id,
            "peer": call.peer,
            "principal": p.id if p is not None else (call.certificate or "anonymous"),
            "auth": p.via if p is not None else "none",
            "role": p.role if p is not None else None,
            "method": call.method,
            "status": status,
            "duration_ms": round((time.monotonic() - call.started) * 1000.0, 2),
        }
        if call.certificate:
            record["certificate"] = call.certificate
        if call.auth_failure:
            record["auth_failure"] = call.auth_failure
        if status != "OK":
            record["reason"] = _reason(context)
        record.update(describe_request(request))
        if status == "OK":
            record.update(returned_pseudonyms(response))
        record.update({k: v for k, v in call.facts.items() if not k.startswith("_")})
        return record

    async def exit(
        self, call: CallInfo, request: Any, response: Any, error: BaseException | None, context: Any
    ) -> None:
        if not self.include_health and METHOD_RIGHTS.get(call.method) == PUBLIC:
            return
        status = status_of(error, context)
        record = self._record(call, request, response, status, context)
        try:
            await asyncio.wrap_future(self.audit.submit(record))
        except AuditError as exc:
            log.error("audit record not written (%s); the call is failed", exc)
            if error is None:
                await abort(
                    context,
                    ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        "AUDIT_UNAVAILABLE",
                        "the access record could not be written, so the answer was withheld; "
                        "tell the server's operator",
                    ),
                )


class AuditInterceptor(GuardInterceptor):
    """Writes one chained audit record per call to an :class:`AuditLog`."""

    def __init__(self, audit: AuditLog, *, include_health: bool = False) -> None:
        self.audit = audit
        super().__init__(_AuditGuard(audit, include_health=include_health))


__all__ = ["MAX_TEXT", "AuditInterceptor", "bounded", "describe_request", "returned_pseudonyms"]
