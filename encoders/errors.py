"""Typed errors of the encoders package; each message says what is wrong and what to do."""

from __future__ import annotations


class DicomError(ValueError):
    """A DICOM file or study cannot be used.

    ``reason`` is a short stable code (``not_dicom``, ``truncated``, ``no_pixel_data``,
    ``missing_tag``, ``inconsistent_geometry``, ``unsupported``, ``too_large``,
    ``burned_in_annotation``, ``no_usable_series``, ``missing_slices``, ``not_image``,
    ...) for programs; the message is for
    people and names the file by the path it was given, never by patient.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EncoderError(ValueError):
    """An encoder checkpoint or card is missing, corrupt or does not match."""


class EncoderOutOfMemoryError(EncoderError):
    """Embedding ran out of memory even one study at a time on the CPU (after the GPU
    fallbacks of ``encoders.model.embed``): a resource limit, not a broken encoder."""


class RegionError(ValueError):
    """A region source (regions CSV, LIDC reader XML, DICOM SEG / RTSTRUCT) cannot be used.

    ``reason`` is a short stable code (``not_found``, ``missing_column``, ``bad_row``,
    ``bad_xml``, ``wrong_study``, ``outside_study``, ``unreadable``, ...); the message
    names the file (and line) and never carries patient data.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
