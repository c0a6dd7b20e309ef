"""Tombstones: patients withdrawn from the cohort, honoured before any file is rewritten.

A tombstone file is a small Parquet table of patient pseudonyms (``patient_id``) and when
each was withdrawn (``deleted_at``). One lives in the cohort store
(``STORE/tombstones.parquet``: the store's reads skip those patients at once, and
:meth:`indexing.store.CohortStore.compact` removes their rows physically) and one in each
index folder (``INDEX_DIR/tombstones.parquet``: a serving snapshot drops their rows from
every answer on the next call; the next rebuild leaves them out of the index).

Writes are atomic (tmp + fsync + rename) under an advisory lock; readers cache the set
by the file's ``(inode, size, mtime)`` so checking it on every search costs one ``stat``.
Pseudonyms only; nothing here logs them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from indexing.durable import exclusive_lock, write_parquet_atomic
from indexing.errors import StoreError

TOMBSTONE_FILE = "tombstones.parquet"
TOMBSTONE_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("deleted_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

Signature = tuple[int, int, int] | None


def signature(path: Path) -> Signature:
    """``(inode, size, mtime_ns)`` of the file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_table(path: Path) -> pa.Table:
    """The tombstone table at ``path`` (empty when there is none)."""
    if not path.exists():
        return TOMBSTONE_SCHEMA.empty_table()
    try:
        return pq.read_table(path, schema=TOMBSTONE_SCHEMA)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(
            f"cannot read tombstones {path}: {exc}; restore it from backup (deleted patients "
            "would otherwise reappear)"
        ) from exc


def read_tombstones(path: Path) -> frozenset[str]:
    """The withdrawn patient pseudonyms listed at ``path``."""
    return frozenset(read_table(path).column("patient_id").to_pylist())


def add_tombstones(path: Path, patient_ids: Iterable[str]) -> int:
    """Add pseudonyms to the tombstone file at ``path``; returns how many were new."""
    ids = [str(p) for p in patient_ids]
    if any(not p for p in ids):
        raise StoreError("cannot delete an empty patient id")
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        old = read_table(path)
        known = set(old.column("patient_id").to_pylist())
        new = sorted({p for p in ids if p not in known})
        if not new:
            return 0
        now = datetime.now(UTC)
        added = pa.table(
            {"patient_id": new, "deleted_at": [now] * len(new)}, schema=TOMBSTONE_SCHEMA
        )
        write_parquet_atomic(pa.concat_tables([old, added]).combine_chunks(), path)
    return len(new)


class TombstoneWatch:
    """The tombstone set at ``path``, re-read only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._state: tuple[Signature, frozenset[str]] = (None, frozenset())

    def current(self) -> tuple[Signature, frozenset[str]]:
        """``(signature, pseudonyms)``; one ``stat`` when nothing changed."""
        sig = signature(self.path)
        state = self._state
        if sig == state[0]:
            return state
        with self._lock:
            if self._state[0] != sig:
                ids = read_tombstones(self.path) if sig is not None else frozenset()
                # the signature taken before reading: a change during the read is seen next time
                self._state = (sig, ids)
            return self._state


__all__ = [
    "TOMBSTONE_FILE",
    "TOMBSTONE_SCHEMA",
    "TombstoneWatch",
    "add_tombstones",
    "read_table",
    "read_tombstones",
    "signature",
]
