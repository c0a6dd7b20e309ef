"""The machine-readable parts of a gRPC error status, for servers and clients alike.

A failed cohortsim call carries a ``google.rpc.Status`` in its ``grpc-status-details-bin``
trailer with an ``ErrorInfo`` (domain :data:`DOMAIN`, an UPPER_SNAKE_CASE reason) and, when
it may be retried later, a ``RetryInfo``. This module reads them back; it imports only
grpc's and Google's protobuf types, so the thin client (``clients/python``) can use it
without the server's dependencies.
"""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2, status_pb2

DOMAIN = "cohortsim.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _status_details(trailing: Any) -> list[Any]:
    """The ``google.rpc.Status`` details in a call's trailing metadata (the
    ``grpc-status-details-bin`` entry); empty when there is none or it is unreadable."""
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            return list(status_pb2.Status.FromString(value).details)
        except Exception:
            return []
    return []


def reason_from_trailing(trailing: Any) -> str | None:
    """The ``google.rpc.ErrorInfo`` reason carried in a call's trailing metadata, or None."""
    for detail in _status_details(trailing):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason or None
    return None


def error_metadata_from_trailing(trailing: Any) -> dict[str, str]:
    """The ``google.rpc.ErrorInfo`` metadata carried in a call's trailing metadata ({} if none)."""
    for detail in _status_details(trailing):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return dict(info.metadata)
    return {}


def retry_delay_from_trailing(trailing: Any) -> float | None:
    """The ``google.rpc.RetryInfo`` delay (seconds) in a call's trailing metadata, or None."""
    for detail in _status_details(trailing):
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None

__all__ = [
    "DOMAIN",
    "STATUS_DETAILS_KEY",
    "error_metadata_from_trailing",
    "reason_from_trailing",
    "retry_delay_from_trailing",
]
