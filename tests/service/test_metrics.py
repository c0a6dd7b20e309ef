"""Prometheus metrics on their own port, and the structured access log."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc as pb_grpc
from service.background import BackgroundServer
from service.client import CohortsimClient, CohortsimClientError
from service.logs import JsonFormatter, configure
from service.server import server_metrics


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics")


def test_metrics_endpoint(index_dir: Path) -> None:
    with BackgroundServer(index_dir, device="cpu", metrics_port=0, watch_interval=None) as srv:
        _, port = server_metrics(srv._server)  # type: ignore[arg-type]
        assert port
        with CohortsimClient(srv.target) as c:
            info = c.index_info()
            for _ in range(3):
                c.search(embedding=np.ones(32, np.float32), k=3)
            with contextlib.suppress(CohortsimClientError):
                c.search(embedding=np.ones(7, np.float32), k=3)
        text = _scrape(port)
    assert _value(text, 'cohortsim_rpc_duration_seconds_count{code="OK",method="SearchSimilar"}') == 3
    assert _value(text, 'cohortsim_rpc_duration_seconds_count{code="INVALID_ARGUMENT",method="SearchSimilar"}') == 1
    assert _value(text, 'cohortsim_rpc_duration_seconds_count{code="OK",method="GetIndexInfo"}') == 1
    assert _value(text, 'cohortsim_rpc_in_flight{method="SearchSimilar"}') == 0
    assert _value(text, "cohortsim_batch_size_count") >= 3
    assert _value(text, "cohortsim_batch_queue_depth") == 0
    assert _value(text, f'cohortsim_index_info{{index_version="{info.index_version}"') == 1
    assert _value(text, "cohortsim_index_studies") == 200
    assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text


def test_json_log_lines_carry_the_request_id_and_no_unknown_fields() -> None:
    rec = logging.LogRecord("cohortsim.access", logging.INFO, __file__, 1, "call", None, None)
    rec.request_id = "abc-123"
    rec.method = "SearchSimilar"
    rec.patient_id = "P-0000000000000001"  # not a known field: never written
    out = json.loads(JsonFormatter().format(rec))
    assert out["request_id"] == "abc-123" and out["method"] == "SearchSimilar"
    assert "patient_id" not in out and "P-0000" not in json.dumps(out)
    stream = io.StringIO()
    configure("json", "INFO", stream)
    try:
        logging.getLogger("cohortsim.test").info("hello %d", 5)
    finally:
        configure("text", "WARNING")
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "hello 5"


def test_access_log_has_request_id_from_metadata(index_dir: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    srv = BackgroundServer(index_dir, device="cpu", watch_interval=None)
    with srv, caplog.at_level(logging.DEBUG, logger="cohortsim.access"), grpc.insecure_channel(srv.target) as ch:
        pb_grpc.PatientSimilarityServiceStub(ch).GetIndexInfo(
            pb.GetIndexInfoRequest(), metadata=(("x-request-id", "req-42"),), timeout=5
        )
    recs = [r for r in caplog.records if r.name == "cohortsim.access"]
    assert any(getattr(r, "request_id", None) == "req-42" and r.code == "OK" for r in recs)  # type: ignore[attr-defined]


def test_interceptor_wraps_each_method_handler_once() -> None:
    """The wrapped handler is kept per method and rebuilt only when the server hands back
    another handler object for that method."""
    import asyncio

    import grpc

    from service.metrics import MetricsInterceptor, ServerMetrics

    async def behaviour(request: object, context: object) -> object:
        return request

    first = grpc.unary_unary_rpc_method_handler(behaviour)
    other = grpc.unary_unary_rpc_method_handler(behaviour)
    current = {"/a.S/One": first, "/a.S/Two": other}

    async def continuation(details: grpc.HandlerCallDetails) -> object:
        return current.get(details.method)

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    async def run() -> None:
        icpt = MetricsInterceptor(ServerMetrics())
        one = await icpt.intercept_service(continuation, Details("/a.S/One"))
        assert one is not first and one.unary_unary is not behaviour  # wrapped
        assert await icpt.intercept_service(continuation, Details("/a.S/One")) is one
        two = await icpt.intercept_service(continuation, Details("/a.S/Two"))
        assert two is not one
        current["/a.S/One"] = other  # a new handler object for the method: wrapped anew
        again = await icpt.intercept_service(continuation, Details("/a.S/One"))
        assert again is not one and again is not two
        assert await icpt.intercept_service(continuation, Details("/a.S/Unknown")) is None

    asyncio.run(run())
