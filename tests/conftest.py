"""Shared test configuration: GPU tests skip themselves where no CUDA device is visible."""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _date_anchors_in_tmp(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Ingests under test keep their site-side date anchors (encoders.deid.DateAnchors)
    in a temporary folder, never in ~/.config/cohortsim."""
    from encoders.deid import ANCHORS_ENV_VAR

    patch = pytest.MonkeyPatch()
    patch.setenv(ANCHORS_ENV_VAR, str(tmp_path_factory.mktemp("anchors") / "date-anchors.json"))
    yield
    patch.undo()
