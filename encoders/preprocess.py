"""One decoded study -> the encoder's input grid, and boxes mapped onto that grid.

:func:`preprocess` normalises intensities per modality (:mod:`encoders.intensity`) and
resamples ``Study.volume`` to the input spec's grid; :func:`box_to_input_grid` follows
the same steps for a region box. Neither needs the DICOM reader: ROI and grid code use
them without importing pydicom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from encoders.errors import DicomError
from encoders.grid import block_mean, context_grid, context_volume, normalised_volume
from encoders.spec import InputSpec
from encoders.study import Study

__all__ = ["box_to_input_grid", "preprocess"]


def _crop_or_pad(volume: np.ndarray, shape: tuple[int, int, int], fill: float) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.float32)
    src, dst = [], []
    for n, t in zip(volume.shape, shape, strict=True):
        if n >= t:
            start = (n - t) // 2
            src.append(slice(start, start + t))
            dst.append(slice(0, t))
        else:
            start = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def preprocess(study: Study, spec: InputSpec) -> np.ndarray:
    """Normalise intensities per modality and resample ``study.volume`` to ``spec.shape``:
    with ``spec.fit == "extent"`` (the default) the whole study on its context grid
    (:func:`encoders.grid.context_volume`); with the legacy ``"crop"`` resampled to
    ``spec.spacing_mm`` and centre-cropped / padded to ``spec.shape``.

    Intensities (``study.acquisition["intensity"]`` names the unit that is stored):

    * ``HU`` — CT: Hounsfield units as read; padding ``spec.pad_value_hu``.
    * ``SUVbw_x100`` — PET with the tags SUV needs: SUV (body weight) x
      :data:`SUV_SCALE`; padding 0.
    * ``percentile_norm`` — MR, and PET without them (the stated fallback): the 1st and
      99th percentile of the foreground map to 0 and :data:`NORM_SCALE` (1000), clipped
      to [0, :data:`NORM_MAX`], so scanners' arbitrary MR scales line up; padding 0.

    Downsampling first averages whole blocks (anti-aliasing, and fast on large volumes),
    then linear interpolation (``scipy.ndimage.zoom``, order 1) covers the remaining
    factor. Returns ``(D, H, W) int16`` (rounded, clipped to the int16 range).
    """
    if spec.fit == "extent":  # the whole-study context grid (encoders.grid)
        return context_volume(study, spec)[0]
    volume, pad = normalised_volume(study, spec)
    spacing = tuple(float(s) for s in study.spacing)
    target = tuple(float(s) for s in spec.spacing_mm)

    factors = tuple(
        max(1, min(n, int(t / s + 1e-6)))
        for n, s, t in zip(volume.shape, spacing, target, strict=True)
    )
    if any(f > 1 for f in factors):
        volume = block_mean(volume, factors)
        spacing = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    zoom = tuple(s / t for s, t in zip(spacing, target, strict=True))
    if any(abs(z - 1.0) > 1e-3 for z in zoom):
        out_shape = tuple(max(1, round(n * z)) for n, z in zip(volume.shape, zoom, strict=True))
        zoom = tuple(o / n for o, n in zip(out_shape, volume.shape, strict=True))
        volume = ndimage.zoom(volume, zoom, order=1, mode="nearest", grid_mode=True)
    d, h, w = (int(s) for s in spec.shape)
    out = _crop_or_pad(volume, (d, h, w), pad)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def box_to_input_grid(
    box: Sequence[float],
    shape: Sequence[int],
    spacing: Sequence[float],
    spec: InputSpec,
) -> tuple[float, float, float, float, float, float]:
    """Map a box given on a study's own voxel grid to :func:`preprocess`'s output grid.

    ``box`` is ``(z0, y0, x0, z1, y1, x1)``, half-open voxel indices of ``Study.volume``
    (``shape``, ``spacing`` in mm): z counts slices in ascending position along the slice
    normal (the order :func:`encoders.dicom.read_study` sorts them in), y rows and x columns of the
    slice image. The result is the same box on the ``spec.shape`` grid, following
    :func:`preprocess` step by step (centred block averaging, ``grid_mode`` zoom, centred
    crop or pad); it may reach outside the grid when the region was cropped away.
    """
    b = [float(v) for v in box]
    if len(b) != 6 or not all(math.isfinite(v) for v in b):
        raise DicomError("bad_region", f"a region box is 6 numbers (z0, y0, x0, z1, y1, x1), got {list(box)!r}")
    if any(hi <= lo for lo, hi in zip(b[:3], b[3:], strict=True)):
        raise DicomError("bad_region", f"region box {b!r} is empty: each upper bound must exceed the lower one")
    if any(hi <= 0 or lo >= n for lo, hi, n in zip(b[:3], b[3:], shape, strict=True)):
        raise DicomError("bad_region", f"region box {b!r} lies outside the study's voxel grid {tuple(shape)}")
    if spec.fit == "extent":
        grid = context_grid(shape, spacing, spec)
        lo_v = grid.to_voxel([lo * float(s) for lo, s in zip(b[:3], spacing, strict=True)])
        hi_v = grid.to_voxel([hi * float(s) for hi, s in zip(b[3:], spacing, strict=True)])
        # to_voxel maps centres; box edges sit half a voxel further out
        return (lo_v[0] + 0.5, lo_v[1] + 0.5, lo_v[2] + 0.5,
                hi_v[0] + 0.5, hi_v[1] + 0.5, hi_v[2] + 0.5)
    lo_out: list[float] = []
    hi_out: list[float] = []
    for lo, hi, n, s, t, size in zip(b[:3], b[3:], shape, spacing, spec.spacing_mm, spec.shape, strict=True):
        n, s, t = int(n), float(s), float(t)
        f = max(1, min(n, int(t / s + 1e-6)))
        m = (n // f) * f
        start = (n - m) // 2
        # edges (not centres) of voxels map linearly: block averaging, then zoom
        lo, hi = (lo - start) / f, (hi - start) / f
        n1, s1 = n // f, s * f
        z = s1 / t
        if abs(z - 1.0) > 1e-3:
            n2 = max(1, round(n1 * z))
            lo, hi = lo * n2 / n1, hi * n2 / n1
        else:
            n2 = n1
        offset = -((n2 - size) // 2) if n2 >= size else (size - n2) // 2
        lo_out.append(lo + offset)
        hi_out.append(hi + offset)
    return (lo_out[0], lo_out[1], lo_out[2], hi_out[0], hi_out[1], hi_out[2])
