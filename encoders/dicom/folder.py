"""Folder scan: every file under a folder grouped by study, with what could not be used
as :class:`~encoders.study.Rejection` (one bad file never sinks the scan)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from encoders.dicom.headers import _read_header
from encoders.dicom.series import annotation_kind
from encoders.dicom.values import _get, _parse_date, _text
from encoders.errors import DicomError
from encoders.study import Rejection

log = logging.getLogger(__name__)


@dataclass
class FileHeader:
    """What a folder scan learns from one file's header (raw values: keep in memory only).

    ``annotation`` is ``"SEG"`` / ``"RTSTRUCT"`` for annotation objects (regions of the
    study, read by ``encoders.regions.regions_for_study``; :func:`read_study` sets them
    aside), ``None`` for images and anything else."""

    path: Path
    study_uid: str
    patient_id: str
    study_date: _dt.date | None
    annotation: str | None = None


def find_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively, sorted, folder links not followed), or
    ``[root]`` for a file. Raises ``DicomError("not_found")`` when ``root`` does not exist."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DicomError("not_found", f"{root}: no such file or folder; check the path")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames))
    return files


def read_file_header(path: Path, index: int = 0) -> FileHeader:
    """Read one file's header (no pixel data): study, patient and date, or DicomError."""
    path = Path(path)
    if not path.is_file():
        raise DicomError("not_a_file", f"{path}: not a regular file (broken link?)")
    h = _read_header(path, index)
    patient_id = _text(_get(h.ds, "PatientID"), 256) or f"NO-PATIENT-ID:{h.study_uid}"
    return FileHeader(
        path, h.study_uid, patient_id, _parse_date(_get(h.ds, "StudyDate")), annotation_kind(h)
    )


def scan_folder(root: Path) -> tuple[dict[str, list[Path]], list[Rejection]]:
    """Walk ``root`` recursively (not following folder links), read headers only, and
    group the files by StudyInstanceUID (never by folder or file name).

    Returns ``({study_uid: sorted paths}, rejections)``; non-DICOM, unreadable, damaged
    files and files without a StudyInstanceUID become :class:`Rejection`s. ``root`` may
    also be a single file. Raises ``DicomError("not_found")`` when ``root`` does not exist.
    A study's annotation objects (SEG, RTSTRUCT) stay in its list, not rejected:
    :func:`read_study` sets them aside and :func:`annotation_files` picks them out for
    ``encoders.regions.regions_for_study``.
    """
    files = find_files(root)
    studies: dict[str, list[Path]] = {}
    rejections: list[Rejection] = []
    for i, path in enumerate(files):
        try:
            h = read_file_header(path, i)
        except DicomError as e:
            rejections.append(Rejection(str(path), str(e)))
            continue
        studies.setdefault(h.study_uid, []).append(path)
    for paths in studies.values():
        paths.sort()
    log.info("scanned %d files: %d studies, %d rejected", len(files), len(studies), len(rejections))
    return studies, rejections


def annotation_files(paths: Sequence[Path]) -> list[Path]:
    """The SEG / RTSTRUCT files among one study's ``paths`` (headers only; unreadable
    files are passed over: :func:`scan_folder` reports them)."""
    out = []
    for i, path in enumerate(paths):
        try:
            if read_file_header(Path(path), i).annotation is not None:
                out.append(Path(path))
        except DicomError:
            continue
    return out
