"""Durable files: atomic writes, fsync, sha256 and advisory locks, in one place.

The cohort store, the tombstone file and index snapshots all publish a file the same way:
write a temporary file in the target folder, flush and fsync it, optionally name the final
file by its sha256, ``os.replace`` it into place, then fsync the folder so the rename
survives a crash. A reader therefore sees the old file or the new one, never half of one.
Writers of one file serialise on an ``flock`` of a lock file beside it.

Errors: :func:`write_atomic` raises :class:`AtomicWriteFailure` (the OSError, the step
that failed and whether the file is already in place), which each caller turns into its
own typed error (``StoreWriteError``, ``SnapshotWriteError``) with its own advice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from indexing.errors import StoreWriteError, describe_os_error


class AtomicWriteFailure(Exception):
    """An OSError during :func:`write_atomic`.

    ``step``: "writing", "syncing", "reading back", "renaming into place" or "syncing the
    folder"; ``tmp``: the temporary file; ``path``: the final path (the checksum name once
    known); ``in_place``: True when only the folder fsync failed (the new file is there but
    may not survive a power loss); otherwise nothing changed.
    """

    def __init__(self, error: OSError, step: str, tmp: Path, path: Path, *, in_place: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.step = step
        self.tmp = tmp
        self.path = path
        self.in_place = in_place


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written earlier (e.g. by a library that does not sync)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_atomic(
    path: Path,
    write: Callable[[IO[Any]], object],
    *,
    mode: str = "wb",
    name_with_checksum: Callable[[str], Path] | None = None,
) -> Path:
    """Publish a file at ``path`` atomically; returns the final path.

    ``write(fh)`` fills a temporary file in the same folder (opened with ``mode``), which
    is flushed, fsynced and renamed into place, then the folder is fsynced. With
    ``name_with_checksum``, the final name is ``name_with_checksum(sha256 hex)`` of the
    written bytes (one rename publishes the file and its checksum). An OSError becomes
    :class:`AtomicWriteFailure`; the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    final = path
    step = "writing"
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            step = "syncing"
            os.fsync(fh.fileno())
        if name_with_checksum is not None:
            step = "reading back"
            final = name_with_checksum(sha256_file(tmp))
        step = "renaming into place"
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise AtomicWriteFailure(exc, step, tmp, final, in_place=False) from exc
        raise
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        raise AtomicWriteFailure(exc, "syncing the folder", tmp, final, in_place=True) from exc
    return final


def write_parquet_atomic(
    table: pa.Table, path: Path, *, name_with_checksum: Callable[[str], Path] | None = None
) -> Path:
    """Write ``table`` (zstd, page checksums) to ``path`` with :func:`write_atomic`.

    Returns the final path. An OSError (disk full, I/O error...) becomes
    :class:`StoreWriteError` naming the path; nothing is left behind but the old state,
    except when only the final folder fsync fails (the message then says the file is in
    place but may not survive a power loss).
    """

    def write(fh: IO[Any]) -> None:
        pq.write_table(table, fh, compression="zstd", write_page_checksum=True)

    try:
        return write_atomic(path, write, name_with_checksum=name_with_checksum)
    except AtomicWriteFailure as failure:
        exc = failure.error
        if failure.in_place:
            raise StoreWriteError(
                describe_os_error(exc, failure.step, failure.path.parent)
                + f"; {failure.path.name} is in place but may not survive a power loss",
                path=failure.path.parent,
                errno=exc.errno,
            ) from exc
        raise StoreWriteError(
            describe_os_error(exc, failure.step, failure.path) + "; nothing was written, the "
            "previous state is intact (fix the cause and run the command again)",
            path=failure.path,
            errno=exc.errno,
        ) from exc


@contextlib.contextmanager
def opened_for_lock(path: Path) -> Iterator[IO[str]]:
    """``open(path, "a")`` for an advisory lock; a failure is a :class:`StoreWriteError`."""
    try:
        fh = open(path, "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise StoreWriteError(
            describe_os_error(exc, "creating the lock file", path) + "; nothing was written",
            path=path,
            errno=exc.errno,
        ) from exc
    with fh:
        yield fh


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created when missing)."""
    with opened_for_lock(path) as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


__all__ = [
    "AtomicWriteFailure",
    "exclusive_lock",
    "fsync_dir",
    "fsync_file",
    "opened_for_lock",
    "sha256_file",
    "write_atomic",
    "write_parquet_atomic",
]
