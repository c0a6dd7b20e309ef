"""Prometheus metrics of the server, on their own port (``cohortsim serve --metrics-port``).

Why ``prometheus_client``: it is the reference implementation of the exposition format
every scraper reads, pure Python, and serves ``/metrics`` from its own daemon thread, so
a scrape never waits on (or blocks) the gRPC event loop.

Metrics (one :class:`ServerMetrics` per server, in its own registry):

* ``cohortsim_rpc_duration_seconds{method, code}`` - latency histogram per method and
  final status code; ``cohortsim_rpc_in_flight{method}`` - calls in progress;
* ``cohortsim_batch_size`` / ``cohortsim_batch_wait_seconds`` - searches per batched
  index call and how long the first of them waited; ``cohortsim_batch_queue_depth`` -
  searches waiting now;
* ``cohortsim_index_info{index_version, model_version}`` = 1 and
  ``cohortsim_index_studies`` - the served snapshot;
* ``process_*`` (CPU seconds, resident memory, open files) and, when torch has CUDA
  loaded, ``cohortsim_gpu_memory_bytes``.

The :class:`MetricsInterceptor` also writes one structured access-log line per call
(``service.logs``): method, status, duration and request id; never request contents.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from service.interceptors.call import CallInfo, GuardInterceptor, status_of

log = logging.getLogger("cohortsim.access")

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metric families of one server (its own registry, so servers do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_duration = Histogram(
            "cohortsim_rpc_duration_seconds",
            "Duration of gRPC calls by method and final status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cohortsim_rpc_in_flight", "gRPC calls in progress.", ["method"], registry=r
        )
        self.batch_size = Histogram(
            "cohortsim_batch_size",
            "Searches answered by one batched index call.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "cohortsim_batch_wait_seconds",
            "How long the first search of a batch waited before the batch started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "cohortsim_batch_queue_depth", "Searches waiting for a batch.", registry=r
        )
        self.index_info = Gauge(
            "cohortsim_index_info",
            "The served index snapshot (value 1).",
            ["index_version", "model_version"],
            registry=r,
        )
        self.index_studies = Gauge(
            "cohortsim_index_studies", "Studies in the served index.", registry=r
        )
        self.gpu_memory = Gauge(
            "cohortsim_gpu_memory_bytes",
            "CUDA memory allocated by torch in this process (0 without CUDA).",
            registry=r,
        )
        self.gpu_memory.set_function(_gpu_memory)
        ProcessCollector(registry=r)
        self._port: int | None = None
        self._server: Any = None

    # hooks ----------------------------------------------------------------------
    def observe_batch(self, size: int, wait_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_wait.observe(wait_s)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def set_index(self, snapshot: Any) -> None:
        """Record the served snapshot (None: nothing served)."""
        self.index_info.clear()
        if snapshot is None:
            self.index_studies.set(0)
            return
        self.index_info.labels(snapshot.version, snapshot.model_version).set(1)
        self.index_studies.set(snapshot.num_studies)

    # exposition -------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1", *, tls: Any = None) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread; with
        ``tls`` (a :class:`service.tls.TlsConfig`) over HTTPS with its certificate, and
        with its client CA, only to clients that show a certificate from that CA."""
        if tls is None:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        else:
            ca = str(tls.client_ca) if tls.client_ca is not None else None
            server, _thread = start_http_server(
                port, addr=host, registry=self.registry, certfile=str(tls.cert),
                keyfile=str(tls.key), client_cafile=ca, client_auth_required=ca is not None,
            )
        self._port = int(server.server_address[1])
        self._server = server
        return self._port

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None


def _gpu_memory() -> float:
    torch = sys.modules.get("torch")  # never import torch just for a metric
    if torch is None:
        return 0.0
    try:
        return float(torch.cuda.memory_allocated()) if torch.cuda.is_initialized() else 0.0
    except Exception:
        return 0.0


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


class _MetricsGuard:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        # labelled children by method (and code): ``labels()`` validates and locks on
        # every lookup; the children are the same objects each time
        self._in_flight: dict[str, Any] = {}
        self._duration: dict[tuple[str, str], Any] = {}

    def _gauge(self, method: str) -> Any:
        child = self._in_flight.get(method)
        if child is None:
            child = self._in_flight[method] = self.metrics.in_flight.labels(method)
        return child

    async def enter(self, call: CallInfo, request: Any, context: Any) -> None:
        self._gauge(_short(call.method)).inc()

    async def exit(
        self, call: CallInfo, request: Any, response: Any, error: BaseException | None, context: Any
    ) -> None:
        method = _short(call.method)
        elapsed = time.monotonic() - call.started  # set when the outermost guard began
        code = status_of(error, context)
        self._gauge(method).dec()
        histogram = self._duration.get((method, code))
        if histogram is None:
            histogram = self._duration[method, code] = self.metrics.rpc_duration.labels(
                method, code
            )
        histogram.observe(elapsed)
        level = logging.DEBUG if code == "OK" else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "call",
                extra={
                    "request_id": call.request_id,
                    "method": method,
                    "code": code,
                    "duration_ms": round(elapsed * 1e3, 3),
                },
            )


class MetricsInterceptor(GuardInterceptor):
    """Latency, in-flight count and an access-log line for every call."""

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__(_MetricsGuard(metrics))


__all__ = ["MetricsInterceptor", "ServerMetrics"]
