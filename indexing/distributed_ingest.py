"""Ingest on a Ray cluster: DICOM decode, de-identification and preprocessing as Ray Data
stages, store parts written by the workers (``cohortsim ingest --ray [ADDRESS]``).

The same steps as :func:`indexing.ingest.ingest_folder`, with the same functions:

1. a Ray Data stage reads the file headers in chunks (:func:`indexing.ingest._scan_chunk`);
2. the driver groups the files by study, fixes each patient's day anchor
   (:func:`indexing.ingest.group_studies`) and pseudonymises the study and patient ids.
   The site secret never leaves the driver: each study's task carries its pseudonyms
   and anchors, so a worker needs no secret;
3. a second stage reads and preprocesses each study (:func:`indexing.ingest._prepare_study`),
   makes its de-identified row (:func:`indexing.ingest.study_record`) and appends each
   batch of rows to the store as one part file (:meth:`CohortStore.add_studies`: atomic,
   idempotent). Raw ids and dates stay in the worker's memory; nothing is written
   before de-identification.

Studies already in the store are not sent again, so a killed ingest resumes where it
stopped. One bad file or study is reported and skipped. A batch whose worker dies (a
crash in a native decoder) is retried by Ray; if it fails again its studies are re-run
one per task, and a study that still fails is rejected with ``worker_failed``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from encoders.deid import Pseudonymizer
from encoders.dicom import DEFAULT_SERIES_RULE, FileHeader, SeriesRule, find_files
from encoders.spec import InputSpec
from encoders.study import Rejection
from indexing.distributed import ray_session
from indexing.errors import StoreError
from indexing.ingest import (
    _SCAN_CHUNK,
    IngestReport,
    _prepare_study,
    _rejection,
    _scan_chunk,
    group_studies,
    store_spec,
    study_record,
)
from indexing.store import CohortStore

log = logging.getLogger(__name__)

RAY_BATCH_SIZE = 32  # studies per Ray task (one store part file each)
TASK_RETRIES = 2  # a task whose worker died is tried this many more times


# ------------------------------------------------------------------------ worker side


def scan_stage(batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Ray Data stage: the headers of a chunk of files (one JSON row per file)."""
    rows: list[str] = []
    for chunk in batch["chunk"]:
        for item in _scan_chunk([Path(p) for p in json.loads(str(chunk))]):
            if isinstance(item, FileHeader):
                rows.append(json.dumps({
                    "path": str(item.path), "study": item.study_uid, "patient": item.patient_id,
                    "date": item.study_date.isoformat() if item.study_date else None,
                }))  # fmt: skip
            else:
                rows.append(json.dumps({"path": item.path, "rejected": item.reason}))
    return {"header": rows}


def ingest_stage(
    batch: dict[str, np.ndarray], *, store_root: str, spec: str, rule: SeriesRule, site: str
) -> dict[str, list[str]]:
    """Ray Data stage: read, preprocess and de-identify a batch of studies and append them
    to the store as one part file; returns one JSON row: what happened to each study."""
    input_spec = InputSpec.from_dict(json.loads(spec))
    records = []
    studies: list[dict[str, str]] = []
    rejected: list[dict[str, str]] = []
    for raw in batch["task"]:
        task = json.loads(str(raw))
        prepared = _prepare_study([Path(p) for p in task["paths"]], input_spec, rule)
        if prepared.error is None and prepared.volume is not None:
            ids = task["patients"].get(prepared.patient_id) or task["patients"].get(
                prepared.patient_id.strip().strip("\x00").strip()
            )
            if ids is None:
                prepared.error = (
                    "patient_id_mismatch",
                    f"{task['paths'][0]}: the chosen series names another patient than the "
                    "study's headers; check the study",
                )
        if prepared.error is not None or prepared.volume is None:
            reason, message = prepared.error or ("internal_error", "no volume")
            rejected.append({"study": task["study"], "reason": reason, "message": message})
            continue
        pseudonym, anchor = ids
        records.append(
            study_record(
                prepared,
                study_uid=task["study"],
                patient_id=pseudonym,
                first_date=dt.date.fromisoformat(anchor) if anchor else None,
                site=site,
                spec=input_spec,
            )
        )
        studies.append({
            "study": task["study"], "modality": prepared.modality,
            "series_reason": prepared.series_reason,
        })  # fmt: skip
    added = CohortStore(store_root).add_studies(records) if records else 0
    result = {"added": added, "studies": studies, "rejected": rejected, "n": len(batch["task"])}
    return {"result": [json.dumps(result)]}


# ------------------------------------------------------------------------ the driver


def _scan(ray: Any, files: list[Path]) -> tuple[list[FileHeader], list[Rejection]]:
    chunks = [files[i : i + _SCAN_CHUNK] for i in range(0, len(files), _SCAN_CHUNK)]
    if not chunks:
        return [], []
    ds = ray.data.from_items(
        [{"chunk": json.dumps([str(p) for p in c])} for c in chunks],
        override_num_blocks=len(chunks),
    ).map_batches(scan_stage, batch_size=1, batch_format="numpy")
    headers: list[FileHeader] = []
    rejected: list[Rejection] = []
    for row in ds.iter_rows():
        h = json.loads(row["header"])
        if "rejected" in h:
            rejected.append(Rejection(h["path"], h["rejected"]))
        else:
            date = dt.date.fromisoformat(h["date"]) if h["date"] else None
            headers.append(FileHeader(Path(h["path"]), h["study"], h["patient"], date))
    headers.sort(key=lambda h: str(h.path))  # the folder order, as the single-process scan
    rejected.sort(key=lambda r: r.path)
    return headers, rejected


def _run_tasks(
    ray: Any, tasks: list[str], batch_size: int, stage: Callable[..., dict[str, list[str]]],
    kwargs: dict[str, Any], on_result: Callable[[dict[str, Any]], None],
) -> None:  # fmt: skip
    """Run the tasks through ``stage`` in batches; a batch whose Ray task fails (after
    Ray's retries) is skipped: the caller re-runs what did not come back."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a failed batch does not stop the others
    try:
        blocks = max(1, (len(tasks) + batch_size - 1) // batch_size)
        ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=blocks)
        with warnings.catch_warnings():  # max_retries has no named parameter (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            # Ray Data retries a task whose worker died without end by default: a study
            # that crashes its decoder would loop forever
            ds = ds.map_batches(stage, batch_size=batch_size, batch_format="numpy",
                                fn_kwargs=kwargs, max_retries=TASK_RETRIES)  # fmt: skip
        for row in ds.iter_rows():
            on_result(json.loads(row["result"]))
    finally:
        ctx.max_errored_blocks = before


def run_isolating_failures(
    ray: Any, tasks: dict[str, str], batch_size: int, stage: Callable[..., dict[str, list[str]]],
    kwargs: dict[str, Any], on_result: Callable[[dict[str, Any]], None],
) -> list[str]:  # fmt: skip
    """Run ``tasks`` (key -> JSON task) through ``stage`` in batches of ``batch_size``;
    the tasks of a batch that failed are run again one per batch. Returns the keys that
    failed alone too. ``stage`` returns one JSON row per batch whose ``studies`` and
    ``rejected`` lists name the keys (``study``) it answered."""
    answered: set[str] = set()

    def collect(result: dict[str, Any]) -> None:
        answered.update(s["study"] for s in result["studies"] + result["rejected"])
        on_result(result)

    _run_tasks(ray, list(tasks.values()), batch_size, stage, kwargs, collect)
    lost = [key for key in tasks if key not in answered]
    if lost and batch_size > 1:  # one per batch, to find the culprit
        log.warning("ingest: batches of %d studies failed; re-running them one by one", len(lost))
        _run_tasks(ray, [tasks[key] for key in lost], 1, stage, kwargs, collect)
    return [key for key in lost if key not in answered]


def ingest_folder_ray(
    dicom_dir: Path,
    store: CohortStore,
    *,
    pseudonymizer: Pseudonymizer,
    address: str | None = None,
    site: str = "local",
    spec: InputSpec | None = None,
    series_rule: SeriesRule = DEFAULT_SERIES_RULE,
    batch_size: int = RAY_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """:func:`indexing.ingest.ingest_folder` on a Ray cluster (``address`` as in
    :func:`indexing.distributed.ray_session`); the store must be on a file system every
    node sees at the same path. ``batch_size``: studies per task and per part file at
most (fewer when that leaves less than two tasks a CPU).
    ``report.workers`` is the cluster's CPU count."""
    spec = store_spec(store, spec)
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise StoreError(f"{dicom_dir} is not a folder; give the folder that holds the DICOM files")
    if batch_size < 1:
        raise StoreError(f"batch_size must be >= 1, got {batch_size}")
    files = [p.resolve() for p in find_files(dicom_dir)]
    with ray_session(address) as ray:
        headers, rejected = _scan(ray, files)
        groups, first_dates = group_studies(headers, pseudonymizer)
        report = IngestReport(
            studies_found=len(groups),
            files_seen=len(files),
            files_rejected=[_rejection(r) for r in rejected],
            workers=int(ray.cluster_resources().get("CPU", 1)),
        )
        patients_of: dict[str, set[str]] = {}
        for h in headers:
            patients_of.setdefault(h.study_uid, set()).add(h.patient_id)
        present = store.study_uids()
        tasks: dict[str, str] = {}
        for raw_uid, paths in sorted(groups.items()):
            study_uid = pseudonymizer.study(raw_uid)
            if study_uid in present:
                report.studies_already_present += 1
                continue
            patients = {}
            for pid in sorted(patients_of[raw_uid]):
                anchor = first_dates.get(pid)
                ids = [pseudonymizer.patient(pid), anchor.isoformat() if anchor else None]
                patients[pid] = ids
                patients[pid.strip().strip("\x00").strip()] = ids
            tasks[study_uid] = json.dumps(
                {"study": study_uid, "paths": [str(p) for p in paths], "patients": patients}
            )
        total, done = len(groups), report.studies_already_present
        if progress is not None and done:
            progress(done, total)
        kwargs = {"store_root": str(store.root.resolve()), "spec": json.dumps(spec.to_dict()),
                  "rule": series_rule, "site": site}  # fmt: skip

        def on_result(result: dict[str, Any]) -> None:
            nonlocal done
            report.studies_ingested += int(result["added"])
            report.studies.extend(result["studies"])
            report.studies_rejected.extend(result["rejected"])
            done += int(result["n"])
            if progress is not None:
                progress(done, total)

        # at least two tasks a CPU, so that a small ingest is spread too
        per_task = max(1, min(batch_size, -(-len(tasks) // (2 * report.workers))))
        failed = run_isolating_failures(ray, tasks, per_task, ingest_stage, kwargs, on_result)
        for uid in failed:
            report.studies_rejected.append({
                "study": uid, "reason": "worker_failed",
                "message": "reading this study failed its Ray worker twice (a crash in a "
                "decoder, or the worker ran out of memory); a file of it may be hostile or "
                "badly damaged",
            })  # fmt: skip
    order = {uid: i for i, uid in enumerate(tasks)}  # the single-process order
    report.studies.sort(key=lambda s: order[s["study"]])
    report.studies_rejected.sort(key=lambda s: order[s["study"]])
    log.info(
        "ingest (ray): %d studies found, %d ingested, %d already present, %d rejected",
        report.studies_found, report.studies_ingested, report.studies_already_present,
        len(report.studies_rejected),
    )  # fmt: skip
    return report
