"""Ingest: a folder of DICOM files (and an outcomes table) into the cohort store.

One bad file or study never sinks the batch: it is reported with a reason and skipped.
Studies already in the store are skipped (re-running an ingest adds nothing twice), and
accepted studies are written in small atomic batches so an interrupted ingest keeps what
it had finished and resumes where it stopped.

Work is spread over a process pool (``workers``, default all cores): workers read
headers (the folder scan, in chunks) and then read + preprocess whole studies; the
parent pseudonymises, computes day offsets and writes the store, in a fixed order so
the store does not depend on scheduling. A worker that dies inside a native decoder
(a crash, not an exception) costs only the study it was reading: the studies in flight
are re-run one by one in fresh processes and the one that crashes again is rejected.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from encoders.deid import Pseudonymizer
from encoders.dicom import (
    DEFAULT_SERIES_RULE,
    FileHeader,
    SeriesRule,
    annotation_files,
    find_files,
    read_file_header,
    read_study,
)
from encoders.errors import DicomError
from encoders.preprocess import preprocess
from encoders.spec import DEFAULT_SPEC, InputSpec
from encoders.study import Rejection
from indexing.errors import StoreError
from indexing.store import ACQUISITION_COLUMNS, CohortStore, StudyRecord

log = logging.getLogger(__name__)

# Columns of an outcomes file that are not outcomes.
_KEY_COLUMNS = {"patient_id"}
_SCAN_CHUNK = 32  # files per scan task
_T = TypeVar("_T")


@dataclass
class IngestReport:
    """What an ingest did; ``to_dict()`` is the CLI's ``--json`` output.

    ``studies`` lists each study ingested in this run: its pseudonym, modality and why
    its series was chosen (``series_reason``: series numbers, counts and notes only).
    """

    studies_found: int = 0
    studies_ingested: int = 0
    studies_already_present: int = 0
    files_seen: int = 0
    files_rejected: list[dict[str, str]] = field(default_factory=list)
    studies_rejected: list[dict[str, str]] = field(default_factory=list)
    outcomes_rows: int = 0
    studies: list[dict[str, str]] = field(default_factory=list)
    workers: int = 1
    #: reader regions stored as detail patches / refused (outside the study, malformed:
    #: ``{"study", "reader", "message"}``) / beyond ``InputSpec.max_patches``
    regions_stored: int = 0
    regions_rejected: list[dict[str, str]] = field(default_factory=list)
    regions_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------ worker side


@dataclass
class _Prepared:
    """One study as a worker hands it back (raw ids: in memory only, never logged)."""

    error: tuple[str, str] | None = None  # (reason, message)
    patient_id: str = ""
    modality: str = ""
    study_date: date | None = None
    acquisition: dict[str, str] = field(default_factory=dict)
    series_reason: str = ""
    volume: np.ndarray | None = None
    grid: dict[str, Any] | None = None
    patches: np.ndarray | None = None
    patch_info: list[dict[str, Any]] | None = None
    bad_regions: list[tuple[str, str]] = field(default_factory=list)  # (reader, message)
    dropped_regions: int = 0


def _prepare_study(
    paths: list[Path], spec: InputSpec, rule: SeriesRule, regions: tuple[Any, ...] = ()
) -> _Prepared:
    """Read and preprocess one study (runs in a worker); never raises. On the whole-study
    grid (``spec.has_patches``) the study's context volume and its detail patches around
    ``regions`` (reader regions, :class:`encoders.regions.ReaderRegion`), the regions of
    the DICOM SEG / RTSTRUCT objects among ``paths`` and the top proposals; a region or
    annotation that does not fit the study is reported, never fatal."""
    grid = patches = info = None
    bad: list[tuple[str, str]] = []
    dropped = 0
    try:
        study = read_study(paths, series_rule=rule)
        if spec.has_patches:
            from encoders.grid import box_centre_mm, study_input
            from encoders.regions import regions_for_study

            sidecars = annotation_files(paths)
            if sidecars:
                skipped: list[tuple[str, str]] = []
                regions = (*regions, *regions_for_study(study, sidecars, skipped=skipped))
                bad.extend(skipped)
            good = []
            for r in regions:
                try:
                    box_centre_mm(r.box, study.volume.shape, study.spacing)
                    good.append(r)
                except DicomError as exc:
                    bad.append((str(r.reader), str(exc)))
            si = study_input(study, spec, regions=good)
            volume, grid = si.context, si.grid.to_dict()
            patches, info = si.patches, [p.to_dict() for p in si.patch_info]
            dropped = si.dropped_regions
        else:
            volume = preprocess(study, spec)
    except DicomError as exc:
        return _Prepared(error=(exc.reason, str(exc)))
    except MemoryError:
        return _Prepared(error=("too_large", f"{paths[0]}: not enough memory for this study"))
    except Exception as exc:  # a bug: report it, do not sink the batch
        log.warning("unexpected %s while preparing a study", type(exc).__name__)
        return _Prepared(
            error=(
                "internal_error",
                f"{paths[0]}: unexpected {type(exc).__name__} while reading this study; "
                "please report it",
            )
        )
    return _Prepared(
        patient_id=study.patient_id,
        modality=study.modality,
        study_date=study.study_date,
        acquisition=study.acquisition,
        series_reason=study.series_reason,
        volume=volume,
        grid=grid,
        patches=patches,
        patch_info=info,
        bad_regions=bad,
        dropped_regions=dropped,
    )


def _scan_chunk(paths: list[Path]) -> list[FileHeader | Rejection]:
    """Read the headers of some files (runs in a worker); never raises."""
    out: list[FileHeader | Rejection] = []
    for path in paths:
        try:
            out.append(read_file_header(path))
        except DicomError as exc:
            out.append(Rejection(str(path), str(exc)))
    return out


# ------------------------------------------------------------------------ the pool


class _Crashed:
    """Result of a task whose worker process died (e.g. a crash in a native decoder)."""


_CRASHED = _Crashed()


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers start from a clean, small server process (no inherited
    threads or locks from the parent), with the reader and this module preloaded, so a
    worker imports nothing when its first task arrives (the CLI imports this module
    lazily: without it here, each worker would import pyarrow and the store itself)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "encoders.dicom", "indexing.ingest"])
    return ctx


def _ping() -> bool:
    return True


def _start_pool(workers: int) -> ProcessPoolExecutor | None:
    """A started pool, or None when worker processes cannot run at all (e.g. the main
    module cannot be re-imported, as for a script read from stdin)."""
    ex = ProcessPoolExecutor(workers, mp_context=_context())
    try:
        if ex.submit(_ping).result(timeout=120):
            return ex
    except Exception as exc:
        log.warning("worker processes cannot start (%s)", type(exc).__name__)
    ex.shutdown(wait=False, cancel_futures=True)
    return None


def _isolated(fn: Callable[..., _T], args: tuple[Any, ...]) -> _T | _Crashed:
    """``fn(*args)`` alone in a fresh process; :data:`_CRASHED` if that process dies."""
    ex = _start_pool(1)
    if ex is None:
        return _CRASHED
    try:
        return ex.submit(fn, *args).result()
    except BrokenProcessPool:
        return _CRASHED
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class _Workers:
    """The ingest's process pool: started once (on first use) and shared by the scan and
    the study phases, restarted after a worker dies; None when it cannot run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._ex: ProcessPoolExecutor | None = None
        self._failed = workers <= 1

    def get(self) -> ProcessPoolExecutor | None:
        if self._ex is None and not self._failed:
            self._ex = _start_pool(self.workers)
            if self._ex is None:
                self._failed = True
                log.warning("running in this process instead of %d workers", self.workers)
        return self._ex

    def reset(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
        self._ex = None

    def close(self) -> None:
        self.reset()
        self._failed = True

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_ordered(
    fn: Callable[..., _T], items: Iterable[tuple[Any, ...]], pool: _Workers
) -> Iterator[_T | _Crashed]:
    """``fn(*args)`` for each item, in item order, on the pool's processes.

    In this process when the pool has one worker or cannot start (logged). At most
    ``2 * workers`` tasks are in flight (bounded memory). If a worker dies, the tasks in
    flight are re-run one at a time in fresh processes; one that kills its process
    again yields :data:`_CRASHED`, the others their results.
    """
    source = iter(items)
    pending: deque[tuple[tuple[Any, ...], Future[_T] | None]] = deque()
    try:
        exhausted = False
        while True:
            ex = pool.get()
            if ex is None and not pending:
                for args in source:  # no pool: the rest in this process
                    yield fn(*args)
                return
            while ex is not None and not exhausted and len(pending) < 2 * pool.workers:
                try:
                    args = next(source)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    pending.append((args, ex.submit(fn, *args)))
                except BrokenProcessPool:
                    pending.append((args, None))
                    break
            if not pending:
                return
            args, fut = pending.popleft()
            try:
                if fut is None:
                    raise BrokenProcessPool("submit failed")
                result = fut.result()
            except BrokenProcessPool:
                redo = [args, *(a for a, _ in pending)]
                log.warning("a worker process died; re-running %d tasks one by one", len(redo))
                pending.clear()
                pool.reset()
                for a in redo:
                    yield _isolated(fn, a)
                continue
            yield result
    finally:
        for _, fut in pending:
            if fut is not None:
                fut.cancel()


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------ ingest


def _scan(files: list[Path], pool: _Workers) -> tuple[list[FileHeader], list[Rejection]]:
    chunks = [files[i : i + _SCAN_CHUNK] for i in range(0, len(files), _SCAN_CHUNK)]
    headers: list[FileHeader] = []
    rejected: list[Rejection] = []
    for chunk, result in zip(
        chunks, _map_ordered(_scan_chunk, ((c,) for c in chunks), pool), strict=True
    ):
        if isinstance(result, _Crashed):  # retry file by file; a file that crashes is refused
            result = []
            for path in chunk:
                one = _isolated(_scan_chunk, ([path],))
                result.extend(
                    one
                    if not isinstance(one, _Crashed)
                    else [
                        Rejection(
                            str(path),
                            f"{path}: reading its header crashed the reader process; the file is hostile or badly damaged",
                        )
                    ]
                )
        for item in result:
            (headers if isinstance(item, FileHeader) else rejected).append(item)  # type: ignore[arg-type]
    return headers, rejected


def store_spec(store: CohortStore, wanted: InputSpec | None = None) -> InputSpec:
    """The input spec of ``store``'s volumes (``wanted`` or the default when it is empty);
    raises :class:`StoreError` when ``wanted`` differs from what the store holds."""
    specs = store.studies(columns=["spec"])["spec"]
    if len(specs) == 0:
        return wanted or DEFAULT_SPEC
    held = InputSpec.from_dict(json.loads(specs[0].as_py()))
    if wanted is not None and wanted != held:
        raise StoreError(
            f"this store holds volumes resampled to {held.spacing_mm} mm, shape {held.shape}; "
            f"cannot add volumes of {wanted.spacing_mm} mm, shape {wanted.shape} (use a new store)"
        )
    return held


def ingest_folder(
    dicom_dir: Path,
    store: CohortStore,
    *,
    pseudonymizer: Pseudonymizer,
    site: str = "local",
    spec: InputSpec | None = None,
    series_rule: SeriesRule = DEFAULT_SERIES_RULE,
    workers: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    regions: Mapping[str, Sequence[Any]] | None = None,
) -> IngestReport:
    """Read every study under ``dicom_dir`` into ``store``; never raises for one bad file.

    ``regions`` maps a raw StudyInstanceUID or raw PatientID (as in a regions CSV,
    ``encoders.regions.regions_from_csv``; the study uid wins) to that study's reader
    regions (:class:`encoders.regions.ReaderRegion`); each becomes a detail patch stored
    with its reader's name (never the raw keys, which stay in memory).

    ``workers``: processes reading and preprocessing (default :func:`default_workers`,
    all cores; 1 = in this process, no pool). ``series_rule`` picks each study's series
    (e.g. ``SeriesRule(allow_burned_in=True)``). ``study_day`` is days since the
    patient's anchor: the first study of the first ingest that saw the patient, kept
    site-side by ``pseudonymizer.date_anchors`` so offsets agree across ingests; an
    older study found later gets a negative offset (dates are never stored).
    ``progress(done, total)`` is called after each study. ``spec`` (how volumes are
    resampled) defaults to the store's: what its studies were resampled with, or
    :data:`encoders.spec.DEFAULT_SPEC` for an empty store; a different one is refused, since
    one store holds volumes of one shape.
    """
    spec = store_spec(store, spec)
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise StoreError(f"{dicom_dir} is not a folder; give the folder that holds the DICOM files")
    n_workers = default_workers() if workers is None else int(workers)
    if n_workers < 1:
        raise StoreError(f"workers must be >= 1, got {workers}")
    files = find_files(dicom_dir)
    store.check_format()
    with _Workers(n_workers) as pool:
        return _ingest(
            files, store, pool, pseudonymizer, site, spec, series_rule, batch_size, progress,
            regions or {},
        )


def _ingest(
    files: list[Path],
    store: CohortStore,
    pool: _Workers,
    pseudonymizer: Pseudonymizer,
    site: str,
    spec: InputSpec,
    series_rule: SeriesRule,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    regions: Mapping[str, Sequence[Any]],
) -> IngestReport:
    headers, rejected = _scan(files, pool)
    groups, first_dates = group_studies(headers, pseudonymizer)
    patient_of: dict[str, str] = {}  # raw study uid -> raw patient id (regions by patient)
    for h in headers:
        patient_of.setdefault(h.study_uid, h.patient_id)
    report = IngestReport(
        studies_found=len(groups),
        files_seen=len(files),
        files_rejected=[_rejection(r) for r in rejected],
        workers=pool.workers,
    )
    present = store.study_uids()
    todo: list[tuple[str, list[Path]]] = []
    for raw_uid, paths in sorted(groups.items()):
        if pseudonymizer.study(raw_uid) in present:
            report.studies_already_present += 1
        else:
            todo.append((raw_uid, paths))
    total = len(groups)
    done = report.studies_already_present
    if progress is not None and done:
        progress(done, total)
    pending: list[StudyRecord] = []

    def regions_of(raw_uid: str) -> tuple[Any, ...]:
        found = regions.get(raw_uid)
        if found is None:
            found = regions.get(patient_of.get(raw_uid, ""), ())
        return tuple(found)

    results = _map_ordered(
        _prepare_study,
        ((paths, spec, series_rule, regions_of(raw_uid)) for raw_uid, paths in todo), pool,
    )
    for (raw_uid, paths), prepared in zip(todo, results, strict=True):
        study_uid = pseudonymizer.study(raw_uid)
        if isinstance(prepared, _Crashed):
            prepared = _Prepared(
                error=(
                    "decoder_crashed",
                    f"{paths[0]}: decoding this study crashed the reader process; a file of it "
                    "is hostile or badly damaged",
                )
            )
        if prepared.error is not None or prepared.volume is None:
            reason, message = prepared.error or ("internal_error", "no volume")
            report.studies_rejected.append(
                {"study": study_uid, "reason": reason, "message": message}
            )
        else:
            pending.append(
                study_record(
                    prepared,
                    study_uid=study_uid,
                    patient_id=pseudonymizer.patient(prepared.patient_id),
                    first_date=first_dates.get(prepared.patient_id),
                    site=site,
                    spec=spec,
                )
            )
            report.regions_stored += sum(
                p.get("source") == "reader" for p in prepared.patch_info or [])
            report.regions_dropped += prepared.dropped_regions
            report.regions_rejected.extend(
                {"study": study_uid, "reader": reader, "message": message}
                for reader, message in prepared.bad_regions)
            report.studies.append(
                {
                    "study": study_uid,
                    "modality": prepared.modality,
                    "series_reason": prepared.series_reason,
                }
            )
        if len(pending) >= batch_size:
            report.studies_ingested += store.add_studies(pending)
            pending = []
        done += 1
        if progress is not None:
            progress(done, total)
    if pending:
        report.studies_ingested += store.add_studies(pending)
    log.info(
        "ingest: %d studies found, %d ingested, %d already present, %d rejected, %d files rejected",
        report.studies_found,
        report.studies_ingested,
        report.studies_already_present,
        len(report.studies_rejected),
        len(report.files_rejected),
    )
    return report


def group_studies(
    headers: list[FileHeader], pseudonymizer: Pseudonymizer
) -> tuple[dict[str, list[Path]], dict[str, date]]:
    """The files of each study (raw StudyInstanceUID -> sorted paths) and each raw
    patient id's day-offset anchor.

    Day offsets count from each patient's anchor, kept site-side across ingests
    (encoders.deid.DateAnchors): the earliest study date of the first ingest that saw
    the patient; older studies found later get negative offsets. Raises
    :class:`StoreError` when the anchors cannot be read or written.
    """
    groups: dict[str, list[Path]] = {}
    first_dates: dict[str, date] = {}
    for h in headers:
        groups.setdefault(h.study_uid, []).append(h.path)
        if h.study_date is not None:
            known = first_dates.get(h.patient_id)
            if known is None or h.study_date < known:
                first_dates[h.patient_id] = h.study_date
    for paths in groups.values():
        paths.sort()
    try:
        first_dates = pseudonymizer.date_anchors.resolve(first_dates)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot use the date anchors: {exc}") from None
    return groups, first_dates


def study_record(
    prepared: _Prepared,
    *,
    study_uid: str,
    patient_id: str,
    first_date: date | None,
    site: str,
    spec: InputSpec,
) -> StudyRecord:
    """The store row of one study read by :func:`_prepare_study` (which must have
    succeeded): ``study_uid`` and ``patient_id`` are the pseudonyms, ``first_date`` the
    patient's anchor (``study_day`` counts from it). Shared by the single-process ingest
    and the Ray stages (:mod:`indexing.distributed`), so both write the same rows."""
    if prepared.volume is None:
        raise ValueError("study_record needs a study that was read without error")
    day = (
        (prepared.study_date - first_date).days
        if (first_date is not None and prepared.study_date is not None)
        else None
    )
    return StudyRecord(
        patient_id=patient_id,
        study_uid=study_uid,
        site=site,
        modality=prepared.modality,
        study_day=day,
        volume=prepared.volume,
        spec=spec,
        grid=prepared.grid,
        patches=prepared.patches,
        patch_info=prepared.patch_info,
        **_acquisition_fields(prepared.acquisition),
    )


def _acquisition_fields(acq: dict[str, str]) -> dict[str, Any]:
    """The acquisition values the store has columns for (StudyRecord keyword arguments)."""
    return {name: acq.get(name) for name in ACQUISITION_COLUMNS}


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
    label_cols = [
        c
        for c in other
        if pa.types.is_string(table[c].type) or pa.types.is_large_string(table[c].type)
    ]
    value_cols = [
        c
        for c in other
        if pa.types.is_integer(table[c].type) or pa.types.is_floating(table[c].type)
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
