"""Grid, ROI and preprocessing code run without the DICOM reader: importing them never
imports pydicom (checked in a fresh interpreter, where nothing was imported before)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module",
    ["encoders.roi", "encoders.grid", "encoders.preprocess", "encoders.intensity", "encoders.study"],
)
def test_module_does_not_import_pydicom(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'pydicom' or m.startswith('pydicom.')"
        " or m.startswith('encoders.dicom'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} imported {loaded}"


def test_the_check_sees_pydicom_when_it_is_imported() -> None:
    """The subprocess check above can fail: importing the reader does load pydicom."""
    code = "import json, sys, encoders.dicom\nprint(json.dumps('pydicom' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
