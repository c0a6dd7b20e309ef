"""Typed errors of the indexing package: :class:`encoders.errors.CohortsimError`s whose
class attributes give the gRPC status and reason the service answers with."""

from __future__ import annotations

from encoders.errors import CohortsimError


class StoreError(CohortsimError, RuntimeError):
    """The cohort store is missing, unreadable or inconsistent."""

    status = "UNAVAILABLE"
    default_reason = "INDEX_UNAVAILABLE"
    fallback_message = "no index is loaded"


class StoreFormatError(StoreError):
    """The store was written in an older format that this version cannot read volumes
    from; the message names the command that rebuilds it. ``reason`` is ``store_format``."""

    status = "FAILED_PRECONDITION"
    reason = "store_format"


class SnapshotError(CohortsimError, RuntimeError):
    """An index snapshot is missing, incomplete or fails its checksums."""

    status = "UNAVAILABLE"
    default_reason = "INDEX_UNAVAILABLE"
    fallback_message = "no index is loaded"


class UnknownStudyError(CohortsimError, LookupError):
    """A study id is not in the served index."""

    status = "NOT_FOUND"
    default_reason = "UNKNOWN_STUDY"
    fallback_message = "the study is not in the served index"


class DimensionError(CohortsimError, ValueError):
    """A query vector has the wrong dimension or non-finite values."""

    status = "INVALID_ARGUMENT"
    default_reason = "WRONG_DIMENSION"
    fallback_message = "the embedding has the wrong dimension"


class FilterError(CohortsimError, ValueError):
    """A filter expression is malformed or names unknown columns."""

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID_FILTER"
    fallback_message = "invalid filter"


class ModelVersionError(CohortsimError, ValueError):
    """Embeddings or an encoder come from another model version than the index."""

    status = "FAILED_PRECONDITION"
    default_reason = "MODEL_VERSION_MISMATCH"
    fallback_message = "the query comes from another model version than the index"


class QueryError(CohortsimError, ValueError):
    """A query is malformed in some other way (k out of range, empty query...)."""

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID_QUERY"
    fallback_message = "invalid query"


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
