"""The backend table of indexing.searchers: which engine a load asks for, in order, and
that the table never probes CUDA (importing torch) for a CPU load."""

from __future__ import annotations

import pytest

import indexing.searchers as searchers
from indexing.searchers import NO_GPU, NO_TORCH_CUDA, BackendWant, choose_backends


def want(device: str, flat: bool, exact_backend: str = "auto", *, faiss_gpus: bool = False,
         cuda: bool = False) -> BackendWant:
    w = BackendWant(flat=flat, device=device, exact_backend=exact_backend, faiss_gpus=faiss_gpus)
    w.__dict__["cuda"] = cuda  # what the host's CUDA probe would answer
    return w


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        (want("cpu", True), ["blas"]),
        (want("cpu", True, "faiss"), ["faiss"]),
        (want("cpu", True, "torch"), ["torch-cpu"]),
        (want("cpu", False), ["faiss"]),
        (want("cpu", False, "blas"), ["faiss"]),  # blas / torch engines serve exact kinds only
        (want("auto", True), ["blas"]),
        (want("auto", True, cuda=True), ["torch-cuda"]),
        (want("auto", True, faiss_gpus=True, cuda=True), ["faiss-gpu", "torch-cuda"]),
        (want("auto", True, faiss_gpus=True), ["faiss-gpu", "blas"]),
        (want("auto", False, faiss_gpus=True), ["faiss-gpu", "faiss"]),
        (want("gpu", True, "blas", cuda=True), ["blas"]),
        (want("gpu", True, "torch"), [NO_TORCH_CUDA]),
        (want("gpu", True, "torch", cuda=True), ["torch-cuda"]),
        (want("gpu", True, "faiss", cuda=True), [NO_GPU]),
        (want("gpu", False, cuda=True), [NO_GPU]),
        (want("gpu", False, faiss_gpus=True), ["faiss-gpu", NO_GPU]),
    ],
)
def test_backend_table(w: BackendWant, expected: list[str]) -> None:
    assert choose_backends(w) == expected


@pytest.mark.parametrize("exact_backend", ["auto", "blas", "faiss", "torch"])
@pytest.mark.parametrize("flat", [True, False])
def test_a_cpu_load_never_probes_cuda(monkeypatch: pytest.MonkeyPatch, exact_backend: str, flat: bool) -> None:
    def probe() -> bool:
        raise AssertionError("CUDA probed for a CPU load")

    monkeypatch.setattr(searchers, "cuda_visible", probe)
    w = BackendWant(flat=flat, device="cpu", exact_backend=exact_backend, faiss_gpus=True)
    assert choose_backends(w)[-1] in ("blas", "faiss", "torch-cpu")
