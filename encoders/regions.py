"""Reader regions of a study (interface; the parsers for CSV, LIDC XML, DICOM SEG and
RTSTRUCT live here too once merged)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReaderRegion:
    """One reader's region of one study."""

    reader: str  # reader / observer name
    box: tuple[int, int, int, int, int, int]  # half-open (z0, y0, x0, z1, y1, x1) voxels of
    # the study's sorted series (Study.volume) grid
    lesion: str = ""  # lesion id when the source has one
