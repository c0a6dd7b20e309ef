"""Pull from a PACS into the cohort store over DICOMweb (``cohortsim ingest --dicomweb``).

:func:`pull_studies` lists the studies (QIDO-RS) or takes the given UIDs, skips those the
store already holds, retrieves the others into a private spool
(:func:`service.pacs.dicomweb.fetch_study`, resumable) and hands them to the folder
ingest a batch at a time; a study's files leave the spool once it is ingested.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from service.pacs.dicomweb import (
    READY_DIR,
    DicomwebConfig,
    fetch_study,
    find_studies,
    private_dir,
    uid_hash,
)
from service.pacs.errors import PacsError

log = logging.getLogger(__name__)


@dataclass
class PullCounts:
    """What a pull fetched (the ``pacs`` part of the ingest's JSON report)."""

    pacs: str = ""
    studies_listed: int = 0
    studies_fetched: int = 0
    instances_fetched: int = 0
    instances_reused: int = 0
    studies_not_found: list[str] = field(default_factory=list)  # pseudonyms


def merge_reports(total: Any, part: Any) -> None:
    """Add ingest report ``part`` into ``total`` (both ``indexing.ingest.IngestReport``)."""
    total.studies_found += part.studies_found
    total.studies_ingested += part.studies_ingested
    total.studies_already_present += part.studies_already_present
    total.files_seen += part.files_seen
    total.files_rejected.extend(part.files_rejected)
    total.studies_rejected.extend(part.studies_rejected)
    total.studies.extend(part.studies)
    total.workers = max(total.workers, part.workers)
    total.regions_stored += part.regions_stored
    total.regions_rejected.extend(part.regions_rejected)
    total.regions_dropped += part.regions_dropped


def pull_studies(
    cfg: DicomwebConfig,
    store: Any,
    *,
    pseudonymizer: Any,
    spool: Path,
    study_uids: Sequence[str] = (),
    since: date | None = None,
    modality: str | None = None,
    batch_studies: int = 8,
    ingest: Callable[[Path], Any],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, PullCounts]:
    """Fetch the studies the PACS lists (or ``study_uids``) that ``store`` lacks and ingest
    them, ``batch_studies`` at a time, with ``ingest(folder) -> IngestReport``.

    Resumable: fetched instances wait in ``spool`` (0700) until their study is ingested,
    so a re-run after a failure fetches only what is missing; studies already in the
    store are skipped without a fetch. Returns ``(merged IngestReport, PullCounts)``;
    raises ``PacsError`` when the PACS is down (what was fetched stays in the spool).
    """
    from indexing.ingest import IngestReport

    client = cfg.client()
    spool = private_dir(spool)
    ready = private_dir(spool / READY_DIR)
    counts = PullCounts(pacs=cfg.label)
    report = IngestReport()
    if any(ready.iterdir()):  # studies fetched by a run that stopped before ingesting them
        merge_reports(report, ingest(ready))
        shutil.rmtree(ready)
        ready = private_dir(ready)
    uids = list(dict.fromkeys(study_uids)) or find_studies(cfg, since=since, modality=modality, client=client)
    counts.studies_listed = len(uids)
    present = store.study_uids()
    todo = [u for u in uids if pseudonymizer.study(u) not in present]
    report.studies_found += len(uids) - len(todo)
    report.studies_already_present += len(uids) - len(todo)
    done = len(uids) - len(todo)
    if progress is not None:
        progress(done, len(uids))
    batch = 0
    for uid in todo:
        partial = spool / "partial" / uid_hash(uid)
        try:
            got = fetch_study(cfg, uid, partial, client=client)
        except PacsError as exc:
            if exc.kind != "not_found":
                raise
            counts.studies_not_found.append(pseudonymizer.study(uid))
            report.studies_rejected.append(
                {"study": pseudonymizer.study(uid), "reason": exc.reason, "message": str(exc)}
            )
            shutil.rmtree(partial, ignore_errors=True)
        else:
            counts.studies_fetched += 1
            counts.instances_fetched += got.fetched
            counts.instances_reused += got.reused
            os.replace(partial, ready / uid_hash(uid))  # complete: hand it to the ingest
            batch += 1
        done += 1
        if batch >= batch_studies:
            merge_reports(report, ingest(ready))
            shutil.rmtree(ready)
            ready = private_dir(ready)
            batch = 0
        if progress is not None:
            progress(done, len(uids))
    if batch:
        merge_reports(report, ingest(ready))
        shutil.rmtree(ready)
    shutil.rmtree(spool / "partial", ignore_errors=True)
    log.info(
        "dicomweb pull: %d studies listed, %d fetched (%d instances, %d reused), %d not found",
        counts.studies_listed, counts.studies_fetched, counts.instances_fetched,
        counts.instances_reused, len(counts.studies_not_found),
    )
    return report, counts
