"""Ingest: a folder of DICOM files (and an outcomes table) into the cohort store.

One bad file or study never sinks the batch: it is reported with a reason and skipped.
Studies already in the store are skipped (re-running an ingest adds nothing twice), and
accepted studies are written in small atomic batches so an interrupted ingest keeps what
it had finished and resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from encoders.deid import Pseudonymizer
from encoders.dicom import Rejection, preprocess, read_study, scan_folder
from encoders.errors import DicomError
from encoders.spec import DEFAULT_SPEC, InputSpec
from indexing.errors import StoreError
from indexing.store import CohortStore, StudyRecord

# Columns of an outcomes file that are not outcomes.
_KEY_COLUMNS = {"patient_id"}


@dataclass
class IngestReport:
    """What an ingest did; ``to_dict()`` is the CLI's ``--json`` output."""

    studies_found: int = 0
    studies_ingested: int = 0
    studies_already_present: int = 0
    files_seen: int = 0
    files_rejected: list[dict[str, str]] = field(default_factory=list)
    studies_rejected: list[dict[str, str]] = field(default_factory=list)
    outcomes_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_study_dates(groups: dict[str, list[Path]]) -> dict[str, date]:
    """Earliest StudyDate per raw patient id, read from one header per study."""
    import pydicom

    first: dict[str, date] = {}
    for paths in groups.values():
        try:
            ds = pydicom.dcmread(
                paths[0], stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"]
            )
            pid = str(ds.get("PatientID", ""))
            raw = str(ds.get("StudyDate", ""))
            if not pid or len(raw) != 8:
                continue
            d = date(int(raw[:4]), int(raw[4:6]), int(raw[6:8]))
        except Exception:  # an unreadable date only costs the day offset
            continue
        if pid not in first or d < first[pid]:
            first[pid] = d
    return first


def ingest_folder(
    dicom_dir: Path,
    store: CohortStore,
    *,
    pseudonymizer: Pseudonymizer,
    site: str = "local",
    spec: InputSpec = DEFAULT_SPEC,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Read every study under ``dicom_dir`` into ``store``; never raises for one bad file.

    ``progress(done, total)`` is called after each study.
    """
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise StoreError(f"{dicom_dir} is not a folder; give the folder that holds the DICOM files")
    groups, rejected = scan_folder(dicom_dir)
    report = IngestReport(
        studies_found=len(groups),
        files_seen=sum(len(p) for p in groups.values()) + len(rejected),
        files_rejected=[_rejection(r) for r in rejected],
    )
    present = store.study_uids()
    first_dates = _first_study_dates(groups)
    pending: list[StudyRecord] = []
    total = len(groups)
    for done, (raw_uid, paths) in enumerate(sorted(groups.items()), start=1):
        study_uid = pseudonymizer.study(raw_uid)
        if study_uid in present:
            report.studies_already_present += 1
        else:
            try:
                study = read_study(paths)
                volume = preprocess(study, spec)
            except DicomError as exc:
                report.studies_rejected.append(
                    {"study": study_uid, "reason": exc.reason, "message": str(exc)}
                )
            else:
                first = first_dates.get(study.patient_id)
                day = (
                    (study.study_date - first).days
                    if (first is not None and study.study_date is not None)
                    else None
                )
                acq = study.acquisition
                pending.append(
                    StudyRecord(
                        patient_id=pseudonymizer.patient(study.patient_id),
                        study_uid=study_uid,
                        site=site,
                        modality=study.modality,
                        study_day=day,
                        volume=volume,
                        spec=spec,
                        manufacturer=acq.get("manufacturer"),
                        model=acq.get("model"),
                        kernel=acq.get("kernel"),
                        kvp=acq.get("kvp"),
                        slice_thickness=acq.get("slice_thickness"),
                        pixel_spacing=acq.get("pixel_spacing"),
                    )
                )
                present.add(study_uid)
        if len(pending) >= batch_size:
            report.studies_ingested += store.add_studies(pending)
            pending = []
        if progress is not None:
            progress(done, total)
    if pending:
        report.studies_ingested += store.add_studies(pending)
    return report


def _rejection(r: Rejection) -> dict[str, str]:
    return {"path": str(r.path), "reason": r.reason}


def _parse_event(v: Any) -> bool | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "dead", "event"):
        return True
    if s in ("0", "false", "no", "n", "alive", "censored"):
        return False
    if s == "":
        return None
    raise StoreError(f"event value {v!r} is not one of 0/1/true/false")


def read_outcomes(path: Path, pseudonymizer: Pseudonymizer | None) -> pa.Table:
    """Read an outcomes CSV or Parquet file into the store's outcome schema.

    Columns: ``patient_id`` (raw, pseudonymised here with the site secret, unless
    ``pseudonymizer`` is None because the ids are pseudonyms already), optional ``time``
    (number, in the cohort's time unit) and ``event`` (0/1), and any other columns:
    text columns become categorical ``labels``, numeric columns numeric ``values``.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"outcomes file {path} does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(column_types={"patient_id": pa.string()}),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read outcomes file {path}: {exc}") from None
    if "patient_id" not in table.column_names:
        raise StoreError(
            f"outcomes file {path} has no patient_id column (columns: {', '.join(table.column_names)})"
        )
    times: list[float | None] = []
    if "time" in table.column_names:
        try:
            tcol = pc.cast(table["time"], pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise StoreError(f"outcomes file {path}: column time must be numeric") from None
        times = tcol.to_pylist()
        for i, t in enumerate(times):
            if t is not None and (math.isnan(t) or t < 0):
                raise StoreError(f"outcomes file {path}: row {i + 1} has an invalid time {t}")
    else:
        times = [None] * table.num_rows
    events: list[bool | None] = []
    if "event" in table.column_names:
        for i, v in enumerate(table["event"].to_pylist()):
            try:
                events.append(_parse_event(v))
            except StoreError as exc:
                raise StoreError(f"outcomes file {path}: row {i + 1}: {exc}") from None
    else:
        events = [None] * table.num_rows
    other = [c for c in table.column_names if c not in _KEY_COLUMNS | {"time", "event"}]
    label_cols = [c for c in other if pa.types.is_string(table[c].type) or pa.types.is_large_string(table[c].type)]
    value_cols = [
        c for c in other if pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type)
    ]
    ids = [str(x) if x is not None else None for x in table["patient_id"].to_pylist()]
    labels_rows: list[list[tuple[str, str]]] = []
    values_rows: list[list[tuple[str, float]]] = []
    cols = {c: table[c].to_pylist() for c in label_cols + value_cols}
    for i in range(table.num_rows):
        labels_rows.append([(c, str(cols[c][i])) for c in label_cols if cols[c][i] is not None])
        values_rows.append(
            [
                (c, float(cols[c][i]))
                for c in value_cols
                if cols[c][i] is not None and not math.isnan(float(cols[c][i]))
            ]
        )
    keep = [i for i, pid in enumerate(ids) if pid]
    pids = [
        pseudonymizer.patient(ids[i]) if pseudonymizer is not None else ids[i]  # type: ignore[arg-type]
        for i in keep
    ]
    return pa.table(
        {
            "patient_id": pa.array(pids, pa.string()),
            "time": pa.array([times[i] for i in keep], pa.float64()),
            "event": pa.array([events[i] for i in keep], pa.bool_()),
            "labels": pa.array([labels_rows[i] for i in keep], pa.map_(pa.string(), pa.string())),
            "values": pa.array([values_rows[i] for i in keep], pa.map_(pa.string(), pa.float64())),
        }
    )
