"""Slice geometry from the headers: positions along the slice normal, orientation,
spacing, multi-frame stacks, duplicates and missing slices.

Works out, before any pixel is decoded, which frames form the volume and in which order,
and the patient-space origin / direction of the sorted grid (conventions and the
voxel <-> patient mapping: :mod:`encoders.geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from encoders.dicom.headers import _fg_value, _Header
from encoders.dicom.series import _series_name
from encoders.dicom.values import _float, _floats, _get, _int, _numeric_text, _text
from encoders.errors import DicomError
from encoders.geometry import AXIAL_DIRECTION

_IDENTITY_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class _Frame:
    header: _Header
    frame: int  # index within its file
    position: np.ndarray  # (3,) mm
    iop: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,) row, column spacing in mm
    slope: float
    intercept: float


def _positions(h: _Header, iop: np.ndarray, notes: list[str]) -> list[np.ndarray]:
    """One ImagePositionPatient per frame of a file."""
    ds, label = h.ds, h.label
    top = _floats(_get(ds, "ImagePositionPatient"), 3)
    if h.n_frames == 1:
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if top is None and per_frame is not None and len(per_frame) > 0:
            items = _get(per_frame[0], "PlanePositionSequence")
            if items is not None and len(items) > 0:
                top = _floats(_get(items[0], "ImagePositionPatient"), 3)
        if top is None:
            raise DicomError(
                "missing_tag",
                f"{label}: ImagePositionPatient missing or malformed; cannot order the slices",
            )
        return [top]
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    found: list[np.ndarray | None] = []
    if per_frame is not None and len(per_frame) == h.n_frames:
        for item in per_frame:
            seq = _get(item, "PlanePositionSequence")
            found.append(
                _floats(_get(seq[0], "ImagePositionPatient"), 3)
                if seq is not None and len(seq)
                else None
            )
    if found and all(p is not None for p in found):
        return [p for p in found if p is not None]
    # Simple multi-frame: frames stacked along the normal from the first position.
    step = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
    if step is None or step <= 0:
        step = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    if step is None or step <= 0:
        raise DicomError(
            "missing_tag",
            f"{label}: multi-frame file without per-frame positions, SpacingBetweenSlices or "
            "SliceThickness; cannot place the frames",
        )
    origin = found[0] if found and found[0] is not None else top
    if origin is None:
        origin = np.zeros(3)
        notes.append("multi-frame without positions: origin assumed at 0")
    notes.append(f"multi-frame without per-frame positions: {step:g} mm steps assumed")
    normal = np.cross(iop[:3], iop[3:])
    return [origin + f * step * normal for f in range(h.n_frames)]


def _frame_stack_key(ds: Dataset, frame: int) -> tuple[str, str, str]:
    """(StackID, TemporalPositionIndex, echo time) of one frame of an enhanced object."""
    stack = _text(_fg_value(ds, frame, "FrameContentSequence", "StackID"), 16) or ""
    temporal = _text(_fg_value(ds, frame, "FrameContentSequence", "TemporalPositionIndex"), 16)
    echo = _text(_fg_value(ds, frame, "MREchoSequence", "EffectiveEchoTime"), 16)
    return stack, temporal or "", echo or ""


def _frames_to_keep(h: _Header, notes: list[str]) -> list[int]:
    """Frame indices of one stack of a multi-frame file.

    An enhanced CT / MR object may hold several stacks, temporal positions (phases) or
    echoes in one file (per-frame FrameContentSequence / MREchoSequence). One volume is
    one of them: the stack with the most frames (ties: the lowest key), said in the notes.
    """
    if h.n_frames == 1 or _get(h.ds, "PerFrameFunctionalGroupsSequence") is None:
        return list(range(h.n_frames))
    groups: dict[tuple[str, str, str], list[int]] = {}
    for f in range(h.n_frames):
        groups.setdefault(_frame_stack_key(h.ds, f), []).append(f)
    if len(groups) == 1:
        return list(range(h.n_frames))
    key = min(groups, key=lambda k: (-len(groups[k]), _natural(k)))
    what = ", ".join(
        f"{name} {value}"
        for name, value in zip(("stack", "temporal position", "echo time"), key, strict=True)
        if value
    )
    notes.append(
        f"multi-frame holds {len(groups)} stacks/phases/echoes; kept {what or 'the first'} "
        f"({len(groups[key])} of {h.n_frames} frames)"
    )
    return groups[key]


def _natural(key: tuple[str, ...]) -> tuple[tuple[float, str], ...]:
    """Sort key that orders numeric strings by value ("2" < "10")."""
    out = []
    for k in key:
        f = _float(k)
        out.append((f if f is not None else math.inf, k))
    return tuple(out)


def _frames_of(h: _Header, notes: list[str]) -> list[_Frame]:
    ds, label = h.ds, h.label
    iop0 = _floats(_fg_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if iop0 is None:
        if h.n_frames == 1:
            raise DicomError(
                "missing_tag",
                f"{label}: ImageOrientationPatient missing or malformed; cannot place the slice",
            )
        iop0 = np.asarray(_IDENTITY_IOP)
        notes.append("multi-frame without orientation: assumed axial")
    positions = _positions(h, iop0, notes)
    frames: list[_Frame] = []
    for f in _frames_to_keep(h, notes):
        iop = iop0
        if f > 0:
            iop = _floats(
                _fg_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
            )  # type: ignore[assignment]
            if iop is None:
                iop = iop0
        ps = _floats(_fg_value(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ps is None or not np.all(ps > 0):
            raise DicomError(
                "missing_tag",
                f"{label}: PixelSpacing missing, malformed or not positive; cannot size the slice",
            )
        raw_slope = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        raw_intercept = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        slope = 1.0 if raw_slope is None else _float(raw_slope)
        intercept = 0.0 if raw_intercept is None else _float(raw_intercept)
        if slope is None or slope == 0.0 or intercept is None:
            raise DicomError(
                "bad_rescale",
                f"{label}: RescaleSlope/RescaleIntercept are non-numeric or the slope is zero "
                f"(slope={_numeric_text(raw_slope)!r}, intercept={_numeric_text(raw_intercept)!r}); "
                "the pixel values cannot be converted to HU; re-export the series",
            )
        frames.append(_Frame(h, f, positions[f], iop, ps, slope, intercept))
    return frames


@dataclass
class _Geometry:
    frames: list[_Frame]  # in volume order (after sorting; duplicates kept, see groups)
    groups: list[list[int]]  # indices into frames sharing one position; first is kept
    spacing: tuple[float, float, float]
    flips: tuple[bool, bool]  # flip (y, x) axes to canonical orientation
    notes: list[str]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # patient mm of voxel (0, 0, 0)
    direction: tuple[tuple[float, float, float], ...] = AXIAL_DIRECTION  # rows: z, y, x axes
    positions: tuple[float, ...] = ()  # one per group, along direction[0], increasing


def _geometry(headers: list[_Header], notes: list[str]) -> _Geometry:
    first = headers[0].label
    where = f"{first} ({_series_name(headers)}, {len(headers)} files)"
    rows = {(_int(_get(h.ds, "Rows")), _int(_get(h.ds, "Columns"))) for h in headers}
    if len(rows) != 1:
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different Rows/Columns {sorted(rows, key=str)}; "
            "the series mixes image sizes, split it",
        )
    frames: list[_Frame] = []
    for h in headers:
        frames.extend(_frames_of(h, notes))
    iops = np.stack([f.iop for f in frames])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different ImageOrientationPatient; "
            "the series mixes orientations, split it",
        )
    pss = np.stack([f.pixel_spacing for f in frames])
    if np.abs(pss - pss[0]).max() > 1e-3 * max(1.0, float(pss[0].max())):
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: slices have different PixelSpacing; the series mixes fields of view, split it",
        )
    row_cos, col_cos = iops[0][:3], iops[0][3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-2
        or abs(np.linalg.norm(col_cos) - 1) > 1e-2
        or abs(float(row_cos @ col_cos)) > 1e-2
    ):
        raise DicomError(
            "inconsistent_geometry",
            f"{where}: ImageOrientationPatient is not two orthonormal directions; re-export the series",
        )
    normal = np.cross(row_cos, col_cos)
    # Canonical orientation: axis index grows along the dominant patient axis (LPS).
    dom = int(np.argmax(np.abs(normal)))
    descending = bool(normal[dom] < 0)
    dist = np.array([float(normal @ f.position) for f in frames])
    order = np.argsort(-dist if descending else dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]

    groups: list[list[int]] = []
    tol = 1e-2  # mm
    for i in range(len(frames)):
        if groups and abs(dist[i] - dist[groups[-1][0]]) < tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    unique = np.array([dist[g[0]] for g in groups])
    if len(unique) > 1:
        gaps = np.abs(np.diff(unique))
        dz = float(np.median(gaps))
        _check_regular(where, unique * (-1.0 if descending else 1.0), gaps, dz)
    else:
        step = _float(_fg_value(headers[0].ds, 0, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        dz = step or headers[0].thickness or 1.0
        notes.append(f"single slice: z spacing {dz:g} mm from the header")
    flips = tuple(
        bool(abs(v[int(np.argmax(np.abs(v)))]) > 0.8 and v[int(np.argmax(np.abs(v)))] < 0)
        for v in (col_cos, row_cos)
    )
    if descending or any(flips):
        axes = [n for n, on in zip(("z", "y", "x"), (descending, *flips), strict=True) if on]
        notes.append("flipped to canonical orientation along " + "/".join(axes))
    ps = frames[0].pixel_spacing
    n_rows, n_cols = next(iter(rows))
    axis_z = -normal if descending else normal
    axis_y = -col_cos if flips[0] else col_cos
    axis_x = -row_cos if flips[1] else row_cos
    origin = np.asarray(frames[0].position, dtype=np.float64).copy()
    if flips[0]:  # voxel row 0 is the source's last row
        origin += ((n_rows or 1) - 1) * float(ps[0]) * col_cos
    if flips[1]:
        origin += ((n_cols or 1) - 1) * float(ps[1]) * row_cos
    return _Geometry(
        frames=frames,
        groups=groups,
        spacing=(dz, float(ps[0]), float(ps[1])),
        flips=(flips[0], flips[1]),
        notes=notes,
        origin=_vec3(origin),
        direction=(_vec3(axis_z), _vec3(axis_y), _vec3(axis_x)),
        positions=tuple(float(axis_z @ frames[g[0]].position) for g in groups),
    )


def _vec3(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _check_regular(where: str, positions: np.ndarray, gaps: np.ndarray, dz: float) -> None:
    """Refuse a stack whose slice positions (mm, sorted) are not one regular grid.

    Gaps that are whole multiples (2x, 3x, ...) of the regular step while every other
    gap is one step are missing slices: refused ``missing_slices``, naming where the gap
    is (positions along the slice normal, mm; never an identifier). Anything else
    irregular (several stacks, variable spacing) is ``inconsistent_geometry``.
    """
    if gaps.max() <= 1.5 * dz and gaps.min() >= 0.5 * dz:
        return
    ratio = gaps / dz
    whole = np.abs(ratio - np.rint(ratio)) <= 0.1 * np.maximum(1.0, np.rint(ratio))
    at = np.flatnonzero(np.rint(ratio) >= 2)
    # Three or more wide steps in a row are a zone of coarser spacing, not lost slices.
    runs = np.split(at, np.flatnonzero(np.diff(at) != 1) + 1) if at.size else []
    zone = max((len(r) for r in runs), default=0) >= 3
    if gaps.min() >= 0.5 * dz and bool(np.all(whole)) and not zone:
        holes = [
            f"{positions[i]:.1f} to {positions[i + 1]:.1f} mm "
            f"({int(np.rint(ratio[i])) - 1} slice{'s' if np.rint(ratio[i]) > 2 else ''})"
            for i in at[:5]
        ]
        more = f" and {len(at) - 5} more gaps" if len(at) > 5 else ""
        missing = int(np.sum(np.rint(ratio[at]) - 1))
        raise DicomError(
            "missing_slices",
            f"{where}: {missing} slice{'s are' if missing != 1 else ' is'} missing from a "
            f"regular {dz:.3g} mm stack, between slice positions " + "; ".join(holes) + more
            + " along the slice normal; re-send the complete series",
        )
    raise DicomError(
        "inconsistent_geometry",
        f"{where}: slice spacing is irregular ({gaps.min():.3g}-{gaps.max():.3g} mm, "
        f"median {dz:.3g} mm); the series holds several stacks or "
        + ("changes its spacing part-way" if zone else "variable spacing"),
    )
