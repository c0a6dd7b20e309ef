"""GPU faults, injected on the CPU: an out-of-memory error while embedding
halves the batch, then moves the work to the CPU, with a warning, and never fails the call.

A real CUDA out-of-memory error is ``torch.OutOfMemoryError`` (``torch.cuda`` re-exports
it); here the encoder raises it on demand."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import encoders.model as model
from encoders.errors import EncoderError, EncoderOutOfMemoryError
from encoders.model import StudyEncoder, create_encoder, embed


@pytest.fixture(scope="module")
def enc() -> StudyEncoder:
    torch.manual_seed(0)
    return create_encoder("test_resnet", embedding_dim=8)


@pytest.fixture(scope="module")
def volumes(enc: StudyEncoder) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(0, 300, size=(5, *enc.spec.shape)).astype(np.float32)


def oom() -> torch.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_out_of_memory_halves_the_batch(
    enc: StudyEncoder, volumes: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference = embed(enc, volumes, batch_size=4)
    real = model._embed_batch
    sizes: list[int] = []

    def fits_two(encoder, chunk, dev, *, amp):  # type: ignore[no-untyped-def]
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise oom()
        return real(encoder, chunk, dev, amp=amp)

    monkeypatch.setattr(model, "_embed_batch", fits_two)
    enc.train()
    with caplog.at_level(logging.WARNING, logger="encoders.model"):
        out = embed(enc, volumes, batch_size=4)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert sizes == [4, 2, 2, 1]  # 4 -> 2, then the rest at 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "out of memory embedding 4 studies at once on cpu; retrying in batches of 2"
    ]
    assert enc.training  # its train/eval mode is restored


def test_out_of_memory_at_one_study_moves_to_the_cpu(
    enc: StudyEncoder, volumes: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A "GPU" that cannot hold even one study: the studies are embedded on the CPU."""
    reference = embed(enc, volumes[:3], batch_size=4)
    real_batch, real_place = model._embed_batch, model._place
    devices: list[str] = []

    def gpu_always_full(encoder, chunk, dev, *, amp):  # type: ignore[no-untyped-def]
        devices.append(dev.type)
        if dev.type == "cuda":
            raise oom()
        return real_batch(encoder, chunk, dev, amp=amp)

    def place(encoder, dev):  # type: ignore[no-untyped-def]
        return dev if dev.type == "cuda" else real_place(encoder, dev)  # no real GPU here

    monkeypatch.setattr(model, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(model, "_embed_batch", gpu_always_full)
    monkeypatch.setattr(model, "_place", place)
    with caplog.at_level(logging.WARNING, logger="encoders.model"):
        out = embed(enc, volumes[:3], batch_size=4, device="cuda")
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert devices == ["cuda", "cuda", "cuda", "cpu", "cpu", "cpu"]  # 4 -> 2 -> 1 -> CPU
    assert any("embedding on the CPU instead" in r.getMessage() for r in caplog.records)


def test_encoder_that_does_not_fit_on_the_gpu_stays_on_the_cpu(
    enc: StudyEncoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_to = enc.to

    def to(*args, **kwargs):  # type: ignore[no-untyped-def]
        if any(isinstance(a, torch.device) and a.type == "cuda" for a in args):
            raise oom()
        return real_to(*args, **kwargs)

    monkeypatch.setattr(enc, "to", to)
    with caplog.at_level(logging.WARNING, logger="encoders.model"):
        assert model._place(enc, torch.device("cuda")) == torch.device("cpu")
    assert "embedding on the CPU" in caplog.text
    assert next(enc.parameters()).device.type == "cpu"


def test_out_of_memory_on_the_cpu_is_a_clear_error(
    enc: StudyEncoder, volumes: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(encoder, chunk, dev, *, amp):  # type: ignore[no-untyped-def]
        raise oom()

    monkeypatch.setattr(model, "_embed_batch", full)
    with pytest.raises(EncoderOutOfMemoryError, match="out of memory embedding one study on the CPU"):
        embed(enc, volumes[:2], batch_size=2)
    assert issubclass(EncoderOutOfMemoryError, EncoderError)  # callers catching EncoderError still do
