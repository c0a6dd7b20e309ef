"""GPU faults at the service, injected on the CPU: a DICOM query whose
embedding runs out of memory is answered anyway (smaller batches), and one that cannot be
embedded at all gets RESOURCE_EXHAUSTED while the server keeps serving."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
import torch

import encoders.model as model
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.background import BackgroundServer

from .test_sigterm import dicom_index  # noqa: F401  (the fixture: index with an encoder)


def oom() -> torch.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")


def test_dicom_query_survives_out_of_memory(
    dicom_index: tuple[Path, list[bytes]],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    index, files = dicom_index
    request = cohortsim_pb2.SearchSimilarRequest(dicom=cohortsim_pb2.DicomStudy(files=files), k=5)
    real = model._embed_batch
    sizes: list[int] = []

    def one_at_a_time(encoder, chunk, dev, *, amp):  # type: ignore[no-untyped-def]
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise oom()
        return real(encoder, chunk, dev, amp=amp)

    def no_memory(encoder, chunk, dev, *, amp):  # type: ignore[no-untyped-def]
        raise oom()

    with (
        BackgroundServer(index, device="cpu", watch_interval=None) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = cohortsim_pb2_grpc.PatientSimilarityServiceStub(channel)
        normal = stub.SearchSimilar(request, timeout=120)
        monkeypatch.setattr(model, "_embed_batch", one_at_a_time)
        with caplog.at_level(logging.WARNING, logger="encoders.model"):
            backed_off = stub.SearchSimilar(request, timeout=120)
        monkeypatch.setattr(model, "_embed_batch", no_memory)
        with pytest.raises(grpc.RpcError) as info:
            stub.SearchSimilar(request, timeout=120)
        monkeypatch.setattr(model, "_embed_batch", real)
        again = stub.SearchSimilar(request, timeout=120)
    assert [n.study_uid for n in backed_off.neighbors] == [n.study_uid for n in normal.neighbors]
    assert [n.similarity for n in backed_off.neighbors] == pytest.approx(
        [n.similarity for n in normal.neighbors], abs=1e-5
    )
    assert max(sizes) > 1 and sizes[-1] == 1  # the TTA views were retried in smaller batches
    assert "retrying in batches of" in caplog.text
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in (info.value.details() or "")
    assert [n.study_uid for n in again.neighbors] == [n.study_uid for n in normal.neighbors]
