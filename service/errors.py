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

from encoders.errors import CohortsimError
from service.status_details import (
    DOMAIN,
    STATUS_DETAILS_KEY,
    reason_from_trailing,
    retry_delay_from_trailing,
)

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error raised by the service layer itself (request validation, server state).

    ``reason`` is a stable UPPER_SNAKE_CASE code for programs; ``message`` is for people.
    ``metadata`` holds small non-identifying facts (e.g. ``{"expected": "128"}``).
    ``retry_after`` (seconds) is sent as a ``google.rpc.RetryInfo`` detail: when a
    RESOURCE_EXHAUSTED call may be retried.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after


def invalid_argument(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def failed_precondition(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata)


def unavailable(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, metadata)


def classify(exc: BaseException) -> ServiceError:
    """Map any exception to the status, reason and message the client should get.

    The project's typed errors (:class:`encoders.errors.CohortsimError`) carry their
    status, reason and public message as class attributes; anything else is INTERNAL.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, CohortsimError):
        return ServiceError(
            grpc.StatusCode[exc.status],
            exc.reason_code,
            exc.public_message if exc.public_message is not None else exc.message,
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
    """A ``grpc.Status`` with code, message and the ErrorInfo detail in the trailer (and a
    RetryInfo detail when the error says when to retry)."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(0, round(error.retry_after * 1e9)))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
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
    "retry_delay_from_trailing",
    "to_status",
    "unavailable",
]
