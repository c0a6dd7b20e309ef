"""Typed errors of the indexing package; the service maps each to one gRPC status."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The cohort store is missing, unreadable or inconsistent."""


class StoreFormatError(StoreError):
    """The store was written in an older format that this version cannot read volumes
    from; the message names the command that rebuilds it. ``reason`` is ``store_format``."""

    reason = "store_format"


class SnapshotError(RuntimeError):
    """An index snapshot is missing, incomplete or fails its checksums."""


class UnknownStudyError(LookupError):
    """A study id is not in the served index."""


class DimensionError(ValueError):
    """A query vector has the wrong dimension or non-finite values."""


class FilterError(ValueError):
    """A filter expression is malformed or names unknown columns."""


class ModelVersionError(ValueError):
    """Embeddings or an encoder come from another model version than the index."""


class QueryError(ValueError):
    """A query is malformed in some other way (k out of range, empty query...)."""


def describe_os_error(exc: OSError, action: str, path: object) -> str:
    """One line for a failed storage operation: what failed, on which path, the OS reason.

    ``action`` is e.g. "writing", "syncing", "renaming"; disk full and I/O errors are named
    as such so an operator knows whether to free space or check the disk.
    """
    import errno as _errno

    code = exc.errno
    if code in (_errno.ENOSPC, _errno.EDQUOT):
        what = "disk full (no space left on device)"
    elif code == _errno.EIO:
        what = "I/O error (the disk or file system reported a failure)"
    elif code == _errno.EROFS:
        what = "read-only file system"
    else:
        what = exc.strerror or type(exc).__name__
    return f"{what} while {action} {path}"


class StoreWriteError(StoreError):
    """A write to the cohort store (or a build checkpoint) failed: disk full, I/O error...

    ``errno`` and ``path`` say what failed where. The store keeps its previous state: the
    batch being written was not committed (re-run once the cause is fixed).
    """

    def __init__(self, message: str, *, path: object = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class SnapshotWriteError(SnapshotError):
    """Writing or publishing an index version failed: disk full, I/O error...

    ``errno`` and ``path`` say what failed where. ``CURRENT`` still names the version it
    named before, unless the message says the new version was published.
    """

    def __init__(self, message: str, *, path: object = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno
