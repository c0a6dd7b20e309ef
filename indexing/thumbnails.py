"""Small de-identified study thumbnails: the central axial slice as a grey PNG.

A thumbnail is made from the *preprocessed* volume that the store keeps (int16 HU on the
encoder's grid, no DICOM header, no burned-in annotation: such series are refused at
ingest), so it carries no identifying text. It is the central slice along z, windowed to
``WINDOW_HU`` (lung to soft tissue), shrunk to fit ``SIZE`` x ``SIZE`` pixels (never
enlarged) and stored as an 8-bit greyscale PNG (~2-4 kB).

Where they live: ``indexing.build`` adds a ``thumbnail`` (binary) column to the snapshot
metadata at build time, one PNG per study; a query returns them only when asked
(``SearchSimilarRequest.include_thumbnails``), and the server makes the query's own
thumbnail from the volume it embedded. A snapshot built without them simply has none.
"""

from __future__ import annotations

import io

import numpy as np

SIZE = 64
WINDOW_HU = (-1000.0, 400.0)  # lung (-1000) to soft tissue / contrast (400)
COLUMN = "thumbnail"


def thumbnail_png(
    volume: np.ndarray, *, size: int = SIZE, window: tuple[float, float] = WINDOW_HU
) -> bytes:
    """``(D, H, W)`` HU volume -> PNG bytes of its central axial slice (8-bit grey)."""
    from PIL import Image

    v = np.asarray(volume)
    if v.ndim != 3 or min(v.shape) < 1:
        raise ValueError(f"volume must be a non-empty (D, H, W) array, got shape {v.shape}")
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    sl = v[v.shape[0] // 2].astype(np.float32)
    grey = np.clip((sl - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    img = Image.fromarray(grey)  # 2-D uint8 -> mode "L"
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnail_array(png: bytes) -> np.ndarray:
    """PNG bytes -> ``(h, w)`` uint8 array (for plotting)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


__all__ = ["COLUMN", "SIZE", "WINDOW_HU", "thumbnail_array", "thumbnail_png"]
