"""Shared fixtures of the storage reliability tests."""

from __future__ import annotations

import pytest
from storage_chaos import Workload


@pytest.fixture(scope="session")
def chaos_workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    """4 synthetic patients (two halves), a test_resnet encoder: made once per session."""
    return Workload(tmp_path_factory.mktemp("chaos-workload"), patients=4).prepare()
