"""Each file is parsed once per read: the headers-only parse of read_study keeps where it
stopped, and the pixel data element is read from there (no second dcmread)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_series, phantom_hu

import encoders.dicom as dicom
from encoders.dicom.headers import _read_header
from encoders.dicom.pixels import _decode


def test_read_study_parses_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = ct_series(tmp_path / "ct", n=6, rows=32, seed=4)
    calls: list[bool] = []
    real = pydicom.dcmread

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(bool(kwargs.get("stop_before_pixels")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    study = dicom.read_study(paths)
    assert calls == [True] * len(paths)  # headers only, once per file; pixels read after
    assert np.allclose(study.volume, phantom_hu(6, 32, 4))


def test_pixel_elements_do_not_stay_in_the_headers(tmp_path: Path) -> None:
    """After decoding, the header keeps no pixel data (memory stays bounded by the volume)."""
    paths = ct_series(tmp_path / "ct", n=3, rows=16, seed=1)
    headers = [_read_header(p, i) for i, p in enumerate(paths)]
    for h in headers:
        stored, _ = _decode(h)
        assert stored.shape == (1, 16, 16)
        assert "PixelData" not in h.ds
