"""Typed errors of the indexing package; the service maps each to one gRPC status."""

from __future__ import annotations


class StoreError(RuntimeError):
    """The cohort store is missing, unreadable or inconsistent."""


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
