"""What the interceptors and the servicer share about one call, and the handler wrapper.

Each interceptor wraps the method handler (all four streaming kinds) with a
:class:`CallGuard`: ``enter`` runs before the method and may abort the call; ``exit``
runs after it with the response or the exception, and may still abort a call that
succeeded (the audit interceptor does when it cannot write its record). The guards run
inside the call's own task, so the :class:`CallInfo` they keep in a context variable is
the call's own.
"""

from __future__ import annotations

import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from service.auth import Principal

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
REQUEST_ID_KEY = "x-request-id"


@dataclass
class CallInfo:
    """One call: its method, request id, peer, caller and facts for the audit record."""

    method: str
    request_id: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    #: the verified client certificate's common name, when one was shown
    certificate: str | None = None
    #: why authentication failed (for the audit record), e.g. "invalid_token"
    auth_failure: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    context: Any = field(default=None, repr=False, compare=False)


_CURRENT: ContextVar[CallInfo | None] = ContextVar("cohortsim_call", default=None)


def current_call() -> CallInfo | None:
    """The call being served on this task (None outside a call or without interceptors)."""
    return _CURRENT.get()


def current_principal() -> Principal | None:
    """The authenticated caller (None when authentication is not configured)."""
    call = _CURRENT.get()
    return call.principal if call is not None else None


def add_facts(**facts: Any) -> None:
    """Add facts to the current call's audit record (no-op outside an audited call)."""
    call = _CURRENT.get()
    if call is not None:
        call.facts.update(facts)


def _request_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == REQUEST_ID_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex[:16]


def begin_call(method: str, context: Any) -> CallInfo:
    """The :class:`CallInfo` of this call, created by the outermost interceptor."""
    current = _CURRENT.get()
    if current is not None and current.context is context:
        return current
    try:
        peer = str(context.peer() or "")
    except Exception:
        peer = ""
    info = CallInfo(method=method, request_id=_request_id(context), peer=peer, context=context)
    _CURRENT.set(info)
    return info


class CallGuard(Protocol):
    async def enter(self, call: CallInfo, request: Any, context: Any) -> None: ...

    async def exit(
        self,
        call: CallInfo,
        request: Any,
        response: Any,
        error: BaseException | None,
        context: Any,
    ) -> None: ...


async def _resolve(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def wrap_handler(
    handler: grpc.RpcMethodHandler | None, method: str, guard: CallGuard
) -> grpc.RpcMethodHandler | None:
    """``handler`` with ``guard`` around its behaviour (None stays None: unknown method)."""
    if handler is None:
        return None
    opts = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def unary(inner: Callable[..., Any], streaming_request: bool) -> Callable[..., Awaitable[Any]]:
        async def behaviour(request: Any, context: Any) -> Any:
            call = begin_call(method, context)
            seen = None if streaming_request else request
            await guard.enter(call, seen, context)
            try:
                response = await _resolve(inner(request, context))
            except BaseException as exc:
                await guard.exit(call, seen, None, exc, context)
                raise
            await guard.exit(call, seen, response, None, context)
            return response

        return behaviour

    def streaming(inner: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
        async def behaviour(request: Any, context: Any) -> AsyncIterator[Any]:
            call = begin_call(method, context)
            seen = None if streaming_request else request
            await guard.enter(call, seen, context)
            error: BaseException | None = None
            try:
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    await _resolve(result)
            except BaseException as exc:
                error = exc
                raise
            finally:
                await guard.exit(call, seen, None, error, context)

        return behaviour

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **opts)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **opts)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream, False), **opts)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, True), **opts)


def status_of(error: BaseException | None, context: Any) -> str:
    """The status code name a call ended with."""
    if error is None:
        code = _code(context)
        return code.name if code is not None else "OK"
    if isinstance(error, grpc.aio.AbortError):
        code = _code(context)
        return code.name if code is not None else "UNKNOWN"
    if type(error).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


def _code(context: Any) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return None



_WRAPPED_KEPT = 256  # methods whose wrapped handler an interceptor keeps (a server has ~20)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs ``self._guard`` (the :class:`CallGuard` that the
    subclass passes to ``__init__``) around every method handler via :func:`wrap_handler`."""

    def __init__(self, guard: CallGuard) -> None:
        self._guard = guard
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED
        method = handler_call_details.method
        # The registered handler of a method is one object for the server's life, so its
        # wrapped form is built once, not on every call.
        # The entry keeps the handler it wrapped: an identity check, never a stale match.
        wrapped = self._wrapped
        hit = wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        guarded = wrap_handler(handler, method, self._guard)
        if method in wrapped or len(wrapped) < _WRAPPED_KEPT:
            wrapped[method] = (handler, guarded)
        return guarded


__all__ = [
    "REQUEST_ID_KEY",
    "CallGuard",
    "CallInfo",
    "GuardInterceptor",
    "add_facts",
    "begin_call",
    "current_call",
    "current_principal",
    "status_of",
    "wrap_handler",
]
