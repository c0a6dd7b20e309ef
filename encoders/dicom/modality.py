"""Per-modality intensity rules as a small registry of :class:`ModalityProfile`.

A profile says what a modality's rescaled pixel values mean and how reading treats
them: the unit stored in ``Study.units``, whether the values are a physical quantity
(colour renderings of it are refused), the floor below which values are padding (CT
air), and an optional conversion to a standard unit read from the header (PET: SUV body
weight). ``profile_for(modality)`` answers for any modality; one not registered gets
:data:`DEFAULT_PROFILE` (raw values, normalised by percentiles later, see
:mod:`encoders.intensity`). ``register_profile`` adds or replaces one.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from encoders.dicom.values import _float, _get, _parse_date, _parse_datetime, _parse_time, _text

__all__ = [
    "CT_AIR_HU",
    "DEFAULT_PROFILE",
    "PROFILES",
    "ModalityProfile",
    "pet_suv_factor",
    "profile_for",
    "register_profile",
]

CT_AIR_HU = -1024.0
"""Lowest HU kept for CT: padding / outside-of-FOV values below it are air."""


@dataclass(frozen=True)
class ModalityProfile:
    """How reading treats one modality's rescaled pixel values.

    ``units``: ``Study.units`` when no conversion applies. ``quantity``: what the values
    measure (``"Hounsfield units"``) when they are quantitative, so a colour rendering
    is refused; ``None`` for relative scales. ``floor``: values below it are clipped
    (padding / outside the reconstruction circle); ``padding_fill``: what stored
    PixelPaddingValue pixels become. ``convert``: ``header -> (factor or None, note)``
    to ``converted_units``; when it answers None, ``fallback_note`` (formatted with
    ``why``) says the values stay in ``units``.
    """

    modality: str
    units: str = "raw"
    quantity: str | None = None
    floor: float | None = None
    padding_fill: float = 0.0
    convert: Callable[[Dataset], tuple[float | None, str]] | None = None
    converted_units: str = ""
    fallback_note: str = ""


PROFILES: dict[str, ModalityProfile] = {}
"""Registered profiles by DICOM Modality code."""
DEFAULT_PROFILE = ModalityProfile("*")
"""Any modality without a profile: raw rescaled values, padding 0, no floor."""


def register_profile(profile: ModalityProfile) -> ModalityProfile:
    """Add (or replace) the profile of ``profile.modality``; returns it."""
    PROFILES[profile.modality] = profile
    return profile


def profile_for(modality: str) -> ModalityProfile:
    """The profile of a DICOM Modality code, :data:`DEFAULT_PROFILE` when none is registered."""
    return PROFILES.get(modality, DEFAULT_PROFILE)


def pet_suv_factor(ds: Dataset) -> tuple[float | None, str]:
    """The factor from the stored activity concentration (Bq/ml) to SUVbw, or None and why.

    SUVbw = C [Bq/ml] x body weight [g] / injected dose [Bq], with the dose decayed to
    the time the image values refer to: the series start for DecayCorrection START, the
    administration for ADMIN. Needs Units BQML (GML means SUVbw already), PatientWeight,
    RadionuclideTotalDose and, for START, RadionuclideHalfLife and the injection and
    series times. Values (weight, dose, times) never appear in the returned note.
    """
    units = (_text(_get(ds, "Units"), 16) or "").upper()
    if units == "GML":
        return 1.0, "PET values are SUVbw already (Units GML)"
    if units != "BQML":
        return None, f"Units is {units or 'missing'}, not BQML"
    correction = (_text(_get(ds, "DecayCorrection"), 16) or "").upper()
    if correction not in ("START", "ADMIN"):
        return None, f"DecayCorrection is {correction or 'missing'}, not START or ADMIN"
    weight = _float(_get(ds, "PatientWeight"))
    if weight is None or not 1.0 <= weight <= 500.0:
        return None, "PatientWeight is missing or implausible"
    seq = _get(ds, "RadiopharmaceuticalInformationSequence")
    item = seq[0] if seq is not None and len(seq) > 0 else Dataset()
    dose = _float(_get(item, "RadionuclideTotalDose"))
    if dose is None or dose <= 0:
        return None, "RadionuclideTotalDose is missing or not positive"
    decay = 1.0
    if correction == "START":
        half_life = _float(_get(item, "RadionuclideHalfLife"))
        if half_life is None or half_life <= 0:
            return None, "RadionuclideHalfLife is missing or not positive"
        injected = _parse_datetime(_get(item, "RadiopharmaceuticalStartDateTime"))
        day = _parse_date(_get(ds, "SeriesDate")) or _parse_date(_get(ds, "StudyDate"))
        dated = injected is not None
        if injected is None:
            clock = _parse_time(_get(item, "RadiopharmaceuticalStartTime"))
            if clock is None:
                return None, "the injection time is missing"
            injected = _dt.datetime.combine(day or _dt.date(2000, 1, 1), clock)
            dated = day is not None
        series_clock = _parse_time(_get(ds, "SeriesTime")) or _parse_time(
            _get(ds, "AcquisitionTime")
        )
        if series_clock is None:
            return None, "SeriesTime / AcquisitionTime is missing"
        started = _dt.datetime.combine(day or injected.date(), series_clock)
        delay = (started - injected).total_seconds()
        if delay < 0 and not dated:
            delay += 86400.0  # times only: the scan started after midnight
        if not 0.0 <= delay <= 86400.0:
            return None, "the injection and series times are inconsistent"
        decay = 0.5 ** (delay / half_life)
    return weight * 1000.0 / (dose * decay), f"PET values converted to SUVbw (decay corrected to {correction})"


register_profile(
    ModalityProfile("CT", units="HU", quantity="Hounsfield units", floor=CT_AIR_HU, padding_fill=CT_AIR_HU)
)
register_profile(ModalityProfile("MR", units="MR_raw"))
register_profile(
    ModalityProfile(
        "PT",
        units="PT_raw",
        quantity="activity concentrations",
        convert=pet_suv_factor,
        converted_units="SUVbw",
        fallback_note=(
            "PET without SUV ({why}): intensities are normalised by robust percentiles "
            "instead, not comparable with SUV studies"
        ),
    )
)
