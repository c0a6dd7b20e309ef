"""Small uploads that would cost gigabytes (issue #24): a budget of decoded bytes per
request and per process, checked before a decode allocates; streamed uploads refused
before buffering; DICOM calls per caller."""

from __future__ import annotations

import io
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

from encoders.budget import DecodeBudget, DecodeBudgetExceeded, DecodeCapacityExhausted, charge
from encoders.dicom import read_study
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.client import CohortsimClient, CohortsimClientError

from .security_env import rpc_error
from .test_dicom_query import dicom_setup  # noqa: F401  (the module fixture)

MIB = 1 << 20


# --------------------------------------------------------------------------- the budget


def test_budget_limits_per_request_expansion_and_process() -> None:
    b = DecodeBudget(per_request=100 * MIB, per_process=150 * MIB, max_expansion=10, slack=0)
    with b.request(received=20 * MIB) as r:
        r.charge(90 * MIB, "a")
        with pytest.raises(DecodeBudgetExceeded, match="more than 100 MiB"):
            r.charge(20 * MIB, "b")  # 110 MiB > per request
    assert b.used == 0  # released at the end of the request
    with b.request(received=1 * MIB) as r, pytest.raises(DecodeBudgetExceeded, match="10 times"):
        r.charge(11 * MIB, "a bomb")  # 11 MiB from 1 MiB received
    with b.request(received=100 * MIB) as r1, b.request(received=100 * MIB) as r2:
        r1.charge(90 * MIB, "first")
        with pytest.raises(DecodeCapacityExhausted) as info:
            r2.charge(90 * MIB, "second")  # 180 MiB > per process
        assert info.value.reason == "server_busy" and info.value.retryable
    charge(10**12, "outside any request")  # no budget: no effect


# --------------------------------------------------------------------------- hostile files


def _template(dicom_setup: dict) -> pydicom.Dataset:  # noqa: F811
    """A slice of the study's main series (not its localizer)."""
    by_series: dict[str, list[Path]] = {}
    for path in dicom_setup["studies"][0]:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        by_series.setdefault(uid, []).append(path)
    return pydicom.dcmread(max(by_series.values(), key=len)[0])


def _big_slices(template: pydicom.Dataset, n: int, side: int, *, deflate: bool = False,
                rle: bool = False) -> list[bytes]:
    """``n`` slices of ``side`` x ``side`` zeros: tiny on the wire, large decoded."""
    series = generate_uid()
    out = []
    for i in range(n):
        ds = template.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        pixels = np.zeros((side, side), np.int16)
        ds.PixelData = pixels.tobytes()
        if rle:
            ds.compress(RLELossless, pixels)
        elif deflate:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("kind", ["deflate", "rle"])
def test_a_small_upload_is_refused_before_it_decodes_to_hundreds_of_mib(
    dicom_setup: dict, kind: str  # noqa: F811
) -> None:
    files = _big_slices(_template(dicom_setup), 20, 2048, deflate=kind == "deflate", rle=kind == "rle")
    sent = sum(map(len, files))
    assert sent < 4 * MIB  # the decoded series would be 20 x 2048^2 x (2 + 4) bytes: 480 MiB
    budget = DecodeBudget(per_request=256 * MIB, per_process=256 * MIB)
    tracemalloc.start()
    try:
        with budget.request(received=sent), pytest.raises(DecodeBudgetExceeded) as info:
            read_study(files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "decode_budget"
    # what the budget lets through (64 MiB slack + 256 x the upload), not the 480 MiB
    assert peak < 128 * MIB, f"{peak / MIB:.0f} MiB allocated before the refusal"


def test_a_normal_study_fits_the_default_budget(dicom_setup: dict) -> None:  # noqa: F811
    files = [Path(p).read_bytes() for p in dicom_setup["studies"][0]]
    budget = DecodeBudget()
    with budget.request(received=sum(map(len, files))) as r:
        study = read_study(files)
        assert r.charged >= study.volume.nbytes  # what it decoded was charged first
    assert budget.used == 0


# --------------------------------------------------------------------------- streams


def _counting(messages: Iterator[pb.SearchSimilarStreamRequest], seen: list[int]):
    for m in messages:
        seen[0] += 1
        yield m


def _chunks(header: pb.SearchSimilarRequest, n: int, data: bytes) -> Iterator[pb.SearchSimilarStreamRequest]:
    yield pb.SearchSimilarStreamRequest(request=header)
    for _ in range(n):
        yield pb.SearchSimilarStreamRequest(chunk=pb.DicomFileChunk(data=data))


def test_a_stream_to_an_index_without_encoder_is_refused_before_buffering(index_dir: Path) -> None:
    with BackgroundServer(index_dir, device="cpu", watch_interval=None) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        seen = [0]
        msgs = _counting(_chunks(pb.SearchSimilarRequest(k=3), 2000, b"\0" * (256 << 10)), seen)
        code, _, reason = rpc_error(stub.SearchSimilarStream, msgs)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ENCODER")
    assert seen[0] < 200, f"{seen[0]} of 2001 messages (500 MiB) were taken before the refusal"


def test_empty_chunks_are_refused_as_they_arrive(dicom_setup: dict) -> None:  # noqa: F811
    with BackgroundServer(dicom_setup["index"], device="cpu", watch_interval=None) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        seen = [0]
        msgs = _counting(_chunks(pb.SearchSimilarRequest(k=3), 169_000, b""), seen)
        code, _, reason = rpc_error(stub.SearchSimilarStream, msgs)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_CHUNK")
    assert seen[0] < 1000


def test_stream_cap_and_one_caller_holds_a_bounded_number_of_dicom_calls(dicom_setup: dict) -> None:  # noqa: F811
    srv = BackgroundServer(dicom_setup["index"], device="cpu", max_stream_mb=1, watch_interval=None,
                           dicom_calls_per_caller=1, dicom_calls_waiting=1)
    with srv, CohortsimClient(srv.target) as c, grpc.insecure_channel(srv.target) as channel:
        big = [b"\0" * (700 << 10), b"\0" * (700 << 10)]
        with pytest.raises(CohortsimClientError) as cerr:
            c.search_stream(big, k=3, chunk_bytes=256 << 10)
        assert (cerr.value.code, cerr.value.reason) == ("RESOURCE_EXHAUSTED", "STUDY_TOO_LARGE")
        # one caller (the peer host here): one DICOM call runs, one waits, a third is refused
        gate = threading.Event()

        def held() -> Iterator[pb.SearchSimilarStreamRequest]:
            yield pb.SearchSimilarStreamRequest(request=pb.SearchSimilarRequest(k=3))
            gate.wait(20)

        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        calls = [stub.SearchSimilarStream.future(held(), timeout=30) for _ in range(2)]
        try:
            import time

            time.sleep(1.0)
            with pytest.raises(CohortsimClientError) as cerr:
                c.search_stream([b"x" * 10], k=3)
            assert (cerr.value.code, cerr.value.reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_DICOM_CALLS")
        finally:
            gate.set()
            for f in calls:
                f.exception()
        assert c.index_info().num_studies > 0


def test_a_caller_whose_upload_was_a_bomb_is_refused_at_once_for_a_while() -> None:
    import asyncio

    from service.errors import ServiceError
    from service.rpcs import CallerSlots

    async def scenario() -> None:
        slots = CallerSlots(per_caller=1, waiting=0, cooldown_s=30.0)
        async with slots.slot("mallory"):
            with pytest.raises(ServiceError) as busy:
                async with slots.slot("mallory"):
                    pass
            assert busy.value.reason == "TOO_MANY_DICOM_CALLS"
        slots.penalise("mallory")
        with pytest.raises(ServiceError) as info:
            async with slots.slot("mallory"):
                pass
        assert info.value.reason == "DICOM_COOLDOWN" and "retry_after_ms" in info.value.metadata
        async with slots.slot("alice"):  # other callers are not affected
            pass

    asyncio.run(scenario())
