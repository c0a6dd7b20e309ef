"""Run the gRPC server on a background thread (demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from service.config import SecurityConfig, ServeConfig, options
from service.server import create_server, shutdown


class BackgroundServer:
    """Context manager: serve ``index_dir`` on a thread with its own event loop.

    ``port=0`` picks a free port; the bound one is in ``.port`` and ``.target`` once
    entered. Leaving the block stops the server gracefully.
    """

    def __init__(
        self,
        index_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: ServeConfig | None = None,
        security: SecurityConfig | None = None,
        **kw: Any,
    ) -> None:
        """``config`` / ``security`` as :func:`create_server` takes them, or keyword
        settings (:func:`service.config.options`: ``device="cpu"``, ``audit_log=...``)."""
        self._index_dir = Path(index_dir)
        self._host = host
        if config is None or kw:
            opts, sec = options(host=host, port=port, **kw)
            config = opts if config is None else config
            security = security if security is not None else sec
        self._config = dataclasses.replace(config, host=host, port=port)
        self._security = security
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: object | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"{self._host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            server, port = loop.run_until_complete(
                create_server(self._index_dir, self._config, self._security)
            )
            loop.run_until_complete(server.start())
        except BaseException as exc:  # reported to the caller of __enter__
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._server = server
        self.port = port
        self._ready.set()
        # run_forever, not run_until_complete(server.wait_for_termination()): the latter
        # returns as soon as stop() begins, so the stop() coroutine never finishes.
        loop.run_forever()
        loop.close()

    def __enter__(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="cohortsim-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=120):
            raise TimeoutError("the server did not start within 120 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._loop is not None and self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(shutdown(self._server, grace), self._loop)
            try:
                fut.result(timeout=grace + 10)
            finally:
                self._server = None
                self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=grace + 10)
            self._thread = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
