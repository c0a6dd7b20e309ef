"""Server construction (one function) and the serve loop with graceful shutdown.

    server, port = await create_server(index_dir, ServeConfig(port=0), SecurityConfig(...))
    await server.start()

or ``asyncio.run(serve(index_dir, ServeConfig(port=50051)))`` to run until SIGTERM /
SIGINT. ``service.config.options(port=0, device="cpu", auth_tokens=...)`` turns keyword
settings into the two objects.
The server registers the similarity service, ``grpc.health.v1.Health`` (SERVING for ""
and the service name once the snapshot is loaded, NOT_SERVING when loading failed) and
server reflection.

Security (:class:`SecurityConfig`, all optional): ``tls`` (TLS, or mutual TLS with a client CA: the
port then speaks TLS only), ``auth_tokens`` (bearer tokens -> roles; health stays open),
``audit_log`` (a chained record of every call, fail closed), ``policy`` (the researcher
view: small-cell threshold, re-identification guard), ``rate_limit`` /
``max_concurrent_per_principal``. Interceptors run audit -> rate per peer host ->
auth -> limits per principal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoders.budget import DecodeBudget
from encoders.decode_pool import DecodePool
from service.api import SERVICE_FULL_NAME, cohortsim_pb2_grpc
from service.audit import AuditLog, read_records
from service.auth import TokenStore
from service.batching import SearchBatcher
from service.config import SecurityConfig, ServeConfig
from service.governance import Governance
from service.metrics import MetricsInterceptor, ServerMetrics
from service.rpcs import CallerSlots
from service.servicer import (
    Limits,
    PatientSimilarityServicer,
    ServiceState,
    search,
    search_many,
)
from service.threads import limit_native_threads

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 20.0  # SIGTERM: how long in-flight calls may take (cohortsim serve --grace-s)
# SIGTERM: health says NOT_SERVING at once, but new calls are still taken this long, so
# calls already sent (on the wire, or queued in gRPC but not yet picked up by the busy
# event loop, which gRPC would cancel at stop) are served rather than failed
DEFAULT_STOP_DELAY_S = 1.0
# --rate-limit per peer host, before authentication, is this many times the rate per
# principal: several principals (an application's users) may share one host
PEER_RATE_FACTOR = 4.0


@dataclass(frozen=True)
class _ServerParts:
    health: health.aio.HealthServicer
    state: ServiceState
    executor: ThreadPoolExecutor
    dicom_executor: ThreadPoolExecutor
    dicom_priority_executor: ThreadPoolExecutor
    audit: AuditLog | None = None
    batcher: SearchBatcher | None = None
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None


# What create_server attached to each server (for shutdown and introspection).
_PARTS: weakref.WeakKeyDictionary[grpc.aio.Server, _ServerParts] = weakref.WeakKeyDictionary()


async def create_server(
    index_dir: Path | str,
    config: ServeConfig | None = None,
    security: SecurityConfig | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build a ``grpc.aio`` server for the current snapshot of ``index_dir``; not started.

    ``config`` (:class:`ServeConfig`, default its defaults) holds the operational
    settings, ``security`` (:class:`SecurityConfig`, default none) TLS, tokens, the audit
    log, the researcher policy and the rates; :func:`service.config.options` builds both
    from keyword settings. Call it inside the event loop that will run the server.
    Returns ``(server, bound port)``; ``port=0`` binds a free port. ``max_receive_mb``
    caps one request (DICOM uploads); ``max_workers`` threads run searches and DICOM
    embedding off the event loop.
    If the snapshot cannot be loaded the server still starts, health says NOT_SERVING and
    calls fail with UNAVAILABLE. Every ``watch_interval_s`` seconds (None: never) the server
    looks at ``INDEX_DIR/CURRENT`` and swaps in the version it names, without a restart
    and without failing a call (:meth:`ServiceState.refresh`). Concurrent searches are
    micro-batched (:mod:`service.batching`; ``batch_window_ms`` in [0, 2], ``batching``
    false: off, ``max_batch`` per index call, ``max_queue`` waiting before RESOURCE_EXHAUSTED);
    ``max_concurrent_rpcs`` caps calls in progress (more: RESOURCE_EXHAUSTED).
    ``store``: the cohort store IngestStudies adds to (None: IngestStudies fails with
    FAILED_PRECONDITION); ``max_stream_mb`` caps one SearchSimilarStream study.
    DICOM decoding is held to ``decode_budget_mb`` per request and
    ``decode_budget_server_mb`` for all at once (:mod:`encoders.budget`), and one caller
    to ``dicom_calls_per_caller`` DICOM calls at once. It runs in ``decode_workers``
    worker processes (:mod:`encoders.decode_pool`: niceness +``decode_worker_nice``,
    ``decode_worker_memory_mb`` of address space each, ``decode_timeout_s``; 0 workers:
    on the server's DICOM threads), started with the encoder when ``warm_encoder``, else
    at the first DICOM call. Clinicians' DICOM calls (callers outside the researcher
    view) have threads of their own and go first for a decode worker and the encoder.
    Prometheus metrics (:mod:`service.metrics`) are kept for every server and served on
    ``metrics_host:metrics_port`` when a port is given (0: a free one,
    :func:`server_metrics_port` says which), with the API's TLS when ``metrics_tls``.
    ``blas_threads`` caps BLAS / OpenMP threads per search, process-wide
    (:mod:`service.threads`; None: as the environment says).
    ``warm_encoder``: when the index carries an encoder, load it (and torch) before the
    server listens; otherwise the first DICOM query loads it, and while torch imports
    (seconds on a busy CPU) every other call waits too.
    ``security.pacs``: the PACS that queries by reference (``PacsStudy``) retrieve from.
    Bad security settings (a key or token file others can
    read, an unwritable or broken audit log) raise before anything listens.
    """
    cfg = (config or ServeConfig()).validate()
    sec = security or SecurityConfig()
    host, port, max_receive_mb, max_workers = cfg.host, cfg.port, cfg.max_receive_mb, cfg.max_workers
    metrics_port, metrics_host = cfg.metrics_port, cfg.metrics_host
    if cfg.metrics_tls and sec.tls is None:
        raise ValueError("metrics_tls needs the API's TLS (tls=TlsConfig(...), --tls-cert/--tls-key)")
    if max_receive_mb < 1:
        raise ValueError(f"max_receive_mb must be >= 1, got {max_receive_mb}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    guards = _Security.build(sec)
    limit_native_threads(cfg.blas_threads)
    state = await asyncio.to_thread(ServiceState.load, Path(index_dir), device=cfg.device)
    state.decode_budget = DecodeBudget(
        per_request=cfg.decode_budget_mb << 20, per_process=cfg.decode_budget_server_mb << 20
    )
    if cfg.decode_workers > 0:
        state.decode_pool = DecodePool(
            cfg.decode_workers, memory_mb=cfg.decode_worker_memory_mb,
            nice=cfg.decode_worker_nice, timeout_s=cfg.decode_timeout_s,
            budget=state.decode_budget,
        )
    if cfg.warm_encoder and state.dicom_supported:
        await asyncio.to_thread(_warm_encoder, state)
        if state.decode_pool is not None:  # spawned beside the serving, not awaited
            threading.Thread(target=_start_decode_workers, args=(state.decode_pool,),
                             name="cohortsim-decode-start", daemon=True).start()
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cohortsim-worker")
    # DICOM calls: the researcher view's on one pool of threads, the others' (clinicians)
    # on their own, so a clinician's study never waits behind uploads for a thread
    dicom_executor = ThreadPoolExecutor(
        max_workers=cfg.dicom_workers, thread_name_prefix="cohortsim-dicom"
    )
    dicom_priority_executor = ThreadPoolExecutor(
        max_workers=cfg.dicom_workers, thread_name_prefix="cohortsim-dicom-priority"
    )
    governance = Governance(sec.policy)
    if guards.audit is not None:
        replayed = governance.replay(read_records(guards.audit.path), state.snapshot)
        log.info("researcher answers replayed from the audit log: %d", replayed)
    limits = Limits(max_k=cfg.max_k, max_files=cfg.max_files)
    metrics = ServerMetrics()
    metrics.set_index(state.snapshot)
    batcher = None
    if cfg.batching:
        batcher = SearchBatcher(
            state,
            functools.partial(search, max_k=limits.max_k),
            executor=executor,
            window_s=cfg.batch_window_ms / 1e3,
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            # default one batch at a time: the next one forms while it runs (larger
            # batches won 270 vs 213 QPS at 32 clients on busy cores, bench_service.py);
            # the other workers stay free for DICOM embedding and the other RPCs
            max_inflight=cfg.batch_inflight,
            on_batch=metrics.observe_batch,
            search_many=functools.partial(search_many, max_k=limits.max_k),
        )
        metrics.watch_queue(lambda: batcher.queue_depth if batcher is not None else 0)
    servicer = PatientSimilarityServicer(
        state,
        executor=executor,
        limits=limits,
        governance=governance,
        batcher=batcher,
    )
    servicer.store_dir = Path(cfg.store) if cfg.store is not None else None
    servicer.pacs = sec.pacs
    servicer.max_stream_bytes = int(cfg.max_stream_mb) << 20
    servicer.dicom_slots = CallerSlots(
        cfg.dicom_calls_per_caller, cfg.dicom_calls_waiting, cfg.dicom_cooldown_s, hold=True
    )
    servicer.dicom_executor = dicom_executor
    servicer.dicom_priority_executor = dicom_priority_executor
    size = int(max_receive_mb) * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=[MetricsInterceptor(metrics), *guards.interceptors],
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    cohortsim_pb2_grpc.add_PatientSimilarityServiceServicer_to_server(servicer, server)

    health_servicer = health.aio.HealthServicer()
    serving = (
        health_pb2.HealthCheckResponse.SERVING
        if state.ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_FULL_NAME):
        await health_servicer.set(name, serving)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_FULL_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if guards.credentials is not None:
            bound = server.add_secure_port(address, guards.credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        bound = 0
        cause: BaseException | None = exc
    else:
        cause = None
    if bound == 0:
        _close_workers(executor, dicom_executor, dicom_priority_executor, state=state)
        if guards.audit is not None:
            guards.audit.close()
        raise OSError(f"cannot listen on {address}: the port is in use or not allowed") from cause
    bound_metrics = None
    if metrics_port is not None:
        try:
            bound_metrics = metrics.serve(
                metrics_port, metrics_host, tls=sec.tls if cfg.metrics_tls else None
            )
        except OSError as exc:
            _close_workers(executor, dicom_executor, dicom_priority_executor, state=state)
            if guards.audit is not None:
                guards.audit.close()
            raise OSError(
                f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror or exc}"
            ) from None
        scheme = "https" if cfg.metrics_tls else "http"
        log.info("metrics on %s://%s:%d/metrics", scheme, metrics_host, bound_metrics)
        if not cfg.metrics_tls and metrics_host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "metrics on %s answer anyone who can reach the port, without TLS; keep them "
                "on loopback or set metrics_tls", metrics_host,
            )
    _PARTS[server] = _ServerParts(
        health_servicer, state, executor, dicom_executor, dicom_priority_executor,
        guards.audit, batcher, metrics, bound_metrics,
    )
    loop = asyncio.get_running_loop()

    def now_serving(_snapshot: object) -> None:  # a (new) index version was swapped in
        for name in ("", SERVICE_FULL_NAME):
            asyncio.run_coroutine_threadsafe(
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING), loop
            )

    state.add_listener(now_serving)
    state.add_listener(metrics.set_index)
    if cfg.watch_interval_s is not None:
        state.start_watching(cfg.watch_interval_s)
    log.info(
        "server ready on port %d: index %s (%s)",
        bound,
        state.index_version or "none",
        "serving" if state.ready else "not serving",
    )
    return server, bound


def _close_workers(*executors: ThreadPoolExecutor, state: ServiceState) -> None:
    """Stop the worker threads (queued work cancelled) and the decode worker processes."""
    for pool in executors:
        pool.shutdown(wait=False, cancel_futures=True)
    if state.decode_pool is not None:
        state.decode_pool.close()


def _start_decode_workers(pool: DecodePool) -> None:
    try:
        pool.start()
    except Exception as exc:  # closed meanwhile, or cannot spawn: the first DICOM call retries
        log.warning("decode workers not started (%s)", type(exc).__name__)


def _warm_encoder(state: ServiceState) -> None:
    try:
        state.encoder()
    except Exception as exc:  # remembered by the state; DICOM calls get the error
        log.warning("encoder not loaded at start (%s); DICOM queries will fail", type(exc).__name__)


async def shutdown(
    server: grpc.aio.Server, grace: float = DEFAULT_GRACE_S, *, delay: float = 0.0
) -> None:
    """Mark health NOT_SERVING, keep taking calls for ``delay`` s, then stop accepting
    calls and drain in-flight ones for ``grace`` s."""
    parts = _PARTS.get(server)
    if parts is not None:
        await parts.health.enter_graceful_shutdown()
    if delay > 0:
        await asyncio.sleep(delay)
    await server.stop(grace)
    if parts is not None:
        parts.state.close()
        _close_workers(parts.executor, parts.dicom_executor, parts.dicom_priority_executor,
                       state=parts.state)
        if parts.metrics is not None:
            parts.metrics.close()
        if parts.audit is not None:
            parts.audit.close()


@dataclass
class _Security:
    """TLS credentials and interceptors built from the security options."""

    credentials: grpc.ServerCredentials | None
    interceptors: list[grpc.aio.ServerInterceptor]
    audit: AuditLog | None

    @classmethod
    def build(cls, sec: SecurityConfig) -> _Security:
        from service.interceptors.audit import AuditInterceptor
        from service.interceptors.auth import AuthInterceptor
        from service.interceptors.limits import RateLimitInterceptor

        tls, auth_tokens, audit_log = sec.tls, sec.auth_tokens, sec.audit_log
        rate_limit, max_concurrent = sec.rate_limit, sec.max_concurrent_per_principal
        credentials = tls.server_credentials() if tls is not None else None
        tokens = (
            auth_tokens
            if isinstance(auth_tokens, TokenStore) or auth_tokens is None
            else TokenStore.load(auth_tokens)
        )
        if tokens is not None and tls is None:
            log.warning("bearer tokens without TLS travel in clear text; use --tls-cert/--tls-key")
        max_bytes = int(sec.audit_max_mb * 2**20) if sec.audit_max_mb is not None else None
        audit = (
            audit_log
            if isinstance(audit_log, AuditLog) or audit_log is None
            else AuditLog(audit_log, max_bytes=max_bytes)
        )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if audit is not None:
            interceptors.append(AuditInterceptor(audit))
        if rate_limit is not None and tokens is not None:
            # the rate per peer host before authentication: callers without a valid token
            # are held to it too (their refusals are audited, with bounded request text)
            interceptors.append(
                RateLimitInterceptor(rate=rate_limit * PEER_RATE_FACTOR, by_peer=True)
            )
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens))
        if rate_limit is not None or max_concurrent is not None:
            interceptors.append(
                RateLimitInterceptor(rate=rate_limit, max_concurrent=max_concurrent)
            )
        return cls(credentials, interceptors, audit)


def server_state(server: grpc.aio.Server) -> ServiceState | None:
    """The :class:`ServiceState` of a server made by :func:`create_server` (else None)."""
    parts = _PARTS.get(server)
    return parts.state if parts is not None else None


def server_metrics(server: grpc.aio.Server) -> tuple[ServerMetrics | None, int | None]:
    """``(metrics, bound metrics port or None)`` of a server made by :func:`create_server`."""
    parts = _PARTS.get(server)
    return (parts.metrics, parts.metrics_port) if parts is not None else (None, None)


def server_batcher(server: grpc.aio.Server) -> SearchBatcher | None:
    """The search micro-batcher of a server made by :func:`create_server` (None: off)."""
    parts = _PARTS.get(server)
    return parts.batcher if parts is not None else None


async def serve(
    index_dir: Path | str,
    config: ServeConfig | None = None,
    security: SecurityConfig | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT (or until the server terminates), then stop gracefully:
    health NOT_SERVING, new calls still taken for ``config.stop_delay_s`` s, then
    in-flight calls drained for up to ``config.grace_s`` s (:func:`shutdown`).

    ``ready(port)`` is called once the server listens (``port=0`` picks a free one).
    """
    cfg = config or ServeConfig()
    grace, stop_delay = cfg.grace_s, cfg.stop_delay_s
    server, bound = await create_server(index_dir, cfg, security)
    await server.start()
    if ready is not None:
        ready(bound)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / Windows
            pass
    stop_wait = asyncio.create_task(stop.wait())
    terminated = asyncio.create_task(server.wait_for_termination())
    try:
        await asyncio.wait({stop_wait, terminated}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info(
                "stopping: NOT_SERVING, taking calls for %.1f s more, then draining in-flight "
                "calls for up to %.0f s",
                stop_delay,
                grace,
            )
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await shutdown(server, grace, delay=stop_delay if stop.is_set() else 0.0)
        for task in (stop_wait, terminated):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("server stopped")


__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_STOP_DELAY_S",
    "create_server",
    "serve",
    "server_batcher",
    "server_metrics",
    "server_state",
    "shutdown",
]
