"""Small de-identified study thumbnails: the embedded region, on the slice through its centre.

A thumbnail is made from the *preprocessed* volume that the store keeps (int16 HU on the
encoder's grid, no DICOM header, no burned-in annotation: such series are refused at
ingest), so it carries no identifying text. It shows what the embedding describes: the
axial slice through the centre of the region the encoder cut (:class:`Region`, from
:func:`encoders.model.embedded_regions`: the reader's box or the proposed lesion; for
whole-volume encoders the slice that weighs most in the embedding), windowed to
``WINDOW_HU`` (lung to soft tissue), shrunk to fit ``SIZE`` x ``SIZE`` pixels (never
enlarged), with the region's box drawn in red (RGB PNG, ~3-6 kB). Without a region
(:func:`thumbnail_png`) it is the central slice in grey, as before regions were stored.

Where they live: ``indexing.build`` adds a ``thumbnail`` (binary) column and the region
columns (``REGION_COLUMNS``: slice, box, source) to the snapshot metadata at build time,
one per study, so a neighbour's region needs no re-proposal at query time; a query returns
them only when asked (``SearchSimilarRequest.include_thumbnails``), and the server makes
the query's own from the volume it embedded. A snapshot built without them has none.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

SIZE = 64
WINDOW_HU = (-1000.0, 400.0)  # lung (-1000) to soft tissue / contrast (400)
COLUMN = "thumbnail"
SLICE_COLUMN = "region_slice"
BOX_COLUMN = "region_box"
SOURCE_COLUMN = "region_source"
REGION_COLUMNS = (SLICE_COLUMN, BOX_COLUMN, SOURCE_COLUMN)
BOX_RGB = (230, 40, 40)


@dataclass(frozen=True)
class Region:
    """Where an embedding was cut from a ``(D, H, W)`` volume: axial ``slice_index``
    through its centre and ``box`` ``(row0, col0, row1, col1)`` on it (half-open voxels);
    ``source``: "reader", "proposal", "centre", "best_slice" or "matched_slice"
    (:mod:`indexing.slice_match`)."""

    slice_index: int
    box: tuple[int, int, int, int]
    source: str

    @classmethod
    def of(cls, cut: Any) -> Region:
        """From :data:`encoders.model.CutRegion` ``(slice, box, source)``."""
        z, box, source = cut
        return cls(int(z), tuple(int(v) for v in box), str(source))  # type: ignore[arg-type]


def _grey(sl: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    return np.clip((sl.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)


def _check(volume: np.ndarray) -> np.ndarray:
    v = np.asarray(volume)
    if v.ndim != 3 or min(v.shape) < 1:
        raise ValueError(f"volume must be a non-empty (D, H, W) array, got shape {v.shape}")
    return v


def _png(img: Any, size: int) -> bytes:
    from PIL import Image

    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnail_png(
    volume: np.ndarray, *, size: int = SIZE, window: tuple[float, float] = WINDOW_HU
) -> bytes:
    """``(D, H, W)`` HU volume -> PNG bytes of its central axial slice (8-bit grey)."""
    from PIL import Image

    v = _check(volume)
    return _png(Image.fromarray(_grey(v[v.shape[0] // 2], window)), size)


def draw_box(rgb: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int] = BOX_RGB) -> np.ndarray:
    """Draw the outline of ``box`` (row0, col0, row1, col1, half-open) on ``(h, w, 3)`` uint8."""
    h, w = rgb.shape[:2]
    r0, c0 = max(0, box[0]), max(0, box[1])
    r1, c1 = min(h, box[2]) - 1, min(w, box[3]) - 1
    if r1 < r0 or c1 < c0:
        return rgb
    rgb[r0, c0 : c1 + 1] = rgb[r1, c0 : c1 + 1] = colour
    rgb[r0 : r1 + 1, c0] = rgb[r0 : r1 + 1, c1] = colour
    return rgb


def region_thumbnail_png(
    volume: np.ndarray,
    region: Region,
    *,
    size: int = SIZE,
    window: tuple[float, float] = WINDOW_HU,
) -> bytes:
    """``(D, H, W)`` HU volume -> PNG (RGB) of the slice through ``region``'s centre with its
    box drawn (not drawn when it covers the whole slice)."""
    from PIL import Image

    v = _check(volume)
    z = min(max(int(region.slice_index), 0), v.shape[0] - 1)
    grey = _grey(v[z], window)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    h, w = grey.shape
    if tuple(region.box) != (0, 0, h, w):
        # a box of 1-2 pixels after shrinking would vanish: draw it on the enlarged image
        scale = max(1, int(np.ceil(max(h, w) / size)))
        rgb = draw_box(rgb, region.box)
        if scale > 1:  # thicken the outline so that it survives the shrink to `size`
            for d in range(1, scale):
                b = region.box
                draw_box(rgb, (b[0] - d, b[1] - d, b[2] + d, b[3] + d))
    return _png(Image.fromarray(rgb), size)


def overlay_png(
    slice_hu: np.ndarray,
    heat: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    size: int = SIZE * 2,
    window: tuple[float, float] = WINDOW_HU,
) -> bytes:
    """A ``(H, W)`` HU slice with ``heat`` (a ``(rows, cols)`` map in [0, 1], stretched over
    ``box``) blended in red inside the box, the box drawn; RGB PNG."""
    from PIL import Image

    grey = _grey(np.asarray(slice_hu), window).astype(np.float32)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    r0, c0, r1, c1 = (int(v) for v in box)
    hh, ww = max(r1 - r0, 1), max(c1 - c0, 1)
    m = np.asarray(heat, dtype=np.float32)
    if m.size:
        up = np.asarray(
            Image.fromarray(m).resize((ww, hh), Image.Resampling.NEAREST), dtype=np.float32
        )
        a = 0.6 * np.clip(up, 0.0, 1.0)[..., None]
        patch = rgb[r0 : r0 + hh, c0 : c0 + ww]
        red = np.array([255.0, 0.0, 0.0], np.float32)
        rgb[r0 : r0 + hh, c0 : c0 + ww] = (1 - a[: patch.shape[0], : patch.shape[1]]) * patch + (
            a[: patch.shape[0], : patch.shape[1]] * red
        )
    out = draw_box(rgb.round().astype(np.uint8), (r0, c0, r1, c1), (255, 210, 0))
    return _png(Image.fromarray(out), size)


def thumbnail_array(png: bytes) -> np.ndarray:
    """PNG bytes -> ``(h, w)`` uint8 grey or ``(h, w, 3)`` RGB array (for plotting)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        if img.mode == "L":
            return np.asarray(img, dtype=np.uint8)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


__all__ = [
    "COLUMN",
    "REGION_COLUMNS",
    "SIZE",
    "WINDOW_HU",
    "Region",
    "draw_box",
    "overlay_png",
    "region_thumbnail_png",
    "thumbnail_array",
    "thumbnail_png",
]
