"""Compressed transfer syntaxes: a generated CT series converted by independent tools
(gdcmconv, dcmtk) and by pydicom's own encoders reads back as the same HU volume
(lossless) or within a stated tolerance (lossy)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_series, phantom_hu
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from encoders.dicom import SeriesRule, read_study
from encoders.errors import DicomError

N, ROWS = 4, 32
LOSSY_RULE = SeriesRule(allow_derived=True)  # lossy output is DERIVED by the standard

# name -> (command, lossless, tolerance (max abs HU, mean abs HU), storages it supports)
TOOLS: dict[str, tuple[list[str], bool, tuple[float, float], tuple[str, ...]]] = {
    "gdcm-jpeg-lossless": (["gdcmconv", "--jpeg"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-jpegls": (["gdcmconv", "--jpegls"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-j2k": (["gdcmconv", "--j2k"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-rle": (["gdcmconv", "--rle"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-deflated": (["gdcmconv", "--deflated"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-implicit": (["gdcmconv", "-M"], True, (0, 0), ("signed", "unsigned")),
    "gdcm-jpegls-near": (["gdcmconv", "--jpegls", "--lossy"], False, (4, 2), ("signed", "unsigned")),
    "dcmtk-jpeg-sv1": (["dcmcjpeg", "+e1"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-jpegls": (["dcmcjpls", "+el"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-rle": (["dcmcrle"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-deflated": (["dcmconv", "+td"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-big-endian": (["dcmconv", "+tb"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-implicit": (["dcmconv", "+ti"], True, (0, 0), ("signed", "unsigned")),
    "dcmtk-jpeg-baseline": (["dcmcjpeg", "+eb", "+q", "95"], False, (100, 20), ("signed", "unsigned")),
    "dcmtk-jpeg-extended": (["dcmcjpeg", "+ee", "+q", "95"], False, (20, 4), ("signed", "unsigned")),
    "dcmtk-jpegls-near": (["dcmcjpls", "+en", "+md", "2"], False, (2, 2), ("unsigned",)),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Path], np.ndarray]]:
    """Two storages of one phantom: signed int16 (intercept 0), unsigned 12-bit (-1024)."""
    base = tmp_path_factory.mktemp("codec-src")
    ref = np.maximum(phantom_hu(N, ROWS), -1024).astype(np.float32)
    return {
        "signed": (ct_series(base / "s", N, ROWS), ref),
        "unsigned": (ct_series(base / "u", N, ROWS, signed=False, intercept=-1024), ref),
    }


def _check(volume: np.ndarray, ref: np.ndarray, tol: tuple[float, float], what: str) -> None:
    diff = np.abs(volume - ref)
    assert volume.shape == ref.shape, what
    assert diff.max() <= tol[0] and diff.mean() <= tol[1], (
        f"{what}: max {diff.max():.1f} HU, mean {diff.mean():.2f} HU (tolerance {tol})"
    )


@pytest.mark.parametrize("storage", ["signed", "unsigned"])
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_converted_series_reads_back(
    name: str, storage: str, sources: dict, tmp_path: Path
) -> None:
    cmd, lossless, tol, storages = TOOLS[name]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} not installed (apt-get install libgdcm-tools dcmtk)")
    if storage not in storages:
        pytest.skip(f"{name} does not encode {storage} pixels")
    files, ref = sources[storage]
    out = []
    for f in files:
        target = tmp_path / f.name
        run = subprocess.run([*cmd, str(f), str(target)], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr.decode(errors="replace")[-300:]
        out.append(target)
    tsyntax = pydicom.dcmread(out[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    original = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert tsyntax != original, f"{name} did not change the transfer syntax"
    study = read_study(out, series_rule=SeriesRule() if lossless else LOSSY_RULE)
    _check(study.volume, ref, tol, f"{name} ({tsyntax.name}, {storage})")


def _pydicom_encode(files: list[Path], out: Path, tsyntax: str, **kw) -> list[Path]:
    out.mkdir()
    written = []
    for f in files:
        ds = pydicom.dcmread(f)
        if tsyntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = tsyntax
        else:
            ds.compress(tsyntax, **kw)
        ds.save_as(out / f.name, enforce_file_format=True)
        written.append(out / f.name)
    return written


@pytest.mark.parametrize(
    ("tsyntax", "kw", "lossless", "tol", "needs"),
    [
        (RLELossless, {}, True, (0, 0), None),
        (DeflatedExplicitVRLittleEndian, {}, True, (0, 0), None),
        (JPEG2000Lossless, {}, True, (0, 0), "openjpeg"),
        (JPEG2000, {"j2k_psnr": [80]}, False, (60, 8), "openjpeg"),
        (JPEGLSLossless, {}, True, (0, 0), "jpeg_ls"),
    ],
    ids=["rle", "deflated", "j2k-lossless", "j2k-lossy", "jpegls-lossless"],
)
@pytest.mark.parametrize("storage", ["signed", "unsigned"])
def test_pydicom_encoded_series_reads_back(
    tsyntax: str, kw: dict, lossless: bool, tol, needs: str | None, storage: str, sources, tmp_path
) -> None:
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"no {needs} encoder installed")
    files, ref = sources[storage]
    out = _pydicom_encode(files, tmp_path / "enc", tsyntax, **kw)
    rule = SeriesRule() if lossless else SeriesRule(allow_derived=True)
    study = read_study(out, series_rule=rule)
    _check(study.volume, ref, tol, f"pydicom {tsyntax} ({storage})")


def test_missing_codec_names_the_packages(
    sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without any J2K decoder plugin the error names the transfer syntax and packages."""
    files, _ = sources["signed"]
    out = _pydicom_encode(files, tmp_path / "j2k", JPEG2000Lossless)
    decoder = pydicom.pixels.get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    with pytest.raises(DicomError) as info:
        read_study(out)
    assert info.value.reason == "missing_codec"
    assert "JPEG 2000" in str(info.value) and "pylibjpeg" in str(info.value)
