"""Calls per second and concurrent calls, per principal -> RESOURCE_EXHAUSTED with a reason.

A token bucket per principal (``rate`` calls/s, bursts of ``burst``) and a cap on the
calls one principal may have in flight. The key is the principal's id, or the peer
address when the server runs without authentication. With ``by_peer`` the key is always
the peer host: the server puts such a limiter *before* authentication, so callers
without (valid) credentials are held to the rate too. Health checks are not limited.
Request size (``--max-receive-mb``), files per upload and k are limited where the request
is read (gRPC itself and ``service.convert``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc

from service.auth import METHOD_RIGHTS, PUBLIC
from service.errors import ServiceError, abort
from service.interceptors.call import CallInfo, GuardInterceptor

MAX_TRACKED = 10_000


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4`` (one bucket per host, not per connection)."""
    head, sep, _ = peer.rpartition(":")
    return head if sep and head else peer


class _LimitGuard:
    def __init__(
        self, rate: float | None, burst: int | None, max_concurrent: int | None, by_peer: bool = False
    ) -> None:
        self.by_peer = by_peer
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1.0, 2.0 * (rate or 1.0)))
        self.max_concurrent = max_concurrent
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self._slot = "_peer_limit_key" if by_peer else "_limit_key"  # one per limiter

    def _key(self, call: CallInfo) -> str:
        if call.principal is None or self.by_peer:
            return _peer_host(call.peer)
        return call.principal.id

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        if METHOD_RIGHTS.get(call.method) == PUBLIC:
            return
        key = self._key(call)
        now = time.monotonic()
        error: ServiceError | None = None
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(self.burst, now)
                while len(self._buckets) > MAX_TRACKED:
                    oldest, ob = next(iter(self._buckets.items()))
                    if ob.in_flight:
                        break
                    self._buckets.pop(oldest)
            self._buckets.move_to_end(key)
            if self.rate is not None:
                b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
                b.stamp = now
                if b.tokens < 1.0:
                    wait = (1.0 - b.tokens) / self.rate
                    error = ServiceError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "RATE_LIMITED",
                        f"more than {self.rate:g} calls per second from this caller; retry in "
                        f"{math.ceil(wait * 1000)} ms",
                        retry_after=wait,  # sent as google.rpc.RetryInfo
                    )
            if (
                error is None
                and self.max_concurrent is not None
                and b.in_flight >= self.max_concurrent
            ):
                error = ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TOO_MANY_CONCURRENT_CALLS",
                    f"this caller already has {b.in_flight} calls in flight, the limit; wait "
                    "for one to finish",
                    {"limit": str(self.max_concurrent)},
                )
            if error is None:
                if self.rate is not None:
                    b.tokens -= 1.0
                b.in_flight += 1
                call.facts[self._slot] = key
        if error is not None:
            await abort(context, error)

    async def exit(
        self, call: CallInfo, request: Any, response: Any, error: BaseException | None, context: Any
    ) -> None:
        key = call.facts.pop(self._slot, None)
        if key is None:
            return
        with self._lock:
            b = self._buckets.get(key)
            if b is not None and b.in_flight > 0:
                b.in_flight -= 1


class RateLimitInterceptor(GuardInterceptor):
    """``rate`` calls/s (bursts of ``burst``) and ``max_concurrent`` calls per principal
    (per peer host with ``by_peer``)."""

    def __init__(
        self,
        *,
        rate: float | None = None,
        burst: int | None = None,
        max_concurrent: int | None = None,
        by_peer: bool = False,
    ) -> None:
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be > 0 calls per second, got {rate}")
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        super().__init__(_LimitGuard(rate, burst, max_concurrent, by_peer))


__all__ = ["RateLimitInterceptor"]
