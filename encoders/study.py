"""The decoded study and a rejected file: plain types shared by the DICOM reader,
preprocessing, the input grid and ROI code (no pydicom import)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from encoders.geometry import AXIAL_DIRECTION


@dataclass
class Rejection:
    """A file :func:`scan_folder` could not use; ``reason`` is the human message."""

    path: str
    reason: str


@dataclass
class Study:
    """One decoded study (one chosen series of it).

    ``volume`` is ``(z, y, x) float32``: HU for CT (values below -1024 clipped to -1024),
    modality-rescaled raw values otherwise, sorted along the slice normal. ``spacing`` is
    ``(z, y, x)`` in mm. ``units``: ``HU`` (CT), ``SUVbw`` (PET converted to SUV body
    weight), ``PT_raw`` (PET whose tags do not allow SUV), ``MR_raw``, ``raw``;
    :func:`preprocess` normalises by it. ``patient_id`` / ``study_uid`` are raw (pseudonymise before
    storing); without a PatientID, ``patient_id`` is ``"NO-PATIENT-ID:<study_uid>"`` so
    such studies never merge into one patient. ``acquisition`` holds only non-identifying acquisition tags, as strings.

    Geometry (see :mod:`encoders.geometry` for the conventions and the mapping):
    ``origin`` ``(x, y, z)`` mm is the patient position of voxel ``(0, 0, 0)``;
    ``direction`` ``(3, 3)``: row ``i`` is the patient-space unit vector along volume
    axis ``i`` (z, y, x); ``slice_positions`` ``(z,)`` mm along ``direction[0]``,
    increasing; ``slice_uids`` ``(z,)`` the SOPInstanceUID each slice came from (raw; in
    memory only); ``in_plane_flips`` ``(y, x)``: the source images' rows / columns were
    reversed to reach the canonical orientation, so source pixel ``(row r, column c)`` is
    volume ``(rows - 1 - r if flipped else r, ...)``; ``frame_of_reference_uid`` (raw).
    ``ignored_files``: files of the study left out without sinking it (damaged duplicate
    copies of an instance that is also present intact), each with why.
    """

    study_uid: str
    patient_id: str
    series_uid: str
    modality: str
    volume: np.ndarray
    spacing: tuple[float, float, float]
    acquisition: dict[str, str] = field(default_factory=dict)
    study_date: _dt.date | None = None
    series_reason: str = ""
    units: str = ""
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION
    slice_positions: tuple[float, ...] = ()
    slice_uids: tuple[str, ...] = ()
    in_plane_flips: tuple[bool, bool] = (False, False)
    frame_of_reference_uid: str = ""
    ignored_files: list[Rejection] = field(default_factory=list)
