"""Disk full (ENOSPC) and I/O errors (EIO) at the N-th storage operation.

N is swept over every distinct step of an ingest and of an index build (each file
creation, fsync, rename, link and mkdir, and the first and last write of each file;
``benchmarks/chaos_storage.py`` tries every single write). Each fault must give a
``StoreWriteError`` / ``SnapshotWriteError`` whose message says "disk full" or "I/O error"
and names the path, leave the previous store and served version intact and loadable with
nothing half-written in sight, and the same command re-run afterwards must finish.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from storage_chaos import FaultPlan, ForkRunner, Workload, fault_sweep, raise_oserror

from indexing.errors import SnapshotWriteError, StoreWriteError
from indexing.snapshot import current_version, load_snapshot, publish
from indexing.store import CohortStore


@pytest.fixture(scope="module")
def runner(chaos_workload: Workload) -> ForkRunner:
    with ForkRunner(chaos_workload) as runner:
        yield runner  # type: ignore[misc]


def test_fault_sweep_over_an_ingest(runner: ForkRunner, tmp_path: Path) -> None:
    """ENOSPC or EIO (in turn) at every step of an ingest batch (lock, create, first and last
    write, fsync, rename, folder fsync)."""
    stats = fault_sweep("ingest", runner.workload, tmp_path, alternate=True)
    assert stats.failures == []
    assert stats.points >= 6 and stats.typed_errors == stats.runs == stats.points


def test_fault_sweep_over_a_build(runner: ForkRunner, tmp_path: Path) -> None:
    """ENOSPC or EIO (in turn) at 8 steps spread over a rebuild (checkpoint shards, index,
    metadata, encoder copy, manifest, fsyncs, renames, CURRENT)."""
    stats = fault_sweep("build", runner.workload, tmp_path, limit=8, alternate=True)
    assert stats.failures == []
    assert stats.points == 8 and stats.typed_errors == stats.runs == 8


def test_publish_failure_keeps_current_and_says_so(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa

    from indexing.snapshot import build_snapshot

    meta = pa.table({"patient_id": [f"P-{i}" for i in range(20)], "study_uid": [f"S-{i}" for i in range(20)]})
    vecs = np.random.default_rng(0).normal(size=(20, 8))
    v1 = build_snapshot(tmp_path, vecs, meta, model_version="m")
    v2 = build_snapshot(tmp_path, vecs[::-1].copy(), meta, model_version="m")
    publish(tmp_path, v1)
    with FaultPlan(tmp_path, at=1, action=raise_oserror(errno.ENOSPC)), pytest.raises(
        SnapshotWriteError, match=rf"disk full .*CURRENT.*nothing was published, version {v1} is still served"
    ):
        publish(tmp_path, v2)
    assert current_version(tmp_path) == v1 and load_snapshot(tmp_path, device="cpu").version == v1
    assert not list(tmp_path.glob(".CURRENT*"))


def test_store_write_error_is_typed(tmp_path: Path) -> None:
    from indexing.store import StudyRecord

    store = CohortStore(tmp_path / "s", create=True)
    rec = StudyRecord(patient_id="P-1", study_uid="S-1", volume=np.zeros((2, 4, 4), np.int16))
    with FaultPlan(tmp_path, at=3, action=raise_oserror(errno.EIO)) as plan, pytest.raises(
        StoreWriteError, match=r"I/O error .* while writing .*part-.*previous state is intact"
    ) as err:
        store.add_studies([rec])
    assert plan.fired is not None and err.value.errno == errno.EIO
    assert store.study_uids() == set() and not list((tmp_path / "s" / "studies").iterdir())
    assert store.add_studies([rec]) == 1


