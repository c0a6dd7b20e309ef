"""Server construction (one function) and the serve loop with graceful shutdown.

    server, port = await create_server(index_dir, port=0)
    await server.start()

or ``asyncio.run(serve(index_dir, port=50051))`` to run until SIGTERM / SIGINT.
The server registers the similarity service, ``grpc.health.v1.Health`` (SERVING for ""
and the service name once the snapshot is loaded, NOT_SERVING when loading failed) and
server reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api import SERVICE_FULL_NAME, cohortsim_pb2_grpc
from service.servicer import Limits, PatientSimilarityServicer, ServiceState

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 5.0


@dataclass(frozen=True)
class _ServerParts:
    health: health.aio.HealthServicer
    state: ServiceState
    executor: ThreadPoolExecutor


# What create_server attached to each server (for shutdown and introspection).
_PARTS: weakref.WeakKeyDictionary[grpc.aio.Server, _ServerParts] = weakref.WeakKeyDictionary()


async def create_server(
    index_dir: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    max_receive_mb: int = 64,
    max_workers: int = 2,
    max_k: int = Limits.max_k,
    max_files: int = Limits.max_files,
    device: str = "auto",
) -> tuple[grpc.aio.Server, int]:
    """Build a ``grpc.aio`` server for the current snapshot of ``index_dir``; not started.

    Call it inside the event loop that will run the server. Returns ``(server, bound
    port)``; ``port=0`` binds a free port. ``max_receive_mb`` caps one request (DICOM
    uploads); ``max_workers`` threads run searches and DICOM embedding off the event loop.
    If the snapshot cannot be loaded the server still starts, health says NOT_SERVING and
    calls fail with UNAVAILABLE.
    """
    if max_receive_mb < 1:
        raise ValueError(f"max_receive_mb must be >= 1, got {max_receive_mb}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    state = await asyncio.to_thread(ServiceState.load, Path(index_dir), device=device)
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cohortsim-worker")
    servicer = PatientSimilarityServicer(
        state, executor=executor, limits=Limits(max_k=max_k, max_files=max_files)
    )
    size = int(max_receive_mb) * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ]
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
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise OSError(f"cannot listen on {address}: the port is in use or not allowed") from exc
    if bound == 0:
        executor.shutdown(wait=False)
        raise OSError(f"cannot listen on {address}: the port is in use or not allowed")
    _PARTS[server] = _ServerParts(health_servicer, state, executor)
    log.info(
        "server ready on port %d: index %s (%s)",
        bound,
        state.index_version or "none",
        "serving" if state.ready else "not serving",
    )
    return server, bound


async def shutdown(server: grpc.aio.Server, grace: float = DEFAULT_GRACE_S) -> None:
    """Mark health NOT_SERVING, stop accepting calls, drain in-flight ones for ``grace`` s."""
    parts = _PARTS.get(server)
    if parts is not None:
        await parts.health.enter_graceful_shutdown()
    await server.stop(grace)
    if parts is not None:
        parts.executor.shutdown(wait=False, cancel_futures=True)


def server_state(server: grpc.aio.Server) -> ServiceState | None:
    """The :class:`ServiceState` of a server made by :func:`create_server` (else None)."""
    parts = _PARTS.get(server)
    return parts.state if parts is not None else None


async def serve(
    index_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 50051,
    ready: Callable[[int], None] | None = None,
    *,
    max_receive_mb: int = 64,
    max_workers: int = 2,
    grace: float = DEFAULT_GRACE_S,
    device: str = "auto",
) -> None:
    """Serve until SIGTERM / SIGINT (or until the server terminates), then stop gracefully.

    ``ready(port)`` is called once the server listens (``port=0`` picks a free one).
    """
    server, bound = await create_server(
        index_dir,
        host=host,
        port=port,
        max_receive_mb=max_receive_mb,
        max_workers=max_workers,
        device=device,
    )
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
            log.info("stopping: draining in-flight calls for up to %.0f s", grace)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await shutdown(server, grace)
        for task in (stop_wait, terminated):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("server stopped")


__all__ = ["DEFAULT_GRACE_S", "create_server", "serve", "server_state", "shutdown"]
