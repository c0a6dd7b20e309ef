"""Shard mode: a coordinator over the shards of one institution's index (trusted).

``cohortsim serve --federate shards.toml`` with ``mode = "shards"`` at the top of the file
serves one index split by patient (``cohortsim index build --shards N``) as if it were
one server. Each ``[[site]]`` table names a shard (``cohortsim serve --index
DIR/shard-i``) and its ``index`` folder, from which the coordinator reads the shard's
cohort metadata and manifest (never its vectors): a shared file system or a copy.

What differs from federation (:mod:`service.coordinator`), because the shards belong to
one institution and hold one cohort:

* **Every shard must answer.** A shard that is down, slow or on another encoder makes
  the call fail (UNAVAILABLE ``SHARD_MISSING`` / FAILED_PRECONDITION) instead of a
  partial answer: an answer without a shard is not the index's answer.
* **Neighbours from every shard, no suppression between shards.** The coordinator asks
  each shard ``SearchSite`` for its top ``max(k, k_ood)``, merges them exactly
  (:func:`merge_shards`: similarity descending, ties by ``study_uid``), and assembles the
  answer with the engine's pieces over :class:`ShardCohort`, the union of the shards'
  metadata: the prognosis of the merged neighbours with the kernel chosen for the whole
  cohort, the whole cohort's survival curve and skill notices, the out-of-distribution
  percentile of the query's ``k_ood`` nearest studies of the union against the whole
  cohort's reference (written at build).
* **Single-server governance at the coordinator.** Callers without the ``identities``
  right get :class:`service.governance.Governance`'s researcher view of the *merged*
  answer, applied once, with the coordinator's own disclosure policy and release record;
  the shards' min-cell and per-site aggregates (``AggregateSite``) are not used.
  The coordinator's credential at the shards must carry the ``identities`` right.

Limits: a filter is evaluated at each shard (same expression, same columns) and the
coordinator's researcher checks read the union metadata; exact float ties at the k-th
place may pick another study than the unsharded index (whose order among equal scores
follows its partial sort); queries by a cohort ``study_uid`` are not answered here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexing import engine
from indexing.evaluation import EVALUATION_KEY
from indexing.filter import FilterCache
from indexing.query import (
    NeighborResult,
    QueryResult,
    _cohort_summary,
    _diagnostics,
    index_warnings,
    snapshot_temperature,
)
from indexing.shards import SHARD_KEY
from indexing.snapshot import K_OOD, METADATA_FILE, VERSIONS_DIR, current_version, read_manifest
from indexing.tombstones import TOMBSTONE_FILE, TombstoneWatch
from service import convert
from service.api import cohortsim_pb2 as pb
from service.errors import failed_precondition, unavailable
from service.federation import Fanout, SiteCall
from service.governance import Governance
from service.releases import ANONYMOUS

#: Metadata columns the coordinator never reads (images; large and not needed).
_SKIP_TYPES = (pa.binary(), pa.large_binary())


class ShardCohort:
    """The union of the shards' cohort metadata: what governance, the cohort curve and the
    OOD check read of a snapshot (``metadata``, ``manifest``, ``version``,
    ``num_studies``, ``k_ood``, ``ood_reference``, ``deleted_rows()``,
    ``filter_mask(where)``), without vectors.

    Row ``offsets[i] + j`` is row ``j`` of shard ``i``. ``manifest`` is shard 0's with the
    cohort's study count; every shard of one build carries the same evaluation.
    """

    def __init__(self, folders: Sequence[Path], versions: Sequence[str]) -> None:
        self.folders = [Path(f) for f in folders]
        self.versions = list(versions)
        manifests = [read_manifest(f, v) for f, v in zip(self.folders, self.versions, strict=True)]
        tables = []
        for f, v in zip(self.folders, self.versions, strict=True):
            path = f / VERSIONS_DIR / v / METADATA_FILE
            schema = pq.read_schema(path)
            cols = [n for n in schema.names if schema.field(n).type not in _SKIP_TYPES]
            tables.append(pq.read_table(path, columns=cols))
        self.offsets = np.cumsum([0, *(t.num_rows for t in tables)])
        self.metadata = pa.concat_tables(tables, promote_options="default").combine_chunks()
        models = {m["model_version"] for m in manifests}
        if len(models) > 1:
            raise failed_precondition(
                "SHARDS_DISAGREE", f"the shards hold different encoder versions: {', '.join(sorted(models))}"
            )
        info = manifests[0].get(SHARD_KEY) or {}
        self.manifest: dict[str, Any] = {
            **manifests[0],
            "version": "+".join(self.versions),
            "num_studies": int(self.offsets[-1]),
        }
        evaluations = {str(m.get(EVALUATION_KEY)) for m in manifests}
        if len(evaluations) > 1:  # e.g. one shard rebuilt alone: no single kernel
            self.manifest.pop(EVALUATION_KEY, None)
        self.ood_reference = np.asarray(info.get("cohort_ood_reference", []), dtype=np.float64)
        self._filters = FilterCache(self.metadata)
        self._tombstones = [TombstoneWatch(f / TOMBSTONE_FILE) for f in self.folders]
        self._deleted: tuple[Any, frozenset[int]] = (None, frozenset())
        self._pids = np.asarray(self.metadata.column("patient_id").to_pylist(), dtype=object)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def num_studies(self) -> int:
        return int(self.manifest["num_studies"])

    @property
    def k_ood(self) -> int:
        return int(self.manifest.get("k_ood", K_OOD))

    def deleted_rows(self) -> frozenset[int]:
        """Rows (of the union) of patients withdrawn at any shard."""
        states = [w.current() for w in self._tombstones]
        sig = tuple(s for s, _ in states)
        if self._deleted[0] != sig:
            gone = frozenset().union(*(ids for _, ids in states))
            hit = np.isin(self._pids, np.asarray(sorted(gone), dtype=object)) if gone else np.zeros(0, bool)
            self._deleted = (sig, frozenset(int(r) for r in np.flatnonzero(hit)))
        return self._deleted[1]

    def filter_mask(self, where: str) -> np.ndarray | None:
        """``(n,) bool`` rows of the union satisfying ``where``; raises FilterError."""
        return self._filters.mask(where)

    def live_rows(self, where: str = "") -> np.ndarray:
        """Rows (ascending, int64) of the union that ``where`` selects, without withdrawn
        patients: what :func:`service.rpcs.live_rows` gives for one index."""
        mask = self.filter_mask(where) if where.strip() else None
        keep = np.ones(self.num_studies, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
        gone = self.deleted_rows()
        if gone:
            keep[np.fromiter(gone, dtype=np.int64)] = False
        return np.flatnonzero(keep).astype(np.int64)


class ShardCohorts:
    """The :class:`ShardCohort` of the shards' served versions, loaded once per set."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self._lock = threading.Lock()
        self._cohort: ShardCohort | None = None

    def get(self, versions: Sequence[str] | None = None) -> ShardCohort:
        """The union of ``versions`` (default: each folder's CURRENT one)."""
        if versions is None:
            found = [current_version(f) for f in self.folders]
            missing = [str(f) for f, v in zip(self.folders, found, strict=True) if v is None]
            if missing:
                raise unavailable("SHARD_INDEX_MISSING", f"no published index in {', '.join(missing)}")
            versions = [str(v) for v in found]
        with self._lock:
            if self._cohort is None or self._cohort.versions != list(versions):
                self._cohort = ShardCohort(self.folders, versions)
            return self._cohort


def merge_shards(calls: list[SiteCall], k: int) -> list[NeighborResult]:
    """The ``k`` most similar neighbours of every shard, best first; exact ties ordered
    by ``study_uid`` (a rule that does not depend on how the cohort was split). Sets
    each call's ``neighbors`` to its part; ``row`` is the rank in the merged list."""
    pool: list[tuple[float, str, int, Any]] = []
    for s, call in enumerate(calls):
        call.neighbors = []
        for nb in call.response.neighbors:
            pool.append((-float(nb.similarity), nb.study_uid, s, nb))
    pool.sort(key=lambda t: t[:2])
    merged: list[NeighborResult] = []
    for rank, (_, _, s, nb) in enumerate(pool[:k]):
        result = convert.neighbor_from_proto(nb, rank)
        calls[s].neighbors.append(result)
        merged.append(result)
    return merged


def _all_answered(calls: list[SiteCall], model_version: str) -> None:
    """Refuse unless every shard answered: the encoder mismatch when that is why."""
    missing = [c for c in calls if not c.answered]
    if not missing:
        return
    if any(c.reason == "MODEL_VERSION_MISMATCH" for c in missing):
        raise failed_precondition(
            "MODEL_VERSION_MISMATCH",
            f"shard(s) {', '.join(c.site.name for c in missing)} do not hold embeddings of "
            f"model {model_version!r}; embed the study with the index's encoder",
            expected="",
            actual=model_version,
        )
    named = "; ".join(f"{c.site.name}: {c.reason}" for c in missing)
    raise unavailable(
        "SHARD_MISSING",
        f"{len(missing)} of {len(calls)} shards did not answer ({named}); a sharded index "
        "answers only with every shard",
    )


class ShardSearch:
    """SearchSimilar over the shards of ``fanout`` (see the module docstring)."""

    def __init__(
        self,
        fanout: Fanout,
        cohorts: ShardCohorts,
        *,
        governance: Governance | None = None,
        horizons: Sequence[float] = (12, 24, 60),
    ) -> None:
        self.fanout = fanout
        self.cohorts = cohorts
        self.governance = governance or Governance()
        self.horizons = tuple(float(h) for h in horizons)

    async def search(
        self, embedding: pb.Vector, k: int, where: str, deadline_s: float
    ) -> tuple[QueryResult, list[SiteCall]]:
        """The unsharded index's answer to a vector query: ``(result, the shards' calls)``."""
        cohort = self.cohorts.get()
        depth = max(k, cohort.k_ood)
        request = pb.SearchSiteRequest(embedding=embedding, k=depth, filter=pb.Filter(where=where))
        jobs = [self.fanout.search(request, deadline_s)]
        if where.strip():  # the OOD check ranks the whole cohort: search it unfiltered too
            jobs.append(
                self.fanout.search(pb.SearchSiteRequest(embedding=embedding, k=cohort.k_ood), deadline_s)
            )
        answers = await asyncio.gather(*jobs)
        for calls in answers:
            _all_answered(calls, embedding.model_version)
        calls = answers[0]
        served = [str(c.response.index_version) for c in calls]
        if served != cohort.versions:  # a shard published since: read the versions it served
            cohort = await asyncio.to_thread(self.cohorts.get, served)
        merged = merge_shards(calls, depth)
        ood_source = merge_shards(answers[1], cohort.k_ood) if len(answers) > 1 else merged
        neighbors = merged[:k]
        prognosis = engine.prognose(neighbors, temperature=snapshot_temperature(cohort), horizons=self.horizons)  # type: ignore[arg-type]
        prognosis.cohort_survival, prognosis.cohort_median, prognosis.cohort_at_horizons = _cohort_summary(
            cohort, self.horizons  # type: ignore[arg-type]
        )
        prognosis.warnings[:0] = index_warnings(cohort)
        ood_sims = np.asarray([nb.similarity for nb in ood_source[: cohort.k_ood]], dtype=np.float32)
        diagnostics = _diagnostics(ood_sims, cohort.ood_reference, neighbors, None, {})
        return QueryResult(neighbors, prognosis, diagnostics, cohort.version, cohort.model_version), calls

    async def researcher(
        self, embedding: pb.Vector, k: int, where: str, deadline_s: float, *, principal: str = ANONYMOUS
    ) -> tuple[pb.SearchSimilarResponse, dict[str, Any]]:
        """The researcher view of the merged answer (governance applied once, here,
        against ``principal``'s record of releases): ``(response, audit facts)``."""
        loop = asyncio.get_running_loop()
        cohort = self.cohorts.get()
        query = convert.SearchQuery(
            kind="embedding",
            k=k,
            where=where,
            embedding=np.asarray(embedding.values, dtype=np.float32),
            model_version=embedding.model_version,
        )

        def run(q: convert.SearchQuery) -> QueryResult:  # on a worker thread
            coro = self.search(embedding, int(q.k), q.where, deadline_s)
            return asyncio.run_coroutine_threadsafe(coro, loop).result()[0]

        time_unit = str(cohort.manifest.get("time_unit") or convert.DEFAULT_TIME_UNIT)
        answer = await asyncio.to_thread(
            self.governance.researcher_search, cohort, query, run=run, time_unit=time_unit,
            principal=principal,
        )
        return answer.response, answer.facts


    def cohort_stats(
        self, where: str, *, restricted: bool, principal: str = ANONYMOUS
    ) -> tuple[pb.GetCohortStatsResponse, dict[str, Any]]:
        """GetCohortStats of the union (blocking): the unsharded server's answer, the
        researcher view applied here for ``restricted`` callers; ``(response, audit facts)``."""
        from service.rpcs import cohort_stats

        cohort = self.cohorts.get()
        if restricted and where:  # small / differencing sub-cohorts, as one server checks them
            self.governance.check_filter(cohort, where, principal=principal)
        rows = cohort.live_rows(where)
        response = cohort_stats(cohort, rows)  # type: ignore[arg-type]
        if not restricted:
            return response, {}
        governed = self.governance.cohort_stats(response, cohort, rows, principal=principal)
        ids = cohort.metadata.column("patient_id").take(pa.array(rows)).to_pylist()
        facts = {"release_kind": "stats", "release_principal": principal,
                 "aggregated_patients": sorted({str(p) for p in ids})}
        return governed, facts


def shard_folders(sites: Sequence[Any]) -> list[Path]:
    """Each shard's ``index`` folder (required in shard mode)."""
    missing = [s.name for s in sites if getattr(s, "index", None) is None]
    if missing:
        raise ValueError(f"shard mode needs an 'index' folder for every shard; missing for {', '.join(missing)}")
    return [Path(s.index) for s in sites]


__all__ = ["ShardCohort", "ShardCohorts", "ShardSearch", "merge_shards", "shard_folders"]
