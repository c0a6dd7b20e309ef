"""Typed errors of the encoders package; each message says what is wrong and what to do.

:class:`CohortsimError` is the base of every typed error of the project (encoders and
indexing); its class attributes say how each front end reports it, so the gRPC servicer
(``service/errors.py``) and the CLI (``service/cli/app.py``) read one table: the classes.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CohortsimError(Exception):
    """A typed, expected error: a one-line message for people and a stable reason.

    Class attributes (per subclass): ``status``, the gRPC status code name a remote caller
    gets; ``default_reason``, the UPPER_SNAKE_CASE reason when an instance has no
    ``reason`` of its own (``reason_prefix`` goes in front of either); ``fallback_message``
    for an empty message; ``public_message``, when set, replaces the message for remote
    callers (the text may name server files); ``exit_code``, the CLI's (2: bad input).
    """

    status: ClassVar[str] = "INTERNAL"
    default_reason: ClassVar[str] = "INTERNAL"
    reason_prefix: ClassVar[str] = ""
    fallback_message: ClassVar[str] = "internal error"
    public_message: ClassVar[str | None] = None
    exit_code: ClassVar[int] = 2
    reason: str | None = None  # an instance's own reason (snake_case or UPPER), if any

    @property
    def message(self) -> str:
        """The message on one line (a LookupError's first argument, not its repr)."""
        text = str(self.args[0]) if self.args else ""
        return " ".join(text.split()) or self.fallback_message

    @property
    def reason_code(self) -> str:
        """The UPPER_SNAKE_CASE reason programs branch on."""
        own = self.reason
        if isinstance(own, str) and own:
            code = own.strip().upper().replace("-", "_").replace(" ", "_")
        else:
            code = self.default_reason
        return self.reason_prefix + code


class DicomError(CohortsimError, ValueError):
    """A DICOM file or study cannot be used.

    ``reason`` is a short stable code (``not_dicom``, ``truncated``, ``no_pixel_data``,
    ``missing_tag``, ``inconsistent_geometry``, ``unsupported``, ``too_large``,
    ``burned_in_annotation``, ``no_usable_series``, ``missing_slices``, ``not_image``,
    ...) for programs; the message is for
    people and names the file by the path it was given, never by patient.
    """

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID"
    reason_prefix = "DICOM_"
    fallback_message = "the DICOM study cannot be used"
    reason: str

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with both arguments: the error crosses from a decode worker process
        return (type(self), (self.reason, *self.args[:1]), self.__dict__)


class EncoderError(CohortsimError, ValueError):
    """An encoder checkpoint or card is missing, corrupt or does not match."""

    status = "FAILED_PRECONDITION"
    default_reason = "ENCODER_UNUSABLE"
    fallback_message = "the encoder cannot be used"
    public_message = (
        "the index's encoder cannot be loaded on this server; rebuild the index with a "
        "valid encoder, or send an embedding instead of DICOM"
    )


class EncoderOutOfMemoryError(EncoderError):
    """Embedding ran out of memory even one study at a time on the CPU (after the GPU
    fallbacks of ``encoders.model.embed``): a resource limit, not a broken encoder."""

    status = "RESOURCE_EXHAUSTED"
    default_reason = "OUT_OF_MEMORY"
    public_message = (
        "the server ran out of memory embedding the study; retry later or send an "
        "embedding instead of DICOM"
    )


class RegionError(CohortsimError, ValueError):
    """A region source (regions CSV, LIDC reader XML, DICOM SEG / RTSTRUCT) cannot be used.

    ``reason`` is a short stable code (``not_found``, ``missing_column``, ``bad_row``,
    ``bad_xml``, ``wrong_study``, ``outside_study``, ``unreadable``, ...); the message
    names the file (and line) and never carries patient data.
    """

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID"
    reason_prefix = "REGION_"
    fallback_message = "the region source cannot be used"
    reason: str

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
