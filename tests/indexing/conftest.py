"""Shared fixtures of the storage reliability tests."""

from __future__ import annotations

import os

import pytest
from storage_chaos import Workload

# the Ray tests start local clusters: bind them to 127.0.0.1, not the machine's network
# address (indexing.distributed.loopback_only; Ray reads it when first imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def chaos_workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    """4 synthetic patients (two halves), a test_resnet encoder: made once per session."""
    return Workload(tmp_path_factory.mktemp("chaos-workload"), patients=4).prepare()
