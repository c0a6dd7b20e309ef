"""Typed errors of the PACS inflow; the service maps each kind to one gRPC status."""

from __future__ import annotations

from typing import Literal

PacsErrorKind = Literal["not_found", "unavailable", "deadline", "unusable", "config"]


class PacsError(RuntimeError):
    """A PACS call failed.

    ``kind`` says how (``not_found``: no such study; ``unavailable``: the PACS is down or
    answered an error; ``deadline``: it answered too slowly; ``unusable``: the study has
    no image this server can read; ``config``: a bad URL, credential or CA file);
    ``reason`` is a stable snake_case code; the message names the PACS by its URL (never
    a study or patient).
    """

    def __init__(self, kind: PacsErrorKind, reason: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason


def pacs_missing(package: str) -> PacsError:
    """The error for a missing optional package of the ``pacs`` extra."""
    return PacsError(
        "config",
        "pacs_extra_missing",
        f"{package} is not installed; install cohortsim with the pacs extra "
        "(pip install 'cohortsim[pacs]')",
    )
