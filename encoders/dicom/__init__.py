"""Reading DICOM studies: folder scan, series choice, geometry, pixels, intensities.

Every failure a caller can meet leaves :func:`scan_folder` as a :class:`Rejection` and
:func:`read_study` as a :class:`~encoders.errors.DicomError` (never a raw pydicom / numpy
exception). Messages name files by the path given (or ``<bytes #i>`` for in-memory
sources) and never carry patient data.

Reading a study is two passes: headers only (``stop_before_pixels``) for every source, to
group by series, choose one series by :class:`SeriesRule` and work out the geometry; then
full reads for the chosen series only, after checking declared pixel sizes against the
bytes present and the size caps, so absurd headers never allocate.

Modules, one concern each:

* :mod:`~encoders.dicom.reading` — bounded reading of one file (caps, read calls,
  pydicom failures as ``DicomError``, pydicom silenced while it reads);
* :mod:`~encoders.dicom.values` — defensive typed header values;
* :mod:`~encoders.dicom.headers` — one file's header, de-identification-safe acquisition
  values;
* :mod:`~encoders.dicom.folder` — folder scan grouped by study;
* :mod:`~encoders.dicom.series` — which series is embedded (:class:`SeriesRule`);
* :mod:`~encoders.dicom.positions` — slice positions, orientation, spacing, duplicates;
* :mod:`~encoders.dicom.pixels` — size caps, decoding, codecs, the rescaled volume;
* :mod:`~encoders.dicom.modality` — per-modality intensity profiles (CT, MR, PET);
* :mod:`~encoders.dicom.read` — :func:`read_study`.

Preprocessing (:mod:`encoders.preprocess`), intensity units (:mod:`encoders.intensity`)
and the :class:`Study` type (:mod:`encoders.study`) live outside this package so that grid
and ROI code never import pydicom; they are re-exported here for callers that read and
preprocess in one place.
"""

from __future__ import annotations

from encoders.dicom.folder import (
    FileHeader,
    annotation_files,
    find_files,
    read_file_header,
    scan_folder,
)
from encoders.dicom.headers import ACQUISITION_NUMBERS, ACQUISITION_TEXT
from encoders.dicom.modality import CT_AIR_HU, ModalityProfile, profile_for, register_profile
from encoders.dicom.pixels import COLOUR_PHOTOMETRIC, read_pixels
from encoders.dicom.read import read_study
from encoders.dicom.reading import (
    MAX_EXTRA_FILE_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_READS,
    MAX_INFLATED_BYTES,
    MAX_PIXELS_PER_SLICE_SIDE,
    MAX_SLICES,
    MAX_VOXELS,
)
from encoders.dicom.series import DEFAULT_SERIES_RULE, SeriesRule
from encoders.errors import DicomError
from encoders.geometry import patient_to_voxel, voxel_to_patient
from encoders.grid import block_mean
from encoders.intensity import (
    INTENSITY_HU,
    INTENSITY_PERCENTILE,
    INTENSITY_SUV,
    NORM_MAX,
    NORM_SCALE,
    SUV_SCALE,
)
from encoders.preprocess import box_to_input_grid, preprocess
from encoders.study import Rejection, Study

__all__ = [
    "ACQUISITION_NUMBERS",
    "ACQUISITION_TEXT",
    "COLOUR_PHOTOMETRIC",
    "CT_AIR_HU",
    "DEFAULT_SERIES_RULE",
    "INTENSITY_HU",
    "INTENSITY_PERCENTILE",
    "INTENSITY_SUV",
    "MAX_EXTRA_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_READS",
    "MAX_INFLATED_BYTES",
    "MAX_PIXELS_PER_SLICE_SIDE",
    "MAX_SLICES",
    "MAX_VOXELS",
    "NORM_MAX",
    "NORM_SCALE",
    "SUV_SCALE",
    "DicomError",
    "FileHeader",
    "ModalityProfile",
    "Rejection",
    "SeriesRule",
    "Study",
    "annotation_files",
    "block_mean",
    "box_to_input_grid",
    "find_files",
    "patient_to_voxel",
    "preprocess",
    "profile_for",
    "read_file_header",
    "read_pixels",
    "read_study",
    "register_profile",
    "scan_folder",
    "voxel_to_patient",
]
