"""DICOM uploads decoded in worker processes (issue #24): a study that exhausts a
worker's memory ends only that worker, the budget still holds there, clinicians' calls
succeed beside hostile uploads and go first, and no worker outlives its server."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoders.budget import DecodeBudget, DecodeBudgetExceeded
from encoders.decode_pool import DecodePool, DecodeWorkerLost, _PriorityGate, prepare_study
from encoders.model import EncoderCard
from service.api import cohortsim_pb2 as pb
from service.api import cohortsim_pb2_grpc
from service.background import BackgroundServer
from service.batching import EmbedBatcher
from service.rpcs import CallerSlots
from service.server import server_state

from .security_env import bearer, rpc_error, write_tokens
from .test_dicom_query import dicom_setup  # noqa: F401  (the module fixture)
from .test_upload_budget import _big_slices, _template

MIB = 1 << 20


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids: list[int], within_s: float = 20.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _study(dicom_setup: dict) -> list[bytes]:  # noqa: F811
    return [Path(p).read_bytes() for p in dicom_setup["studies"][0]]


def _noise_slices(dicom_setup: dict, n: int, side: int) -> list[bytes]:  # noqa: F811
    """``n`` slices of random pixels: they compress to nothing, so the upload is as large
    as what it decodes to and passes the budget's expansion check."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    template = _template(dicom_setup)
    rng = np.random.default_rng(0)
    series = generate_uid()
    out = []
    for i in range(n):
        ds = template.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.ImagePositionPatient, ds.InstanceNumber = [0.0, 0.0, float(i)], i + 1
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(-1000, 1000, (side, side), dtype=np.int16).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    assert isinstance(out[0], bytes) and pydicom.dcmread(io.BytesIO(out[0])).Rows == side
    return out


# --------------------------------------------------------------------------- the pool


def test_a_worker_prepares_what_the_server_thread_prepares_and_keeps_the_budget(
    dicom_setup: dict,  # noqa: F811
) -> None:
    card: EncoderCard = dicom_setup["card"]
    files = _study(dicom_setup)
    here = prepare_study(files, card.input)
    pool = DecodePool(1, budget=DecodeBudget(per_request=256 * MIB, per_process=256 * MIB))
    try:
        there = pool.prepare(files, card.input)
        np.testing.assert_allclose(there.context, here.context, rtol=1e-5, atol=1e-4)
        assert there.acquisition == here.acquisition and there.shape == here.shape
        # the red team's kind of upload: refused by the budget inside the worker, typed
        bomb = _big_slices(_template(dicom_setup), 20, 2048, deflate=True)
        with pytest.raises(DecodeBudgetExceeded) as info:
            pool.prepare(bomb, card.input)
        assert info.value.reason == "decode_budget" and not isinstance(info.value, DecodeWorkerLost)
        assert pool.lost == 0  # a refusal is an answer, not a lost worker
        pids = pool.pids()
        assert len(pids) == 1 and pids[0] != os.getpid()
    finally:
        pool.close()
    assert _gone(pids), "a decode worker outlived DecodePool.close()"


def test_a_study_beyond_the_worker_memory_ends_only_its_worker(dicom_setup: dict) -> None:  # noqa: F811
    card: EncoderCard = dicom_setup["card"]
    # a budget that would let 480 MiB through: the address-space cap is what stops it
    loose = DecodeBudget(per_request=4096 * MIB, per_process=4096 * MIB, max_expansion=1e6)
    pool = DecodePool(2, memory_mb=160, budget=loose)
    try:
        pool.start()
        before = set(pool.pids())
        bomb = _big_slices(_template(dicom_setup), 20, 2048, deflate=True)
        with pytest.raises(DecodeWorkerLost) as info:
            pool.prepare(bomb, card.input)
        assert info.value.reason == "decode_memory" and info.value.status == "RESOURCE_EXHAUSTED"
        assert pool.lost == 1
        # the pool goes on: a normal study decodes, on a fresh worker beside the survivor
        prepared = pool.prepare(_study(dicom_setup), card.input)
        assert prepared.context.shape == tuple(card.input.shape)
        after = set(pool.pids())
        assert len(after) == 2 and len(before & after) == 1, (before, after)
    finally:
        pool.close()


def test_waiting_callers_get_a_worker_by_priority_then_arrival() -> None:
    gate = _PriorityGate(1)
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with gate.slot(1):
            holding.set()
            release.wait(10)

    def waiter(name: str, priority: int) -> None:
        with gate.slot(priority):
            order.append(name)

    t0 = threading.Thread(target=first)
    t0.start()
    assert holding.wait(10)
    threads = []
    for name, prio in (("researcher-a", 1), ("researcher-b", 1), ("clinician", 0)):
        t = threading.Thread(target=waiter, args=(name, prio))
        t.start()
        threads.append(t)
        while len(gate._waiting) < len(threads):  # queued before the next one arrives
            time.sleep(0.01)
    release.set()
    for t in [t0, *threads]:
        t.join(10)
    assert order == ["clinician", "researcher-a", "researcher-b"]


def test_the_encoder_queue_serves_clinicians_first() -> None:
    batcher = EmbedBatcher()
    started = threading.Event()
    release = threading.Event()
    forwards: list[list[float]] = []

    def run(_enc: object, volumes: np.ndarray) -> np.ndarray:
        forwards.append([float(v) for v in volumes[:, 0]])
        if not started.is_set():
            started.set()
            release.wait(10)
        return np.zeros((len(volumes), 2), np.float32)

    enc_a, enc_b = object(), object()
    jobs = [
        (enc_a, 0.0, 1),  # runs first, holds the encoder
        (enc_a, 1.0, 1),  # a researcher's study, queued first
        (enc_b, 2.0, 0),  # a clinician's, on another encoder: no shared forward
    ]
    threads = []
    for i, (enc, value, prio) in enumerate(jobs):
        t = threading.Thread(target=batcher.embed, args=(enc, np.full((1, 1), value), run),
                             kwargs={"priority": prio})
        t.start()
        threads.append(t)
        if i == 0:
            assert started.wait(10)
        while len(batcher._queue) < i:
            time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert forwards == [[0.0], [2.0], [1.0]]


def test_a_caller_in_cooldown_is_answered_when_the_cooldown_ends() -> None:
    from service.errors import ServiceError

    async def scenario() -> None:
        slots = CallerSlots(per_caller=1, waiting=0, cooldown_s=0.3, hold=True)
        slots.penalise("mallory")
        with pytest.raises(ServiceError) as info:
            async with slots.slot("mallory"):
                pass
        assert info.value.reason == "DICOM_COOLDOWN"
        assert info.value.metadata["retry_after_ms"] == "0"  # held to the end of it
        async with slots.slot("mallory"):  # and then served again
            pass

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the server


def test_a_bomb_through_the_server_costs_a_worker_and_the_next_query_works(
    dicom_setup: dict,  # noqa: F811
) -> None:
    srv = BackgroundServer(dicom_setup["index"], device="cpu", watch_interval=None,
                           decode_workers=1, decode_worker_memory_mb=96,
                           dicom_cooldown_s=0.0)
    with srv, grpc.insecure_channel(srv.target, options=[
        ("grpc.max_send_message_length", 64 * MIB)]) as ch:
        state = server_state(srv._server)  # type: ignore[arg-type]
        assert state is not None and state.decode_pool is not None
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
        noise = _noise_slices(dicom_setup, 12, 1024)  # 24 MiB sent, ~70 MiB decoded
        code, _, reason = rpc_error(
            stub.SearchSimilar, pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=noise), k=3)
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DICOM_DECODE_MEMORY")
        assert state.decode_pool.lost == 1
        ok = stub.SearchSimilar(
            pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=_study(dicom_setup)), k=3), timeout=60
        )
        assert ok.neighbors[0].study_uid == dicom_setup["study0_uid"]
        pids = state.decode_pool.pids()
        assert pids
    assert _gone(pids), "decode workers outlived the server"


def test_the_in_process_path_gives_the_same_answer(dicom_setup: dict) -> None:  # noqa: F811
    request = pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=_study(dicom_setup)), k=5)
    answers = []
    for workers in (0, 1):
        with BackgroundServer(dicom_setup["index"], device="cpu", watch_interval=None,
                              decode_workers=workers) as srv, grpc.insecure_channel(srv.target) as ch:
            state = server_state(srv._server)  # type: ignore[arg-type]
            assert state is not None and (state.decode_pool is None) == (workers == 0)
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            answers.append(stub.SearchSimilar(request, timeout=60))
            bomb = _big_slices(_template(dicom_setup), 20, 2048, deflate=True)
            code, _, reason = rpc_error(
                stub.SearchSimilar, pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=bomb), k=3)
            )
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DICOM_DECODE_BUDGET")
    a, b = answers
    assert [n.study_uid for n in a.neighbors] == [n.study_uid for n in b.neighbors]
    np.testing.assert_allclose([n.similarity for n in a.neighbors],
                               [n.similarity for n in b.neighbors], atol=1e-4)


def test_a_clinician_is_answered_while_researchers_send_bombs(
    dicom_setup: dict, tmp_path: Path  # noqa: F811
) -> None:
    tokens = write_tokens(tmp_path / "tokens.json")
    srv = BackgroundServer(dicom_setup["index"], device="cpu", watch_interval=None,
                           auth_tokens=tmp_path / "tokens.json", dicom_cooldown_s=0.0)
    bomb = _big_slices(_template(dicom_setup), 20, 2048, deflate=True)
    stop = threading.Event()
    hostile: list[str] = []

    def attacker(target: str) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            while not stop.is_set():
                try:
                    stub.SearchSimilar(pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=bomb), k=11),
                                       metadata=bearer(tokens["researcher"]), timeout=60)
                    hostile.append("OK")
                except grpc.RpcError as err:
                    hostile.append(err.code().name)

    with srv, grpc.insecure_channel(srv.target) as ch:
        threads = [threading.Thread(target=attacker, args=(srv.target,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(ch)
            md = bearer(tokens["clinician"])
            while len(hostile) < 3:  # the uploads are arriving
                time.sleep(0.05)
            study = pb.SearchSimilarRequest(dicom=pb.DicomStudy(files=_study(dicom_setup)), k=3)
            for _ in range(2):
                res = stub.SearchSimilar(study, metadata=md, timeout=60)
                assert res.neighbors[0].study_uid == dicom_setup["study0_uid"]
                vec = pb.Vector(values=dicom_setup["own"][1].tolist())
                assert len(stub.SearchSimilar(pb.SearchSimilarRequest(embedding=vec, k=3),
                                              metadata=md, timeout=60).neighbors) == 3
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert hostile and "OK" not in hostile and set(hostile) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
