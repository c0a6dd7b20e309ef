"""Domain exceptions -> gRPC status, in one place.

Every error a client sees has the most specific canonical status code, a short message
that says what to do, and a ``google.rpc.ErrorInfo`` detail (domain ``cohortsim.v1``,
an UPPER_SNAKE_CASE ``reason``) in the ``grpc-status-details-bin`` trailer, so programs
can branch on the reason without parsing text. Unexpected exceptions become INTERNAL with
a generic message and a reference id; the log gets the exception type, the reference and
the stack frames, never the exception text or request contents (they may carry ids).
"""

from __future__ import annotations

import functools
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from encoders.errors import DicomError, EncoderError, EncoderOutOfMemoryError
from indexing.errors import (
    DimensionError,
    FilterError,
    ModelVersionError,
    QueryError,
    SnapshotError,
    StoreError,
    UnknownStudyError,
)

log = logging.getLogger(__name__)

DOMAIN = "cohortsim.v1"


class ServiceError(Exception):
    """An error raised by the service layer itself (request validation, server state).

    ``reason`` is a stable UPPER_SNAKE_CASE code for programs; ``message`` is for people.
    ``metadata`` holds small non-identifying facts (e.g. ``{"expected": "128"}``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})


def invalid_argument(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def failed_precondition(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata)


def unavailable(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, metadata)


def _reason_code(exc: BaseException, default: str) -> str:
    """An exception's own ``.reason`` (snake_case or UPPER) as UPPER_SNAKE_CASE, else default."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.strip().upper().replace("-", "_").replace(" ", "_")
    return default


def _message(exc: BaseException, fallback: str) -> str:
    text = str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)
    text = " ".join(text.split())  # one line
    return text or fallback


def classify(exc: BaseException) -> ServiceError:
    """Map any exception to the status, reason and message the client should get."""
    if isinstance(exc, ServiceError):
        return exc
    arg = grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, DicomError):
        reason = "DICOM_" + _reason_code(exc, "INVALID")
        # the decode budget's "server busy" (encoders.budget) is worth a retry
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if getattr(exc, "retryable", False) else arg
        return ServiceError(code, reason, _message(exc, "the DICOM study cannot be used"))
    if isinstance(exc, DimensionError):
        return ServiceError(
            arg,
            _reason_code(exc, "WRONG_DIMENSION"),
            _message(exc, "the embedding has the wrong dimension"),
        )
    if isinstance(exc, FilterError):
        return ServiceError(
            arg, _reason_code(exc, "INVALID_FILTER"), _message(exc, "invalid filter")
        )
    if isinstance(exc, QueryError):
        return ServiceError(arg, _reason_code(exc, "INVALID_QUERY"), _message(exc, "invalid query"))
    if isinstance(exc, UnknownStudyError):
        return ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_STUDY",
            _message(exc, "the study is not in the served index"),
        )
    if isinstance(exc, ModelVersionError):
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "MODEL_VERSION_MISMATCH",
            _message(exc, "the query comes from another model version than the index"),
        )
    if isinstance(exc, EncoderOutOfMemoryError):
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OUT_OF_MEMORY",
            "the server ran out of memory embedding the study; retry later or send an "
            "embedding instead of DICOM",
        )
    if isinstance(exc, EncoderError):
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "ENCODER_UNUSABLE",
            "the index's encoder cannot be loaded on this server; rebuild the index with a "
            "valid encoder, or send an embedding instead of DICOM",
        )
    if isinstance(exc, SnapshotError | StoreError):
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "INDEX_UNAVAILABLE",
            _message(exc, "no index is loaded"),
        )
    ref = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ else ""
    log.error("internal error ref=%s type=%s\n%s", ref, type(exc).__name__, frames)
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        f"internal server error (ref {ref}); the server log has the details",
        {"ref": ref},
    )


def to_status(error: ServiceError) -> grpc.Status:
    """A ``grpc.Status`` with code, message and the ErrorInfo detail in the trailer."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Terminate the RPC with the status that ``exc`` maps to (always raises)."""
    error = classify(exc)
    if error.code != grpc.StatusCode.INTERNAL:
        log.info("rpc failed code=%s reason=%s", error.code.name, error.reason)
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def grpc_errors(fn: Handler[Request, Response]) -> Handler[Request, Response]:
    """Decorator for async servicer methods: any exception becomes its mapped status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise  # context.abort() was already called
        except Exception as exc:
            await abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from None

    return wrapper



STATUS_DETAILS_KEY = "grpc-status-details-bin"


def reason_from_trailing(trailing: Any) -> str | None:
    """The ``google.rpc.ErrorInfo`` reason carried in a call's trailing metadata (the
    ``grpc-status-details-bin`` entry), or None when there is none or it is unreadable."""
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason or None
    return None

__all__ = [
    "DOMAIN",
    "STATUS_DETAILS_KEY",
    "ServiceError",
    "abort",
    "classify",
    "failed_precondition",
    "grpc_errors",
    "invalid_argument",
    "reason_from_trailing",
    "to_status",
    "unavailable",
]
