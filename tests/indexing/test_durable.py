"""indexing.durable: the one atomic-write / fsync / sha256 / lock module."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from indexing.durable import AtomicWriteFailure, exclusive_lock, sha256_file, write_atomic


def test_write_atomic_names_by_checksum_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = write_atomic(
        tmp_path / "x.bin",
        lambda fh: fh.write(b"payload"),
        name_with_checksum=lambda digest: tmp_path / f"x.{digest}.bin",
    )
    digest = hashlib.sha256(b"payload").hexdigest()
    assert final == tmp_path / f"x.{digest}.bin" and sha256_file(final) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "CURRENT"
    write_atomic(path, lambda fh: fh.write("v1\n"), mode="w")

    def fail(fh: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(AtomicWriteFailure) as info:
        write_atomic(path, fail, mode="w")
    assert info.value.step == "writing" and not info.value.in_place
    assert path.read_text() == "v1\n" and [p.name for p in tmp_path.iterdir()] == ["CURRENT"]
    with exclusive_lock(tmp_path / ".lock"):
        assert (tmp_path / ".lock").exists()


def test_tombstones_do_not_import_the_store() -> None:
    # the store imports tombstones; tombstones write through durable, not through the store
    code = "import sys, indexing.tombstones; assert 'indexing.store' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
