"""One ingest path behind the three ways in: a folder of studies (from the C-STORE spool
or a DICOMweb pull) goes through :func:`indexing.ingest.ingest_folder` (reading,
de-identification with the site's pseudonymiser, preprocessing) and, when an index is
given, the new studies are published into it (:func:`indexing.incremental.publish_new_studies`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoders.dicom import DEFAULT_SERIES_RULE, SeriesRule
from indexing.ingest import IngestReport, ingest_folder
from indexing.store import CohortStore

if TYPE_CHECKING:
    from indexing.incremental import PublishResult

log = logging.getLogger(__name__)


@dataclass
class Inflow:
    """Where studies go: ``store_dir`` (created if missing) and, optionally, ``index_dir``
    whose current version gains the new studies (embedded with its own encoder).
    ``regions``: reader regions by raw StudyInstanceUID or PatientID (as
    :func:`encoders.regions.regions_from_csv` gives them), each stored as a detail patch of
    its study when that study comes in (``ingest_folder``'s ``regions``)."""

    store_dir: Path
    pseudonymizer: Any
    index_dir: Path | None = None
    site: str = "local"
    workers: int | None = 1
    series_rule: SeriesRule = DEFAULT_SERIES_RULE
    rebuild_threshold: float | None = None  # None: indexing.incremental's default
    device: str = "cpu"
    last_report: IngestReport | None = None
    last_publish: PublishResult | None = None
    pending: bool = False  # studies ingested but not yet published
    regions: Mapping[str, Sequence[Any]] | None = None

    def store(self) -> CohortStore:
        return CohortStore(self.store_dir, create=True)

    def ingest(self, folder: Path) -> IngestReport:
        """Ingest every study under ``folder``; no publish."""
        report = ingest_folder(
            folder, self.store(), pseudonymizer=self.pseudonymizer, site=self.site,
            series_rule=self.series_rule, workers=self.workers, regions=self.regions,
        )
        self.last_report = report
        log.info(
            "inflow: %d studies ingested, %d already present, %d rejected",
            report.studies_ingested, report.studies_already_present, len(report.studies_rejected),
        )
        return report

    def publish(self) -> PublishResult | None:
        """Publish the store's studies that the index lacks (None: no index or none new)."""
        if self.index_dir is None:
            return None
        # imported here: it pulls in torch, which a listener without an index never needs
        from indexing.incremental import DEFAULT_REBUILD_THRESHOLD, publish_new_studies

        threshold = self.rebuild_threshold if self.rebuild_threshold is not None else DEFAULT_REBUILD_THRESHOLD
        result = publish_new_studies(self.store(), self.index_dir, rebuild_threshold=threshold, device=self.device)
        self.last_publish = result
        return result

    def __call__(self, folder: Path) -> IngestReport:
        """Ingest then publish (the listener's callback). A publish that fails (the index
        folder's disk full, say) is retried by :meth:`publish_pending`; the studies are
        in the store already, so nothing is lost meanwhile."""
        report = self.ingest(folder)
        if report.studies_ingested:
            self.pending = True
        self.publish_pending()
        return report

    def publish_pending(self) -> PublishResult | None:
        """Publish when studies were ingested since the last successful publish."""
        if not self.pending:
            return None
        result = self.publish()
        self.pending = False
        return result
