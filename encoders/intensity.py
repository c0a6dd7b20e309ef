"""Stored intensity units of a decoded study and the robust normalisation (no pydicom).

:func:`intensity_unit` names how a :class:`~encoders.study.Study` is scaled before it is
resampled (HU for CT, SUV x 100 for PET with the tags SUV needs, robust percentiles
otherwise); :func:`robust_normalise` is the percentile mapping. Preprocessing and the
whole-study grid (:mod:`encoders.preprocess`, :mod:`encoders.grid`) read these without
importing the DICOM reader.
"""

from __future__ import annotations

import numpy as np

from encoders.study import Study

__all__ = [
    "INTENSITY_HU",
    "INTENSITY_PERCENTILE",
    "INTENSITY_SUV",
    "NORM_MAX",
    "NORM_PERCENTILES",
    "NORM_SCALE",
    "SUV_SCALE",
    "intensity_unit",
    "robust_normalise",
]

INTENSITY_HU = "HU"
INTENSITY_SUV = "SUVbw_x100"
INTENSITY_PERCENTILE = "percentile_norm"
SUV_SCALE = 100.0
"""Stored value per unit of SUV (int16 store: 0.01 SUV steps, up to SUV 327)."""
NORM_PERCENTILES = (1.0, 99.0)
"""Robust normalisation: these foreground percentiles map to 0 and NORM_SCALE."""
NORM_SCALE = 1000.0
NORM_MAX = 4000.0
"""Normalised values are clipped to [0, NORM_MAX]."""


def intensity_unit(study: Study) -> str:
    """How :func:`encoders.preprocess.preprocess` scales ``study``: HU (CT), SUV x 100 (PET) or percentiles."""
    if study.units == "HU" or (not study.units and study.modality == "CT"):
        return INTENSITY_HU
    if study.units == "SUVbw":
        return INTENSITY_SUV
    return INTENSITY_PERCENTILE


def robust_normalise(volume: np.ndarray) -> np.ndarray:
    """Map the 1st / 99th percentile of the foreground to 0 / 1000 (clipped to [0, 4000]).

    Foreground: voxels above 5 % of the volume's 99.5th percentile (MR / PET background
    is near zero). Percentiles come from a strided sample of at most ~2 M voxels, so
    the cost is bounded and the result deterministic.
    """
    flat = volume.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step]
    top = float(np.percentile(sample, 99.5))
    fg = sample[sample > 0.05 * top] if top > 0 else sample
    if fg.size < 16:
        fg = sample
    lo, hi = (float(v) for v in np.percentile(fg, NORM_PERCENTILES))
    if not hi > lo:
        hi = lo + 1.0
    out = (volume - np.float32(lo)) * np.float32(NORM_SCALE / (hi - lo))
    return np.clip(out, 0.0, NORM_MAX, out=out)
