"""Pixel data: size caps checked on the headers, decoding (native and compressed
transfer syntaxes, codec plugins), colour to grey, and the rescaled series volume.

Declared sizes are checked against the caps and the bytes present before anything is
allocated; the decoded series is charged to the request's budget
(:mod:`encoders.budget`). Per-modality treatment of the values (CT air floor, padding)
comes from :mod:`encoders.dicom.modality`.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator

from encoders import budget
from encoders.dicom.headers import _Header, _read_header
from encoders.dicom.modality import profile_for
from encoders.dicom.positions import _Geometry, _geometry
from encoders.dicom.reading import (
    MAX_EXTRA_FILE_BYTES,
    MAX_PIXELS_PER_SLICE_SIDE,
    MAX_SLICES,
    MAX_VOXELS,
    _BoundedReader,
    _check_not_truncated,
    _dcmread,
    _guard,
    _normalise_source,
    _parse_errors,
    _quiet,
)
from encoders.dicom.values import _code, _float, _get, _int
from encoders.errors import DicomError


def _read_rest(h: _Header, offset: int) -> list[int]:
    """Read the elements of ``h``'s file from ``offset`` (the pixel data and
    whatever follows it) into ``h.ds``; returns their tags (delete them after use).

    This completes the headers-only read without parsing the header a second time. The
    read is bounded like a full read (an element never gets more bytes than the file
    holds) and a value cut short by the end of the file is reported as truncated.
    """
    ds = h.ds
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    added: list[int] = []
    try:
        with (
            _parse_errors(h.label),
            _BoundedReader(h.source, h.size, headers_only=False) as fp,
        ):
            fp.seek(offset)
            for elem in data_element_generator(fp, bool(implicit), bool(little)):  # type: ignore[arg-type]
                ds[elem.tag] = elem
                added.append(int(elem.tag))
        _check_not_truncated(ds, h.label)
    except BaseException:
        _drop(ds, added)
        raise
    return added


def _drop(ds: Dataset, tags: list[int]) -> None:
    """Remove elements :func:`_read_rest` added (and the pixel array pydicom cached)."""
    for tag in tags:
        with contextlib.suppress(KeyError):
            del ds[tag]
    ds._pixel_array = None
    ds._pixel_id = {}


def _check_size(headers: list[_Header]) -> None:
    """Caps on declared sizes and a consistent pixel description, checked on the headers
    before any pixel data is read (so nothing is allocated for an absurd header)."""
    first = headers[0].label
    n = sum(h.n_frames for h in headers)
    if n > MAX_SLICES:
        raise DicomError(
            "too_large",
            f"{first}: series has {n} slices (cap {MAX_SLICES}); choose a smaller series",
        )
    for h in headers:
        r, c = _int(_get(h.ds, "Rows")), _int(_get(h.ds, "Columns"))
        if r is None or c is None or r < 1 or c < 1:
            raise DicomError(
                "missing_tag", f"{h.label}: Rows/Columns missing or invalid; not an image"
            )
        if r > MAX_PIXELS_PER_SLICE_SIDE or c > MAX_PIXELS_PER_SLICE_SIDE:
            raise DicomError(
                "too_large",
                f"{h.label}: declares {r}x{c} pixels (cap {MAX_PIXELS_PER_SLICE_SIDE}"
                f"x{MAX_PIXELS_PER_SLICE_SIDE}); the header is damaged or the image unsupported",
            )
        if n * r * c > MAX_VOXELS:
            raise DicomError(
                "too_large",
                f"{first}: series has {n}x{r}x{c} voxels (cap {MAX_VOXELS}); "
                "choose a smaller series",
            )
        _check_pixel_description(h)
        bits = _int(_get(h.ds, "BitsAllocated")) or 16
        spp = min(4, max(1, _int(_get(h.ds, "SamplesPerPixel")) or 1))
        declared = r * c * h.n_frames * max(1, bits // 8) * spp
        if h.size > 2 * declared + MAX_EXTRA_FILE_BYTES:
            raise DicomError(
                "too_large",
                f"{h.label}: file holds {h.size} bytes but its declared image needs about "
                f"{declared}; it carries unexpected data, refusing it",
            )


COLOUR_PHOTOMETRIC: dict[str, int] = {
    "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_RCT": 3, "YBR_ICT": 3,
    "YBR_PARTIAL_420": 3, "PALETTE COLOR": 1,
}  # fmt: skip
"""Colour photometric interpretations read by conversion to grey, with their
SamplesPerPixel. The grey value is the luminance (ITU-R BT.601 weights 0.299, 0.587,
0.114) of the RGB pixel: pydicom turns YBR into RGB while decoding and a palette is
applied with ``pydicom.pixels.apply_color_lut``. Colour CT and PET are refused: their
values are a rendering, not HU or activity, so no grey conversion can give them back;
other modalities (MR, and any admitted by the SeriesRule) are normalised by percentiles
anyway, so luminance serves them."""
_LUMA = (0.299, 0.587, 0.114)


def _check_pixel_description(h: _Header) -> None:
    """Samples, photometric interpretation and bit depths must describe a greyscale
    image or a colour one of :data:`COLOUR_PHOTOMETRIC` (not CT / PET)."""
    ds, label = h.ds, h.label
    spp = _int(_get(ds, "SamplesPerPixel"))
    photometric = _code(_get(ds, "PhotometricInterpretation"))
    bits = _int(_get(ds, "BitsAllocated"))
    stored = _int(_get(ds, "BitsStored"))
    if spp is None and not photometric:
        raise DicomError(
            "missing_tag",
            f"{label}: SamplesPerPixel and PhotometricInterpretation missing; not an image",
        )
    spp = 1 if spp is None else spp
    mono = photometric in ("MONOCHROME1", "MONOCHROME2")
    if mono and spp != 1:
        raise DicomError(
            "inconsistent_header",
            f"{label}: {photometric} with SamplesPerPixel {spp} (must be 1); the header "
            "contradicts itself, re-export the file",
        )
    if not mono:
        expected = COLOUR_PHOTOMETRIC.get(photometric)
        if expected is None:
            raise DicomError(
                "unsupported",
                f"{label}: PhotometricInterpretation {photometric or '?'} with {spp} samples "
                "per pixel is not supported (greyscale MONOCHROME1/2 is; RGB, YBR_* and "
                "PALETTE COLOR are converted to grey)",
            )
        if spp != expected:
            raise DicomError(
                "inconsistent_header",
                f"{label}: {photometric} with SamplesPerPixel {spp} (must be {expected}); the "
                "header contradicts itself, re-export the file",
            )
        quantity = profile_for(h.modality).quantity
        if quantity is not None:
            raise DicomError(
                "unsupported",
                f"{label}: {h.modality} image stored as {photometric}: colour values are a "
                f"rendering, not {quantity}; use the original greyscale series",
            )
    if bits is None:
        raise DicomError("missing_tag", f"{label}: BitsAllocated missing; not an image")
    if bits not in (8, 16, 32):
        raise DicomError("unsupported", f"{label}: BitsAllocated {bits} is not supported")
    if stored is not None and not 1 <= stored <= bits:
        raise DicomError(
            "inconsistent_header",
            f"{label}: BitsStored {stored} does not fit BitsAllocated {bits}; re-export the file",
        )


def _decode(h: _Header) -> tuple[np.ndarray, float | None]:
    with _guard(h.label), _quiet():
        return _decode_unguarded(h)


def read_pixels(source: Path | bytes) -> np.ndarray:
    """One file's stored pixel values ``(frames, rows, cols)`` (colour images: their
    grey luminance, see :data:`COLOUR_PHOTOMETRIC`), with every check of
    :func:`read_study` on the way (header first, sizes before allocation, pixel
    description, transfer syntax, decoder) but no geometry or rescale. Raises
    :class:`DicomError` only; for tests, tools and codec checks."""
    src = _normalise_source(source, 0)
    h = _read_header(src, 0, need_study=False)
    _check_size([h])
    arr = _decode(h)[0]
    return arr if arr.flags.writeable else arr.copy()


def _decode_unguarded(h: _Header) -> tuple[np.ndarray, float | None]:
    """One file's ``(frames, rows, cols)`` stored values and PixelPaddingValue.

    The header parsed by :func:`_read_header` is completed with the pixel data element
    (:func:`_read_rest`), so each file is parsed once; a deflated file is read again in
    full. The pixel elements are dropped from the header afterwards (bounded memory).
    """
    if h.pixel_offset is None:
        return _decode_dataset(h, _dcmread(h.source, h.label, headers_only=False)[0])
    added = _read_rest(h, h.pixel_offset)
    try:
        return _decode_dataset(h, h.ds)
    finally:
        _drop(h.ds, added)


def _decode_dataset(h: _Header, ds: Dataset) -> tuple[np.ndarray, float | None]:
    label = h.label
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise DicomError(
            "unsupported" if other else "no_pixel_data",
            f"{label}: "
            + ("float pixel data is not supported" if other else "no PixelData; not an image")
            + "; exclude this file",
        )
    rows, cols = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    bits = _int(_get(ds, "BitsAllocated"))
    spp = _int(_get(ds, "SamplesPerPixel")) or 1
    n_frames = max(1, _int(_get(ds, "NumberOfFrames")) or 1)
    photometric = _code(_get(ds, "PhotometricInterpretation"))
    if rows is None or cols is None or bits is None:
        raise DicomError("missing_tag", f"{label}: Rows, Columns or BitsAllocated missing")
    if (rows, cols, n_frames) != (
        _int(_get(h.ds, "Rows")),
        _int(_get(h.ds, "Columns")),
        h.n_frames,
    ):
        raise DicomError("corrupt", f"{label}: header changed between reads; re-run")
    mono = photometric in ("MONOCHROME1", "MONOCHROME2")
    if (spp != 1 or not mono) and COLOUR_PHOTOMETRIC.get(photometric) != spp:
        raise DicomError(
            "unsupported",
            f"{label}: {photometric or '?'} with {spp} samples per pixel; greyscale "
            "(MONOCHROME1/2) and RGB / YBR / PALETTE COLOR images are supported",
        )
    if bits not in (8, 16, 32):
        raise DicomError("unsupported", f"{label}: BitsAllocated {bits} is not supported")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        tsyntax = pydicom.uid.ImplicitVRLittleEndian
    tsyntax = pydicom.uid.UID(str(tsyntax))
    if not tsyntax.is_transfer_syntax:
        raise DicomError(
            "unsupported",
            f"{label}: TransferSyntaxUID {re.sub(r'[^0-9.]', '', str(tsyntax))[:64]!r} is not a "
            "known transfer syntax; "
            "re-export the file",
        )
    encapsulated = bool(getattr(ds["PixelData"], "is_undefined_length", False))
    if tsyntax.is_compressed != encapsulated:
        raise DicomError(
            "transfer_syntax_mismatch",
            f"{label}: TransferSyntaxUID says {tsyntax.name} but the pixel data is "
            + ("encapsulated (compressed)" if encapsulated else "native (uncompressed)")
            + "; the transfer syntax lies about the encoding, re-export the file",
        )
    if not tsyntax.is_compressed:
        # YBR_FULL_422 stores two samples per pixel (chroma shared by pixel pairs).
        samples = 2 if photometric == "YBR_FULL_422" else spp
        expected = rows * cols * n_frames * samples * bits // 8
        present = len(ds.PixelData)
        if present < expected:
            raise DicomError(
                "truncated",
                f"{label}: declares {rows}x{cols}x{n_frames} {bits}-bit pixels ({expected} bytes) "
                f"but holds {present}; the file is truncated or the header is wrong",
            )
    else:
        _require_decoder(tsyntax, label)
    fast = _native_view(ds, tsyntax, photometric, bits, spp, rows * cols * n_frames)
    try:
        with _quiet():
            arr = fast if fast is not None else ds.pixel_array
    except Exception as e:
        raise DicomError(
            "corrupt",
            f"{label}: pixel data cannot be decoded ({type(e).__name__}); the file is damaged, re-export it",
        ) from None
    arr = np.asarray(arr)
    if not mono:
        arr = _to_grey(arr, ds, photometric, label)
    if arr.size != n_frames * rows * cols:
        raise DicomError(
            "corrupt",
            f"{label}: decoded {arr.size} pixels, header declares {n_frames}x{rows}x{cols}; "
            "the file is damaged, re-export it",
        )
    arr = arr.reshape(n_frames, rows, cols)
    padding = _float(_get(ds, "PixelPaddingValue"))
    return arr, padding


_NATIVE_LE = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian})


def _native_view(
    ds: Dataset, tsyntax: pydicom.uid.UID, photometric: str, bits: int, spp: int, count: int
) -> np.ndarray | None:
    """The pixel values as a read-only view of the PixelData bytes, for the common case
    where that is exactly what pydicom would decode: native little endian, greyscale,
    BitsStored equal to BitsAllocated (no sign extension or masking to do). None
    otherwise (then pydicom decodes). Saves pydicom's per-frame copy and option checks
    (~0.15 ms per 512 x 512 slice); the length was checked against the header before."""
    if tsyntax not in _NATIVE_LE or spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    representation = _int(_get(ds, "PixelRepresentation"))
    if _int(_get(ds, "BitsStored")) != bits or representation not in (0, 1):
        return None
    data = _get(ds, "PixelData")
    if not isinstance(data, bytes):
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=count)


def _to_grey(arr: np.ndarray, ds: Dataset, photometric: str, label: str) -> np.ndarray:
    """A decoded colour image as grey luminance, in the integer type it was stored in.

    ``arr`` is what pydicom decoded: RGB samples last (YBR already converted to RGB) or,
    for PALETTE COLOR, palette indices (the palette is applied first).
    """
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DicomError(
                "missing_tag",
                f"{label}: PALETTE COLOR without a usable palette ({type(e).__name__} "
                "applying the Red/Green/Blue Palette Color Lookup Tables); re-export the file",
            ) from None
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise DicomError(
            "corrupt",
            f"{label}: {photometric} decoded to shape {arr.shape}, not RGB samples; "
            "the file is damaged, re-export it",
        )
    work = np.dtype(np.float64 if arr.dtype.itemsize > 2 else np.float32)
    weights = np.asarray(_LUMA, dtype=work)
    grey: np.ndarray = np.tensordot(arr.astype(work, copy=False), weights, axes=([-1], [0]))
    info = np.iinfo(arr.dtype) if arr.dtype.kind in "iu" else None
    if info is None:
        return grey.astype(np.float32)
    return np.clip(np.rint(grey), info.min, info.max).astype(arr.dtype)


def _require_decoder(tsyntax: pydicom.uid.UID, label: str) -> None:
    """Raise ``missing_codec`` naming the packages when no decoder plugin can run."""
    try:
        decoder = pydicom.pixels.get_decoder(tsyntax)
    except Exception:
        raise DicomError(
            "missing_codec",
            f"{label}: pydicom has no decoder for transfer syntax {tsyntax.name}; "
            "decompress the file first (e.g. gdcmconv --raw or dcmdjpeg)",
        ) from None
    if decoder.is_available:
        return
    missing = "; ".join(str(m) for m in getattr(decoder, "missing_dependencies", []))
    raise DicomError(
        "missing_codec",
        f"{label}: no decoder installed for transfer syntax {tsyntax.name}"
        + (f" ({missing[:200]})" if missing else "")
        + "; install one of those packages (e.g. pip install pylibjpeg pylibjpeg-libjpeg "
        "pylibjpeg-openjpeg) or decompress the file first (gdcmconv --raw)",
    )


def _load_series(headers: list[_Header], notes: list[str]) -> tuple[np.ndarray, _Geometry]:
    _check_size(headers)
    # the float32 volume and (twice, for the decoder's buffers) the largest decoded file,
    # charged to the request's decode budget before anything is allocated
    sizes = [
        (_int(_get(h.ds, "Rows")) or 0) * (_int(_get(h.ds, "Columns")) or 0) * h.n_frames
        * max(1, (_int(_get(h.ds, "BitsAllocated")) or 16) // 8)
        * min(4, max(1, _int(_get(h.ds, "SamplesPerPixel")) or 1))
        for h in headers
    ]
    voxels = sum((_int(_get(h.ds, "Rows")) or 0) * (_int(_get(h.ds, "Columns")) or 0) * h.n_frames for h in headers)
    budget.charge(4 * voxels + 2 * max(sizes, default=0), "the decoded series")
    with _guard(headers[0].label):
        geo = _geometry(headers, notes)
    rows = _int(_get(headers[0].ds, "Rows")) or 0
    cols = _int(_get(headers[0].ds, "Columns")) or 0
    photometric = _code(_get(headers[0].ds, "PhotometricInterpretation"))
    if photometric in COLOUR_PHOTOMETRIC:
        notes.append(f"{photometric} converted to grey (BT.601 luminance)")
    n = len(geo.frames)
    volume = np.empty((n, rows, cols), dtype=np.float32)
    slot = {(id(fr.header), fr.frame): i for i, fr in enumerate(geo.frames)}
    profile = profile_for(headers[0].modality)
    for h in headers:
        stored, padding = _decode(h)
        for f in range(h.n_frames):
            i = slot.get((id(h), f), -1)
            if i < 0:  # a frame of another stack / phase of a multi-frame file
                continue
            fr = geo.frames[i]
            values = volume[i]  # rescaled in place: no per-slice temporaries
            # One slice at a time while it is in cache: convert and rescale in one pass
            # (slope 1: int -> float32 + intercept), then padding and the CT air floor.
            # Flipped to the canonical orientation on the way in (no whole-volume copy).
            src = stored[f][:: -1 if geo.flips[0] else 1, :: -1 if geo.flips[1] else 1]
            if fr.slope == 1.0:
                np.add(src, np.float32(fr.intercept), out=values, dtype=np.float32)
            else:
                np.multiply(src, np.float32(fr.slope), out=values, dtype=np.float32)
                if fr.intercept != 0.0:
                    values += np.float32(fr.intercept)
            if padding is not None:
                values[src == padding] = profile.padding_fill
            if profile.floor is not None:
                # Below air is padding / outside the reconstruction circle (-2000, -3024).
                np.maximum(values, np.float32(profile.floor), out=values)
        del stored
    # Duplicated positions: drop identical copies, refuse differing ones.
    keep = []
    dropped = 0
    for g in geo.groups:
        for j in g[1:]:
            if np.abs(volume[j] - volume[g[0]]).max() > 0.5:
                raise DicomError(
                    "inconsistent_geometry",
                    f"{geo.frames[j].header.label}: two different slices at the same position "
                    f"(also {geo.frames[g[0]].header.label}); the series holds several stacks "
                    "(phases, echoes, repeats); split it",
                )
            dropped += 1
        keep.append(g[0])
    if dropped:
        volume = volume[keep]
        notes.append(f"dropped {dropped} duplicate slice{'s' if dropped != 1 else ''}")
    return volume, geo
