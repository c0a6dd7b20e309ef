"""Image-to-patient mapping of a read study's volume grid (numpy only, no DICOM imports).

A :class:`~encoders.study.Study` carries the geometry of its sorted, canonically flipped
volume; this module maps between its voxel indices and patient coordinates.

Conventions
-----------
- Patient coordinates are DICOM's LPS, in mm, ordered ``(x, y, z)``: x grows to the
  patient's left, y to the posterior, z to the head.
- Voxel indices are ``(z, y, x)`` = (slice, row, column) of ``Study.volume``; integer
  indices are voxel centres (DICOM's ImagePositionPatient is the centre of the first
  pixel). Fractional indices are allowed.
- ``Study.origin`` ``(3,)``: the patient position (mm) of voxel ``(0, 0, 0)``.
- ``Study.direction`` ``(3, 3)``: row ``i`` is the unit vector in patient space along
  volume axis ``i`` (in ``(z, y, x)`` order, like ``Study.spacing``): row 0 the slice
  direction (the slice normal, signed so that the index grows along it), row 1 the
  column-direction cosines (down the rows), row 2 the row-direction cosines (along a row).
  For a plain axial CT read as-is this is ``[[0, 0, 1], [0, 1, 0], [1, 0, 0]]``.
- ``Study.slice_positions`` ``(z,)``: each slice's position along ``direction[0]``
  (``direction[0] . ImagePositionPatient``), increasing. Slice positions of a real series
  are regular only within tolerance; the mapping along z interpolates between the
  recorded positions (and extrapolates with the end steps), so it is exact at slice centres.

So ``patient = origin + (s(z) - s(0)) * direction[0] + y * dy * direction[1]
+ x * dx * direction[2]``, with ``s`` the slice positions and ``(dz, dy, dx)`` the spacing.
Gantry-tilted series (slice positions not along the normal) are not modelled: the
in-plane offset of each slice is taken from the first one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = [
    "AXIAL_DIRECTION",
    "HasGeometry",
    "direction_of",
    "patient_to_voxel",
    "slice_index_at",
    "voxel_to_patient",
]

AXIAL_DIRECTION = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
"""``Study.direction`` of an axial series whose rows run left-ward and columns back-ward."""


class HasGeometry(Protocol):
    """What the mapping needs from a study (``encoders.study.Study`` has it)."""

    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    spacing: tuple[float, float, float]
    slice_positions: tuple[float, ...]


def direction_of(study: HasGeometry) -> np.ndarray:
    """``(3, 3) float64``: rows are the patient-space unit vectors of volume axes z, y, x."""
    d = np.asarray(study.direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be 3x3, got shape {d.shape}")
    return d


def _positions(study: HasGeometry) -> np.ndarray:
    """Slice positions along ``direction[0]``; a regular grid from ``origin`` when absent."""
    pos = np.asarray(study.slice_positions, dtype=np.float64)
    if pos.size >= 2:
        return pos
    s0 = float(direction_of(study)[0] @ np.asarray(study.origin, dtype=np.float64))
    return np.array([s0, s0 + float(study.spacing[0])])


def _index_to_position(pos: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Slice index (fractional) -> position along the slice direction (mm)."""
    idx = np.arange(pos.size, dtype=np.float64)
    out = np.interp(z, idx, pos)
    lo_step, hi_step = pos[1] - pos[0], pos[-1] - pos[-2]
    out = np.where(z < 0, pos[0] + z * lo_step, out)
    return np.where(z > pos.size - 1, pos[-1] + (z - (pos.size - 1)) * hi_step, out)


def _position_to_index(pos: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Position along the slice direction (mm) -> slice index (fractional)."""
    idx = np.arange(pos.size, dtype=np.float64)
    out = np.interp(s, pos, idx)
    lo_step, hi_step = pos[1] - pos[0], pos[-1] - pos[-2]
    out = np.where(s < pos[0], (s - pos[0]) / lo_step, out)
    return np.where(s > pos[-1], pos.size - 1 + (s - pos[-1]) / hi_step, out)


def voxel_to_patient(study: HasGeometry, zyx: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Voxel indices ``(..., 3)`` in ``(z, y, x)`` order -> patient LPS ``(..., 3)`` mm
    in ``(x, y, z)`` order (float64)."""
    v = np.asarray(zyx, dtype=np.float64)
    if v.shape[-1:] != (3,):
        raise ValueError(f"voxel indices must end in 3 (z, y, x), got shape {v.shape}")
    d = direction_of(study)
    pos = _positions(study)
    along = _index_to_position(pos, v[..., 0]) - pos[0]
    origin = np.asarray(study.origin, dtype=np.float64)
    _, dy, dx = (float(s) for s in study.spacing)
    return (
        origin
        + along[..., None] * d[0]
        + (v[..., 1] * dy)[..., None] * d[1]
        + (v[..., 2] * dx)[..., None] * d[2]
    )


def patient_to_voxel(study: HasGeometry, xyz: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Patient LPS ``(..., 3)`` mm in ``(x, y, z)`` order -> fractional voxel indices
    ``(..., 3)`` in ``(z, y, x)`` order (float64); the inverse of :func:`voxel_to_patient`.
    Round to the nearest integer for the voxel that holds the point."""
    p = np.asarray(xyz, dtype=np.float64)
    if p.shape[-1:] != (3,):
        raise ValueError(f"patient points must end in 3 (x, y, z), got shape {p.shape}")
    d = direction_of(study)
    pos = _positions(study)
    rel = p - np.asarray(study.origin, dtype=np.float64)
    # Solve rel = a*d0 + b*d1 + c*d2 (the axes are orthonormal within tolerance; solve
    # exactly anyway so that a slightly skewed header round-trips).
    coeff = np.linalg.solve(d.T, rel.reshape(-1, 3).T).T.reshape(p.shape)
    _, dy, dx = (float(s) for s in study.spacing)
    z = _position_to_index(pos, coeff[..., 0] + pos[0])
    return np.stack([z, coeff[..., 1] / dy, coeff[..., 2] / dx], axis=-1)


def slice_index_at(study: HasGeometry, position_mm: float, *, tolerance: float = 0.5) -> int | None:
    """The slice whose position along the slice direction is ``position_mm`` (within
    ``tolerance`` x the local slice step), or None when no slice lies there."""
    if len(study.slice_positions) < 1:
        return None
    pos = np.asarray(study.slice_positions, dtype=np.float64)
    i = int(np.argmin(np.abs(pos - position_mm)))
    step = float(study.spacing[0]) if pos.size < 2 else float(np.median(np.diff(pos)))
    return i if abs(pos[i] - position_mm) <= tolerance * abs(step) else None
