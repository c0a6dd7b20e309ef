"""GPU faults, injected on the CPU: the torch exact search backs off to smaller
query chunks, then to a CPU copy of the database, when the device runs out of memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from indexing.exact import BlasExactIndex, TorchExactIndex


def oom() -> torch.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")


@pytest.mark.parametrize("fits", [2, 0])
def test_torch_search_backs_off_then_uses_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fits: int
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    allowed = rng.random(500) < 0.5
    expected = BlasExactIndex(x).search(q, 5, allowed=allowed)
    index = TorchExactIndex(x, device="cpu")
    real = index._search_chunk
    chunks: list[int] = []

    def limited(qc, kk, mask):  # type: ignore[no-untyped-def]
        chunks.append(len(qc))
        if len(qc) > fits:
            raise oom()
        return real(qc, kk, mask)

    monkeypatch.setattr(index, "_search_chunk", limited)
    with caplog.at_level(logging.WARNING, logger="indexing.exact"):
        sims, rows = index.search(q, 5, allowed=allowed)
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_allclose(sims, expected[0], atol=1e-5)
    assert "out of memory" in caplog.text
    if fits:
        assert max(chunks[-4:]) <= fits and "searching on the CPU" not in caplog.text
    else:
        assert chunks[-1] == 1 and "searching on the CPU" in caplog.text
