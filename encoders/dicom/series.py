"""Series choice: which series of a study is embedded (:class:`SeriesRule`).

Refusals by kind (screen captures, projections, reformats, annotation objects, burned-in
text, localizers), ImageType tiers (ORIGINAL\\PRIMARY, ORIGINAL\\SECONDARY, DERIVED) and
the ranking among qualifying series, with the note that says why one was taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from encoders.dicom.headers import _Header, _orientation_of
from encoders.dicom.values import _uid_of

_BURNED_IN_NOTE = "burned_in_annotation (BurnedInAnnotation YES)"


@dataclass(frozen=True)
class SeriesRule:
    """Which series of a study to use.

    A series qualifies when its modality is in ``modalities`` (``"*"`` admits any), it is
    not a localizer / scout (unless ``allow_localizer``), no file of it says
    BurnedInAnnotation YES (unless ``allow_burned_in``: text burned into the pixels may
    name the patient), its slices are at most ``max_slice_thickness_mm`` thick (when
    stated) and it has at least ``min_slices`` slices.

    Refused by name unless ``allow_non_diagnostic``: screen captures (the Secondary
    Capture SOP classes, ImageType SCREEN SAVE), maximum / minimum intensity projections
    (ImageType MIP / MINIP, enhanced Derived Pixel Contrast MAXIMUM / MINIMUM),
    projection images and reformats (ImageType MPR / REFORMATTED / CURVED / PROJECTION):
    their pixels are a rendering, not the acquired anatomy. Annotation objects (SEG,
    RTSTRUCT, SR...) are never an image series; ``encoders.regions`` reads them.

    ImageType ranks what qualifies: ORIGINAL\\PRIMARY first; ORIGINAL\\SECONDARY (images
    created after the examination, e.g. re-sent or re-archived) when no primary series
    qualifies; DERIVED axial series (e.g. a thick-slab or lossy re-encoded copy) when no
    original one does; ``Study.series_reason`` says which it took and why. With
    ``allow_derived`` all three compete on an equal footing and DERIVED need not be axial.
    With ``prefer_axial``, axial series win over others when there is one. Then the one
    with the most slices is chosen (ties: thinner slices, then lower SeriesNumber); if it
    cannot be read, the next one is tried and the reason is recorded in
    ``Study.series_reason``.
    """

    modalities: tuple[str, ...] = ("CT", "MR", "PT")
    allow_localizer: bool = False
    allow_derived: bool = False
    allow_burned_in: bool = False
    allow_non_diagnostic: bool = False
    prefer_axial: bool = True
    max_slice_thickness_mm: float = 5.0
    min_slices: int = 3

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("SeriesRule.modalities is empty; name at least one, e.g. ('CT',)")
        if self.min_slices < 1:
            raise ValueError(f"SeriesRule.min_slices must be >= 1, got {self.min_slices}")
        if not self.max_slice_thickness_mm > 0:
            raise ValueError(
                f"SeriesRule.max_slice_thickness_mm must be > 0, got {self.max_slice_thickness_mm}"
            )


DEFAULT_SERIES_RULE = SeriesRule()


def _series_name(headers: list[_Header]) -> str:
    num = headers[0].series_number
    return f"series #{num}" if num is not None else "series (no number)"


SECONDARY_CAPTURE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}
"""SOP classes of screen captures and scanned / converted images: never a diagnostic volume."""
ANNOTATION_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
}
"""Annotation objects read by ``encoders.regions`` (regions of interest of a study)."""
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
}
_NON_DIAGNOSTIC_TYPES: dict[str, str] = {
    "MIP": "maximum intensity projection (MIP)",
    "MAX IP": "maximum intensity projection (MIP)",
    "MAXIP": "maximum intensity projection (MIP)",
    "MINIP": "minimum intensity projection (MinIP)",
    "MIN IP": "minimum intensity projection (MinIP)",
    "MNIP": "minimum intensity projection (MinIP)",
    "PROJECTION": "projection image",
    "PROJECTION IMAGE": "projection image",
    "MPR": "multiplanar reformat (MPR)",
    "REFORMATTED": "reformatted image (MPR)",
    "REFORMAT": "reformatted image (MPR)",
    "CURVED": "curved reformat",
    "CPR": "curved reformat",
    "SCREEN SAVE": "screen capture",
    "SCREENSHOT": "screen capture",
    "SCREEN CAPTURE": "screen capture",
}
"""ImageType values that mark a rendering rather than acquired slices (any position)."""
_ENHANCED_PROJECTION = {"MAXIMUM": "maximum intensity projection (MIP)",
                        "MINIMUM": "minimum intensity projection (MinIP)"}  # fmt: skip

_TIER_NAMES = ("ORIGINAL\\PRIMARY", "ORIGINAL\\SECONDARY", "DERIVED")


def _sop_class(h: _Header) -> str:
    return _uid_of(h.ds, "SOPClassUID")


def annotation_kind(h: _Header) -> str | None:
    """'SEG' / 'RTSTRUCT' when the header is an annotation object ``encoders.regions`` reads."""
    kind = ANNOTATION_SOP_CLASSES.get(_sop_class(h))
    if kind is None and h.modality in ("SEG", "RTSTRUCT"):
        kind = h.modality
    return kind


def _refused_by_name(headers: list[_Header]) -> str | None:
    """Why a series is not a diagnostic image volume at all (by SOP class / ImageType)."""
    for h in headers:
        sop = _sop_class(h)
        if sop in SECONDARY_CAPTURE_SOP_CLASSES:
            return f"screen capture / converted image ({SECONDARY_CAPTURE_SOP_CLASSES[sop]} SOP class)"
        it = h.image_type
        for value in it:
            if value in _NON_DIAGNOSTIC_TYPES:
                return f"{_NON_DIAGNOSTIC_TYPES[value]} (ImageType {value})"
        if len(it) > 3 and it[3] in _ENHANCED_PROJECTION:
            return f"{_ENHANCED_PROJECTION[it[3]]} (ImageType {it[3]})"
    return None


def _not_an_image(headers: list[_Header]) -> str | None:
    kind = annotation_kind(headers[0])
    if kind is not None:
        return f"{kind} annotation, not an image (its regions are read by encoders.regions)"
    sop = _sop_class(headers[0])
    for prefix, what in _NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            return f"{what}, not an image"
    return None


def _tier(headers: list[_Header]) -> int:
    """0 ORIGINAL\\PRIMARY (or no ImageType), 1 ORIGINAL\\SECONDARY, 2 DERIVED (the worst file)."""
    worst = 0
    for h in headers:
        it = h.image_type
        if len(it) > 0 and it[0] == "DERIVED":
            return 2
        if len(it) > 1 and it[1] == "SECONDARY":
            worst = 1
    return worst


def _skip_reason(rule: SeriesRule, headers: list[_Header]) -> str | None:
    h0 = headers[0]
    not_image = _not_an_image(headers)
    if not_image is not None:
        return not_image
    if not rule.allow_non_diagnostic:
        refused = _refused_by_name(headers)
        if refused is not None:
            return refused
    allowed = tuple(m.upper() for m in rule.modalities)
    if "*" not in allowed and h0.modality not in allowed:
        return f"modality {h0.modality or '?'} not in {'/'.join(allowed)}"
    if not rule.allow_burned_in and any(h.burned_in for h in headers):
        return _BURNED_IN_NOTE
    types = set().union(*(h.image_type for h in headers))
    if not rule.allow_localizer and types & {"LOCALIZER", "SCOUT"}:
        return "localizer/scout"
    if not rule.allow_derived and _tier(headers) == 2 and _orientation_of(h0) != "axial":
        return f"derived {_orientation_of(h0)} image (only axial DERIVED series are used)"
    thick = [h.thickness for h in headers if h.thickness is not None]
    if thick and max(thick) > rule.max_slice_thickness_mm + 1e-6:
        return f"slices {max(thick):g} mm thick (> {rule.max_slice_thickness_mm:g} mm)"
    n = sum(h.n_frames for h in headers)
    if n < rule.min_slices:
        return f"{n} slice{'s' if n != 1 else ''} (< {rule.min_slices})"
    return None


def _rank_series(
    rule: SeriesRule, series: dict[str, list[_Header]]
) -> tuple[list[list[_Header]], list[str]]:
    """Qualifying series, best first, and one note per skipped series."""
    qualifying: list[list[_Header]] = []
    skipped: list[str] = []
    for headers in series.values():
        why = _skip_reason(rule, headers)
        if why is None:
            qualifying.append(headers)
        else:
            skipped.append(f"{_series_name(headers)}: {why}")
    if rule.prefer_axial and qualifying:
        axial = [s for s in qualifying if _orientation_of(s[0]) == "axial"]
        if axial and len(axial) < len(qualifying):
            for s in qualifying:
                if s not in axial:
                    skipped.append(
                        f"{_series_name(s)}: {_orientation_of(s[0])}, an axial series exists"
                    )
            qualifying = axial

    def key(headers: list[_Header]) -> tuple[int, int, float, int]:
        thick = [h.thickness for h in headers if h.thickness is not None]
        num = headers[0].series_number
        return (
            0 if rule.allow_derived else _tier(headers),
            -sum(h.n_frames for h in headers),
            max(thick) if thick else math.inf,
            num if num is not None else 1 << 30,
        )

    qualifying.sort(key=key)
    return qualifying, skipped


def _tier_note(chosen: list[_Header], candidates: list[list[_Header]], rule: SeriesRule) -> str:
    """What ``series_reason`` says about the chosen series' ImageType when not primary."""
    tier = _tier(chosen)
    if tier == 0:
        return ""
    name = _TIER_NAMES[tier]
    what = (
        "images created after the examination, e.g. re-sent or re-archived"
        if tier == 1
        else "images derived from the acquired ones, e.g. re-formatted or lossy re-encoded"
    )
    if rule.allow_derived:
        return f"{name} ({what}), admitted as equal by the series rule"
    better = [c for c in candidates if _tier(c) < tier]
    why = (
        f"the {_TIER_NAMES[min(_tier(c) for c in better)]} series could not be read"
        if better
        else f"no {' or '.join(_TIER_NAMES[:tier])} series qualifies"
    )
    return f"{name} ({what}), used because {why}"
