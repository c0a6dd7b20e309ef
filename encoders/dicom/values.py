"""Header values read defensively: typed look-ups of DICOM elements (text, numbers,
codes, dates, times, UIDs) that answer None instead of raising on malformed values, and
bound the length of any text they return."""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _strs(value: Any) -> tuple[str, ...]:
    """A (multi-)valued string element as a tuple of stripped upper-case strings."""
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        values: list[Any] = [value]
    else:
        try:
            values = list(value)
        except TypeError:
            values = [value]
    out = []
    for v in values:
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        out.append(s.strip().upper())
    return tuple(out)


def _float(value: Any) -> float | None:
    """A numeric element value as a finite float, or None (missing / non-numeric)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip().strip("\x00")
        if not value:
            return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floats(value: Any, n: int) -> np.ndarray | None:
    """A multi-valued numeric element (e.g. IOP) as ``(n,) float64``, or None if unusable."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        s = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        items: list[Any] = s.split("\\")
    else:
        try:
            items = list(value)
        except TypeError:
            return None
    if len(items) != n:
        return None
    out = [_float(v) for v in items]
    if any(v is None for v in out):
        return None
    return np.asarray(out, dtype=np.float64)


def _int(value: Any) -> int | None:
    f = _float(value)
    if f is None or f != int(f):
        return None
    return int(f)


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.keyword`` or None; never raises (bad values read as None). DS / IS values may
    come back as their raw text (``"0.5\\0.5"``): pass them through :func:`_float`,
    :func:`_floats`, :func:`_int` or :func:`_text`."""
    try:
        # A cached keyword -> tag and one dict look-up: 'keyword in ds' / ds.get(keyword)
        # parse the keyword each time, and a missing one costs an exception (~9 us
        # against ~0.4 us; a file takes ~50 look-ups, many of absent elements).
        tag = _TAGS.get(keyword)
        if tag is None:
            number = tag_for_keyword(keyword)
            if number is None:
                return None
            tag = _TAGS.setdefault(keyword, BaseTag(number))
            if dictionary_VR(number) in ("DS", "IS"):
                _NUMBER_TEXT.add(tag)
        if tag not in ds:
            return None
        if tag in _NUMBER_TEXT:
            # Decimal / integer strings: the raw text, as every caller parses numbers
            # itself (_float / _floats); pydicom's DSfloat conversion and validation
            # cost more than the rest of reading such an element.
            elem = ds.get_item(tag)
            raw = getattr(elem, "value", None)
            if isinstance(raw, bytes) and not isinstance(elem, DataElement):
                return raw.decode("ascii", "replace")
        return ds[tag].value
    except Exception:  # pydicom may fail converting a malformed raw element
        return None


_TAGS: dict[str, BaseTag] = {}
_NUMBER_TEXT: set[BaseTag] = set()
"""Tags of DS / IS elements, which :func:`_get` returns as raw text when unconverted."""


def _text(value: Any, limit: int = 64) -> str | None:
    """A short string element as a clean one-line string (multi-values joined by '\\')."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        parts = [value]
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    cleaned = []
    for p in parts:
        s = p.decode("ascii", "replace") if isinstance(p, bytes) else str(p)
        s = " ".join(s.replace("\x00", " ").split())
        if s:
            cleaned.append(s)
    if not cleaned:
        return None
    return "\\".join(cleaned)[:limit]


def _code(value: Any) -> str:
    """A code string (CS: Modality, PhotometricInterpretation) reduced to ``[A-Z0-9_ ]``,
    at most 16 characters: safe to put in a message whatever a hostile file holds."""
    return re.sub(r"[^A-Z0-9_ ]", "", (_text(value, 32) or "").upper()).strip()[:16]


def _numeric_text(value: Any) -> str:
    """A would-be number reduced to number characters, for messages (never free text)."""
    return re.sub(r"[^0-9.eE+\-]", "?", _text(value, 16) or "")


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


def _parse_date(value: Any) -> _dt.date | None:
    s = _text(value, 32)
    if not s or len(s) < 8 or not s[:8].isdigit():
        return None
    try:
        return _dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


def _uid_of(ds: Dataset, keyword: str) -> str:
    """A UI element's value, from its raw bytes when pydicom has not converted it yet
    (its UID validation costs more than the rest of a header's look-ups)."""
    tag = _TAGS.get(keyword)
    if tag is None:
        _get(ds, keyword)  # caches the tag
        tag = _TAGS.get(keyword)
    try:
        if tag is None or tag not in ds:
            return ""
        raw = getattr(ds.get_item(tag), "value", None)
    except Exception:
        return ""
    if isinstance(raw, bytes):
        return raw.decode("ascii", "replace").strip("\x00 ")[:64]
    return _text(raw, 64) or ""


def _parse_time(value: Any) -> _dt.time | None:
    """A DICOM TM value ('HHMMSS.ffffff', also the old 'HH:MM:SS') as a time, or None."""
    s = (_text(value, 32) or "").replace(":", "")
    if len(s) < 4 or not s[:4].isdigit():
        return None
    try:
        hh, mm = int(s[:2]), int(s[2:4])
        ss = float(s[4:]) if len(s) > 4 else 0.0
        if not math.isfinite(ss):
            return None
        return _dt.time(hh, mm, int(ss), round((ss - int(ss)) * 1e6) % 1_000_000)
    except ValueError:
        return None


def _parse_datetime(value: Any) -> _dt.datetime | None:
    """A DICOM DT value ('YYYYMMDDHHMMSS.ffffff', offset ignored) as a naive datetime."""
    s = _text(value, 32) or ""
    s = re.split(r"[+-]", s, maxsplit=1)[0]
    day = _parse_date(s[:8])
    if day is None:
        return None
    clock = _parse_time(s[8:]) if len(s) > 8 else _dt.time(0, 0)
    return None if clock is None else _dt.datetime.combine(day, clock)
