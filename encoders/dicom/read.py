"""``read_study``: one study from its files (paths or bytes) to a :class:`~encoders.study.Study`.

Two passes: headers only for every source (group by series, choose one by
:class:`~encoders.dicom.series.SeriesRule`, work out the geometry), then the pixel data
of the chosen series only. Damaged copies of instances present intact are set aside.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from encoders.dicom.headers import _acquisition, _fg_value, _Header, _orientation_of, _read_header
from encoders.dicom.modality import profile_for
from encoders.dicom.pixels import _check_size, _decode, _load_series
from encoders.dicom.reading import _guard, _label, _normalise_source, _quiet
from encoders.dicom.series import (
    _BURNED_IN_NOTE,
    DEFAULT_SERIES_RULE,
    SeriesRule,
    _not_an_image,
    _rank_series,
    _series_name,
    _tier_note,
)
from encoders.dicom.values import _UID_RE, _float, _get, _parse_date, _text, _uid_of
from encoders.errors import DicomError
from encoders.intensity import intensity_unit
from encoders.study import Rejection, Study

log = logging.getLogger(__name__)


def read_study(
    sources: Sequence[Path | bytes], *, series_rule: SeriesRule = DEFAULT_SERIES_RULE
) -> Study:
    """Decode one study from its files (paths, or raw bytes e.g. from a gRPC request).

    All sources must share one StudyInstanceUID; they are grouped by SeriesInstanceUID and
    one series is chosen by ``series_rule`` (ImageType tiers and refusals: see
    :class:`SeriesRule`; SEG / RTSTRUCT objects are set aside, see ``encoders.regions``).
    Sources sharing one SOPInstanceUID are copies of one instance: a damaged copy beside
    an intact one is left out and listed in ``Study.ignored_files``. Slices are sorted
    along the slice normal (``cross(row, col)`` of ImageOrientationPatient) by
    ``normal . ImagePositionPatient``, never by InstanceNumber; z spacing is the median
    gap. Identical duplicate slices are dropped; a gap of whole missing slices raises
    ``DicomError("missing_slices")`` naming the positions (mm); differing slices at one
    position, mixed orientations / sizes / pixel spacings or other irregular gaps raise
    ``DicomError("inconsistent_geometry")``. The study's geometry (origin, direction,
    slice positions) is set for :mod:`encoders.geometry`.

    Pixel values go through RescaleSlope / RescaleIntercept (HU for CT, clipped below at
    -1024). MR values are kept as rescaled raw floats: their scale is arbitrary per
    scanner, robust normalisation is a later step. Raises :class:`DicomError` only.
    """
    if isinstance(sources, str | bytes | os.PathLike):
        sources = [sources]  # type: ignore[list-item]
    items = [_normalise_source(s, i) for i, s in enumerate(sources)]
    if not items:
        raise DicomError("no_files", "read_study got no files; pass the files of one study")

    with _guard(_label(items[0], 0)), _quiet():
        return _read_study(items, series_rule)


_SALVAGE_BYTES = 64 << 10
"""Bytes of a damaged file read to recover its SOPInstanceUID (group 0008 comes first)."""


def _salvage_sop_uid(source: Path | bytes) -> str | None:
    """The SOPInstanceUID of a file whose header cannot be read in full (e.g. cut short),
    from a lenient parse of its first bytes only (bounded: 64 KiB), or None."""
    try:
        if isinstance(source, bytes):
            head = source[:_SALVAGE_BYTES]
        else:
            with open(source, "rb") as fh:
                head = fh.read(_SALVAGE_BYTES)
        with _quiet():
            ds = pydicom.dcmread(io.BytesIO(head), force=True, specific_tags=["SOPInstanceUID"])
        uid = _text(_get(ds, "SOPInstanceUID"), 64)
    except Exception:
        return None
    return uid if uid and _UID_RE.match(uid) else None


def _is_intact(h: _Header) -> DicomError | None:
    """None when the file's pixel data reads in full, else the error it raises."""
    try:
        _check_size([h])
        _decode(h)
    except DicomError as e:
        return e
    return None


def _read_headers(items: list[Path | bytes]) -> tuple[list[_Header], list[Rejection]]:
    """Every source's header, without the damaged copies of duplicated instances.

    Sources sharing one SOPInstanceUID (re-sends, re-archived copies) are one instance:
    the intact copies are kept (identical ones are dropped later as duplicate slices) and
    the damaged ones, including copies whose header cannot be read at all, are returned as
    rejections. Any other unreadable file raises its DicomError, as before.
    """
    headers: list[_Header] = []
    failed: list[tuple[int, DicomError]] = []
    for i, src in enumerate(items):
        try:
            headers.append(_read_header(src, i))
        except DicomError as e:
            failed.append((i, e))
    by_uid: dict[str, list[_Header]] = {}
    for h in headers:
        uid = _uid_of(h.ds, "SOPInstanceUID")
        if uid and _not_an_image([h]) is None:
            by_uid.setdefault(uid, []).append(h)
    ignored: list[Rejection] = []
    for i, err in failed:
        salvaged = _salvage_sop_uid(items[i]) if err.reason == "truncated" else None
        copies = by_uid.get(salvaged or "", [])
        if not copies or not any(_is_intact(c) is None for c in copies):
            raise err
        ignored.append(
            Rejection(
                _label(items[i], i), f"damaged copy of an instance also present intact: {err}"
            )
        )
    dropped: set[int] = set()
    for copies in by_uid.values():
        if len(copies) < 2:
            continue
        errors = [_is_intact(c) for c in copies]
        if all(problem is not None for problem in errors):
            continue  # no intact copy: the series read reports the damage
        for c, problem in zip(copies, errors, strict=True):
            if problem is not None:
                dropped.add(c.index)
                ignored.append(
                    Rejection(
                        c.label, f"damaged copy of an instance also present intact: {problem}"
                    )
                )
    return [h for h in headers if h.index not in dropped], ignored


def _read_study(items: list[Path | bytes], series_rule: SeriesRule) -> Study:
    headers, ignored = _read_headers(items)
    study_uids = {h.study_uid for h in headers}
    if len(study_uids) > 1:
        raise DicomError(
            "mixed_studies",
            f"{headers[0].label}: the {len(headers)} files belong to {len(study_uids)} "
            "different studies; pass one study at a time (scan_folder groups them)",
        )
    series: dict[str, list[_Header]] = {}
    for h in headers:
        series.setdefault(h.series_uid, []).append(h)

    candidates, skipped = _rank_series(series_rule, series)
    if not candidates and any(_BURNED_IN_NOTE in note for note in skipped):
        raise DicomError(
            "burned_in_annotation",
            f"{headers[0].label}: BurnedInAnnotation is YES (text burned into the pixels may "
            "identify the patient) and no other series qualifies ("
            + "; ".join(skipped)
            + "); scrub the pixels and clear the flag, or allow it explicitly "
            "(--allow-burned-in) if the text is known to be harmless",
        )
    if not candidates and all(_not_an_image(hs) is not None for hs in series.values()):
        raise DicomError(
            "not_image",
            f"{headers[0].label}: the files hold no image series, only "
            + "; ".join(sorted({str(_not_an_image(hs)) for hs in series.values()}))
            + "; pass them with the study's images",
        )
    if not candidates:
        raise DicomError(
            "no_usable_series",
            f"{headers[0].label}: no series of the study qualifies ("
            + "; ".join(skipped)
            + "); relax the SeriesRule or pass another study",
        )

    failures: list[tuple[list[_Header], DicomError]] = []
    for chosen in candidates:
        notes: list[str] = []
        try:
            volume, geo = _load_series(chosen, notes)
        except DicomError as e:
            failures.append((chosen, e))
            continue
        break
    else:
        first_error = failures[0][1]
        if len(failures) > 1:
            raise DicomError(
                first_error.reason,
                f"{first_error} (and {len(failures) - 1} other qualifying series failed too)",
            )
        raise first_error

    h0 = geo.frames[0].header
    ds = h0.ds
    n_slices = volume.shape[0]
    thick = _float(_fg_value(ds, 0, "PixelMeasuresSequence", "SliceThickness"))
    parts = [
        f"{_series_name(chosen)}: {h0.modality}, {n_slices} slices"
        + (f", {thick:g} mm" if thick is not None else "")
        + f", {_orientation_of(h0)}; best of {len(candidates)} qualifying"
    ]
    tier_note = _tier_note(chosen, candidates, series_rule)
    if tier_note:
        parts.append(tier_note)
    for bad, err in failures:
        parts.append(f"{_series_name(bad)} skipped: unreadable ({err.reason})")
    if skipped:
        parts.append(f"{len(skipped)} other skipped: " + "; ".join(skipped))
    parts.extend(notes)
    if ignored:
        parts.append(
            f"ignored {len(ignored)} damaged duplicate cop{'ies' if len(ignored) != 1 else 'y'} "
            "of instances present intact: " + ", ".join(r.path for r in ignored[:5])
        )

    patient_id = _text(_get(ds, "PatientID"), 256)
    if not patient_id:
        # Never merge unrelated studies under one empty id: each becomes its own patient.
        patient_id = f"NO-PATIENT-ID:{h0.study_uid}"
        parts.append("no PatientID: the study is treated as its own patient")
    profile = profile_for(h0.modality)
    units = profile.units
    if profile.convert is not None:
        factor, why = profile.convert(ds)
        if factor is not None:
            volume *= np.float32(factor)
            units = profile.converted_units
            parts.append(why)
        else:
            parts.append(profile.fallback_note.format(why=why))
    study = Study(
        study_uid=h0.study_uid,
        patient_id=patient_id,
        series_uid=h0.series_uid,
        modality=h0.modality,
        volume=volume,
        spacing=geo.spacing,
        acquisition=_acquisition(ds, geo.spacing),
        study_date=_parse_date(_get(ds, "StudyDate")),
        series_reason="; ".join(parts),
        units=units,
        origin=geo.origin,
        direction=geo.direction,
        slice_positions=geo.positions,
        slice_uids=tuple(
            _text(_get(geo.frames[g[0]].header.ds, "SOPInstanceUID"), 64) or ""
            for g in geo.groups
        ),
        in_plane_flips=geo.flips,
        frame_of_reference_uid=_text(_get(ds, "FrameOfReferenceUID"), 64) or "",
        ignored_files=ignored,
    )
    study.acquisition["intensity"] = intensity_unit(study)
    log.debug("read study: %d slices, %d series considered", n_slices, len(series))
    return study
