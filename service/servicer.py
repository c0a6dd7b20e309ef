"""The gRPC servicer: validate the request, call plain functions, convert the answer.

Blocking work (FAISS search, DICOM decoding, encoder inference) runs on a thread pool so
the event loop never blocks; domain exceptions become gRPC status codes in
``service.errors`` (one place).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from encoders.budget import DecodeBudget, DecodeBudgetExceeded
from encoders.decode_pool import DecodePool, PreparedStudy, prepare_study
from encoders.errors import EncoderError
from indexing import aggregates, engine
from indexing.engine import Prefetched
from indexing.errors import ModelVersionError
from indexing.query import (
    QueryResult,
    attach_regions,
    attach_stability,
    index_warnings,
    search_similar,
    snapshot_temperature,
)
from indexing.snapshot import SearchParams, Snapshot, current_version, load_snapshot
from indexing.thumbnails import Region
from service import convert
from service.api import cohortsim_pb2, cohortsim_pb2_grpc
from service.batching import EmbedBatcher, SearchBatcher
from service.errors import failed_precondition, grpc_errors, invalid_argument, unavailable
from service.federation import ON_BEHALF_OF_KEY
from service.governance import Governance, ResearcherAnswer, principal_key
from service.interceptors.call import add_facts, current_principal
from service.matched import attach_explanations, attach_thumbnails
from service.pacs import query as pacs_query
from service.pacs.dicomweb import DicomwebConfig
from service.rpcs import CohortRpcs, caller_key

log = logging.getLogger(__name__)

T = TypeVar("T")

# Filter.where is evaluated by indexing.filter (a parsed SQL subset over the metadata).
FILTERS_SUPPORTED = True
WATCH_INTERVAL_S = 2.0  # how often a server looks at INDEX_DIR/CURRENT for a new version


@dataclass(frozen=True)
class Limits:
    """Request limits (the byte size of a request is capped by the server's options)."""

    default_k: int = 10
    max_k: int = 1000
    max_files: int = 4096


@dataclass(frozen=True)
class EmbeddedStudy:
    """A DICOM study embedded by the server's encoder.

    ``views``: ``(a, d)`` embeddings of ``a`` scanner-augmented copies (test-time
    augmentation; None when not asked for); ``thumbnail``: PNG of the central slice.
    """

    vector: np.ndarray  # (d,) float32, L2-normalised
    model_version: str
    acquisition: dict[str, str]
    views: np.ndarray | None = None
    thumbnail: bytes | None = None
    regions: np.ndarray | None = None  # (r, d): one row per region of interest; row 0 = vector
    region: Region | None = None  # where the encoder cut the study (with the thumbnail)
    volume: np.ndarray | None = None  # (D, H, W) preprocessed HU, kept for explanations
    roi: Any = None  # the first region of interest on the input grid (None: proposed)


# Who a DICOM call's decoding and encoder forward are for: 0 for callers who see
# identities (clinicians), 1 for the researcher view. Set on the DICOM thread by
# PatientSimilarityServicer._run_dicom; the decode workers and the encoder queue serve the
# lower number first, so a clinician's study never queues behind researchers' uploads.
DICOM_PRIORITY: ContextVar[int] = ContextVar("cohortsim_dicom_priority", default=1)

TTA_VIEWS = 4  # scanner-augmented copies of a DICOM query (stability diagnostics); 0 = off
TTA_SEED = 0  # fixed: the same study gets the same copies, hence the same diagnostics


def scanner_views(volume: np.ndarray, n: int, *, seed: int = TTA_SEED) -> np.ndarray:
    """``n`` scanner-like copies ``(n, D, H, W)`` float32 of one ``(D, H, W)`` HU volume:
    noise, reconstruction kernel, HU calibration and slice thickness from
    ``encoders.augment`` (no crop, zoom or shift: anatomy and position stay)."""
    import torch

    from encoders.augment import AugmentConfig, augment

    cfg = AugmentConfig(slice_min_fraction=1.0, zoom=(1.0, 1.0), max_shift_px=0.0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32)).expand(n, *volume.shape)
    return augment(x.contiguous(), gen, cfg).numpy()


def _current_or_none(index_dir: Path) -> str | None:
    try:
        return current_version(index_dir)
    except OSError:
        return None


def _torch_device(device: str) -> str:
    """The snapshot's device argument ("auto", "cpu", "cuda", "gpu") for torch."""
    return "cuda" if device == "gpu" else device


class ServiceState:
    """What the server serves: one snapshot and, loaded on first use, its encoder.

    ``snapshot`` is None when loading failed (``load_error`` says why, for the log); every
    call then fails with UNAVAILABLE. The encoder is loaded once, under a lock, on a worker
    thread, and only if a DICOM query arrives.

    Live pickup: :meth:`refresh` (run every ``WATCH_INTERVAL_S`` by :meth:`start_watching`)
    loads the version ``INDEX_DIR/CURRENT`` names when it differs from the served one
    (a rebuild, or a rollback), verifies it, and swaps ``snapshot`` in one assignment:
    calls in flight finish on the snapshot they started with, new calls get the new one,
    none fails. A version that fails to load is logged and skipped, the old one stays.
    """

    def __init__(
        self,
        snapshot: Snapshot | None,
        *,
        load_error: str | None = None,
        device: str = "cpu",
        tta_views: int = TTA_VIEWS,
        index_dir: Path | None = None,
        load_device: str = "auto",
    ) -> None:
        self.snapshot = snapshot
        self.load_error = load_error
        self.device = device
        self.tta_views = tta_views
        self.index_dir = index_dir
        self._load_device = load_device
        self._encoders: dict[str, tuple[Any, Any]] = {}  # model version -> (encoder, card)
        self._encoder_errors: dict[str, BaseException] = {}
        self._encoder_lock = threading.Lock()
        self.embedder = EmbedBatcher()  # concurrent DICOM embeddings share encoder forwards
        # decoded bytes per DICOM request and for the process, DICOM calls per caller
        self.decode_budget = DecodeBudget()
        # worker processes that decode uploads (None: decode on the calling thread)
        self.decode_pool: DecodePool | None = None
        self._swap_lock = threading.Lock()
        self._skipped_version: str | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def load(cls, index_dir: Path, *, device: str = "auto") -> ServiceState:
        """Load the current snapshot of ``index_dir``; a failure is kept, not raised."""
        kw: dict[str, Any] = {
            "device": _torch_device(device),
            "index_dir": Path(index_dir),
            "load_device": device,
        }
        try:
            snapshot = load_snapshot(index_dir, device=device)
        except Exception as exc:
            log.error("no index loaded (%s); health is NOT_SERVING", type(exc).__name__)
            log.error("load error: %s", exc)  # paths and versions only, never patient data
            state = cls(None, load_error=str(exc), **kw)
            state._skipped_version = _current_or_none(Path(index_dir))
            return state
        _log_index_warnings(snapshot)
        return cls(snapshot, **kw)

    # live pickup of new versions ---------------------------------------------
    def add_listener(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` (on the watcher thread) after each swap."""
        self._listeners.append(callback)

    def refresh(self) -> bool:
        """Serve the version ``CURRENT`` names if it is not the served one; True if swapped.

        Blocking (loads and verifies the new version). Never raises: a broken version is
        logged and remembered, and the served snapshot stays until ``CURRENT`` changes again.
        """
        if self.index_dir is None:
            return False
        with self._swap_lock:
            target = _current_or_none(self.index_dir)
            if target is None or target == self.index_version or target == self._skipped_version:
                return False
            try:
                snapshot = load_snapshot(self.index_dir, version=target, device=self._load_device)
                snapshot.deleted_rows()  # map tombstones to rows now, not in the first call
            except Exception as exc:
                self._skipped_version = target
                log.error(
                    "index version %s is unusable (%s); still serving %s",
                    target,
                    type(exc).__name__,
                    self.index_version or "nothing",
                )
                log.error("load error: %s", exc)
                return False
            old = self.index_version
            self.snapshot = snapshot  # one reference swap: in-flight calls keep the old one
            self.load_error = None
            self._skipped_version = None
            with self._encoder_lock:  # keep only the encoder of the served model
                for version in [v for v in self._encoders if v != snapshot.model_version]:
                    del self._encoders[version]
                self._encoder_errors.clear()
        log.info("now serving index version %s (was %s)", snapshot.version, old or "none")
        _log_index_warnings(snapshot)
        for callback in list(self._listeners):
            try:
                callback(snapshot)
            except Exception:  # a listener must not stop the swap
                log.exception("index swap listener failed")
        return True

    def start_watching(self, interval: float = WATCH_INTERVAL_S) -> None:
        """Check ``CURRENT`` every ``interval`` seconds on a daemon thread."""
        if self.index_dir is None or self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                self.refresh()

        self._watcher = threading.Thread(target=loop, name="cohortsim-index-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching ``CURRENT``."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    @property
    def index_version(self) -> str | None:
        return self.snapshot.version if self.snapshot is not None else None

    def require_snapshot(self) -> Snapshot:
        if self.snapshot is None:
            raise unavailable(
                "INDEX_UNAVAILABLE",
                "the server has no usable index snapshot (see its log); build one with "
                "`cohortsim index build` (the server picks it up within seconds)",
            )
        return self.snapshot

    @property
    def dicom_supported(self) -> bool:
        return self.snapshot is not None and self.snapshot.encoder_dir is not None

    def encoder(self, snapshot: Snapshot | None = None) -> tuple[Any, Any]:
        """``(StudyEncoder, EncoderCard)`` of ``snapshot`` (default: the served one);
        blocking (call on a worker)."""
        snapshot = snapshot or self.require_snapshot()
        encoder_dir = snapshot.encoder_dir
        if encoder_dir is None:
            raise failed_precondition(
                "NO_ENCODER",
                "this index was built from precomputed embeddings; send an embedding",
            )
        key = snapshot.model_version
        with self._encoder_lock:
            if key not in self._encoders and key not in self._encoder_errors:
                from encoders.model import load_encoder  # torch: imported on first DICOM query

                try:
                    encoder, card = load_encoder(encoder_dir, device=self.device)
                except EncoderError as exc:
                    log.error("encoder of index %s unusable: %s", snapshot.version, exc)
                    self._encoder_errors[key] = exc
                else:
                    if card.version != snapshot.model_version:
                        self._encoder_errors[key] = ModelVersionError(
                            f"the index holds embeddings of model {snapshot.model_version} but "
                            f"its encoder is {card.version}; rebuild the index with one encoder"
                        )
                    else:
                        self._encoders[key] = (encoder, card)
                        log.info("encoder %s loaded", card.version)
            if key in self._encoder_errors:
                raise self._encoder_errors[key]
            return self._encoders[key]

    def embed_dicom(
        self,
        files: list[bytes],
        *,
        views: int = 0,
        thumbnail: bool = False,
        snapshot: Snapshot | None = None,
        regions: Sequence[Sequence[float]] = (),
        keep_volume: bool = False,
    ) -> EmbeddedStudy:
        """Decode, preprocess and embed one study's DICOM files; blocking.

        ``views`` > 0 also embeds that many scanner-augmented copies (:func:`scanner_views`);
        ``thumbnail`` makes the PNG of the slice through the region the encoder embedded
        (box drawn) and records the region; ``keep_volume`` keeps the preprocessed volume
        (explanations).
        ``regions``: boxes ``(z0, y0, x0, z1, y1, x1)`` on the study's own voxel grid; each
        is embedded (``EmbeddedStudy.regions``, the first is ``vector``) and the
        augmented copies use the first one.
        """
        from encoders.model import embed

        encoder, card = self.encoder(snapshot)  # the encoder of the snapshot searched
        on_patches = card.region.mode == "lesion" and card.input.has_patches
        prepared = self.prepare_dicom(files, card, regions if on_patches else (),
                                      patches=on_patches)
        if on_patches:
            # what the encoder sees is the patch; thumbnails and explanations use it too
            assert prepared.patches is not None
            stack, n = prepared.patches, len(prepared.patches)
            volume = stack[0]
            boxes: list[tuple[float, ...]] = [()] * n if regions else []
            if views > 0:
                stack = np.concatenate([stack.astype(np.float32),
                                        scanner_views(stack[0], views)])
            rois = None
        else:
            volume = prepared.context
            boxes = (self._region_boxes(card, prepared.shape, prepared.spacing, regions)
                     if regions else [])
            n = max(1, len(boxes))  # rows embedded for the query itself
            stack = volume[None] if n == 1 else np.repeat(volume[None], n, axis=0)
            if views > 0:
                stack = np.concatenate([stack.astype(np.float32), scanner_views(volume, views)])
            rois = [*boxes, *[boxes[0]] * views] if boxes else None

        def forward(enc: Any, volumes: np.ndarray) -> np.ndarray:
            return embed(enc, volumes, rois=rois, batch_size=len(volumes), device=self.device)

        # one forward at a time (the cores are shared with the index search); the studies
        # of concurrent calls that queued meanwhile share the next one (service.batching),
        # except a study with regions, whose boxes travel with its own volumes only
        out = self.embedder.embed(encoder, stack, forward, shareable=rois is None,
                                  priority=DICOM_PRIORITY.get())
        acquisition = prepared.acquisition
        # the region the query's vector was cut around: a box on the preprocessed volume,
        # or None (a detail patch is centred on its region; else the proposal)
        first = boxes[0] if boxes and not on_patches else None
        png = region = None
        if thumbnail:
            from encoders.model import embedded_regions
            from indexing.thumbnails import region_thumbnail_png

            cut = embedded_regions(encoder, volume[None], None if first is None else [first],
                                   device=self.device)
            region = Region.of(cut[0])
            if on_patches:  # the patch was cut around a query region, else the top proposal
                source = prepared.patch_source or ("reader" if regions else "proposal")
                region = Region(region.slice_index, region.box, source)
            png = region_thumbnail_png(volume, region)
        return EmbeddedStudy(
            out[0].astype(np.float32), card.version, acquisition,
            out[n:] if views > 0 else None, png,
            regions=out[:n].astype(np.float32) if boxes else None,
            region=region,
            volume=volume if keep_volume else None,
            roi=first,
        )

    def prepare_dicom(
        self, files: list[bytes], card: Any, regions: Sequence[Sequence[float]], *, patches: bool
    ) -> PreparedStudy:
        """Decode ``files`` and build ``card``'s input (:func:`encoders.decode_pool.prepare_study`)
        in the decode workers when the server has them (``decode_pool``), else on this
        thread; under the decoded-byte budget either way. Blocking. A region outside the
        study is INVALID_ARGUMENT ``DICOM_BAD_REGION``; a study that ends its worker
        RESOURCE_EXHAUSTED ``DICOM_DECODE_MEMORY`` (or ``_TIMEOUT`` / ``_CRASHED``)."""
        if self.decode_pool is not None:
            return self.decode_pool.prepare(
                files, card.input, patches=patches, regions=regions,
                proposal=card.region.proposal, priority=DICOM_PRIORITY.get(),
            )
        with self.decode_budget.request(received=sum(len(f) for f in files)):
            return prepare_study(files, card.input, patches=patches, regions=regions,
                                 proposal=card.region.proposal)

    @staticmethod
    def _region_boxes(
        card: Any,
        study_shape: tuple[int, int, int],
        study_spacing: tuple[float, float, float],
        regions: Sequence[Sequence[float]],
    ) -> list[tuple[float, ...]]:
        """Each region's box mapped to the encoder's input grid; FAILED_PRECONDITION for a
        whole-volume encoder, INVALID_ARGUMENT for a box the preprocessing cropped away."""
        from encoders.preprocess import box_to_input_grid

        if card.region.mode != "lesion":
            raise failed_precondition(
                "REGIONS_UNSUPPORTED",
                f"this index's encoder embeds {card.region.mode} volumes; regions of interest "
                "need an encoder trained with region='lesion' (send the query without regions)",
            )
        shape = tuple(int(n) for n in card.input.shape)
        extent = " x ".join(f"{n * s:g}" for n, s in zip(shape, card.input.spacing_mm, strict=True))
        boxes: list[tuple[float, ...]] = []
        for i, b in enumerate(regions):
            box = box_to_input_grid(b, study_shape, study_spacing, card.input)
            if any(hi <= 0 or lo >= n for lo, hi, n in zip(box[:3], box[3:], shape, strict=True)):
                raise invalid_argument(
                    "INVALID_REGION",
                    f"regions[{i}] lies outside the part of the study the encoder sees (the "
                    f"central {extent} mm of a study of "
                    f"{' x '.join(str(d) for d in study_shape)} voxels)",
                )
            boxes.append(box)
        return boxes

def search(
    state: ServiceState,
    snapshot: Snapshot,
    query: convert.SearchQuery,
    *,
    max_k: int,
    prefetched: Prefetched | None = None,
) -> QueryResult:
    """Run one validated query against ``snapshot``; blocking.

    A ``study_uid`` query excludes the study itself and every other study of the same
    patient (their outcome is the query patient's own, so it must not predict it).
    A DICOM query is also re-embedded under ``state.tta_views`` scanner-like augmentations,
    searched the same way, and the result's ``diagnostics.stability`` compares the two.
    Thumbnails are attached when the query asks for them. ``prefetched``: rows of the
    query's own vector that the micro-batcher's shared search already fetched (used by
    the engine's search step when deep enough; the TTA views and regions search anew).
    """
    kwargs: dict[str, Any] = {}
    views = None
    region_vectors = None
    embedded = None
    if query.where:
        snapshot.filter_mask(query.where)  # a bad filter fails before any DICOM is decoded
    if query.kind == "embedding":
        vector = query.embedding
    elif query.kind == "study_uid":
        row = snapshot.row_of_study(query.study_uid)
        vector = snapshot.vector(row)
        kwargs["exclude_rows"] = [row]
        patient = snapshot.metadata.column("patient_id")[row].as_py()
        kwargs["exclude_patients"] = [patient]
    else:
        explain = bool(getattr(query, "include_explanations", False))
        embedded = state.embed_dicom(
            query.dicom_files,
            views=state.tta_views,
            thumbnail=query.include_thumbnails or explain,
            snapshot=snapshot,
            regions=[box for _, box in query.regions],
            keep_volume=explain or query.include_thumbnails,
        )
        vector = embedded.vector
        views = embedded.views
        region_vectors = embedded.regions
        kwargs["query_acquisition"] = [embedded.acquisition]
    kwargs["where"] = query.where
    if query.nprobe is not None or query.ef_search is not None:
        kwargs["search_params"] = SearchParams(nprobe=query.nprobe, ef_search=query.ef_search)

    def same_as_query(vectors: np.ndarray, pre: Prefetched | None = None) -> list[QueryResult]:
        """Search ``vectors`` with the query's k, filter and exclusions (per-query lists
        repeated for each row)."""
        same: dict[str, Any] = {
            key: v * len(vectors) if isinstance(v, list) else v for key, v in kwargs.items()
        }
        return search_similar(snapshot, vectors, query.k, max_k=max_k, prefetched=pre, **same)

    # with regions of interest, the answer is the first region's (its vector is `vector`)
    if region_vectors is not None:
        results = same_as_query(region_vectors)
    else:
        results = same_as_query(vector[None, :], prefetched)
    result = results[0]
    if views is not None and len(views):
        attach_stability(result, same_as_query(views))
    if region_vectors is not None:
        attach_regions(result, [obs for obs, _ in query.regions], results)
    rows = [nb.row for nb in result.neighbors]
    if query.include_thumbnails:
        # lesion encoders: the embedded boxes; whole-volume ones: the slices of the strongest match
        attach_thumbnails(state, snapshot, result, vector, embedded=embedded,
                          query_row=kwargs["exclude_rows"][0] if query.kind == "study_uid" else None)
    if embedded is not None and getattr(query, "include_explanations", False) and rows:
        attach_explanations(state, snapshot, embedded, result)
    return result


def site_search(
    snapshot: Snapshot, vector: np.ndarray, k: int, where: str, max_k: int
) -> engine.SitePart:
    """The engine's plan and search steps for one vector, then the neighbours' rows: what
    a federated site returns (no weights, no prognosis: the coordinator assembles)."""
    p = engine.plan(snapshot, vector, k, max_k=max_k, where=where)
    hits = engine.search(snapshot, p)
    sims, rows = hits.top(0, p.k)
    (neighbors,) = engine.gather_neighbors(snapshot, [sims], [rows])
    return engine.SitePart(
        neighbors=neighbors,
        ood_percentile=engine.ood_of(snapshot, p, hits, 0),
        temperature=snapshot_temperature(snapshot),
    )


def search_many(
    state: ServiceState,
    snapshot: Snapshot,
    queries: list[convert.SearchQuery],
    *,
    max_k: int,
) -> list[QueryResult]:
    """Answers of plain embedding queries that share ``k``, filter and search parameters
    (no thumbnails), from one :func:`search_similar` call: one index search and one
    metadata gather for all, as the in-process batched path. Each answer equals
    :func:`search` of its query. Blocking; raises on a bad filter or parameters (the
    micro-batcher then answers each query on its own, so the error stays per request).
    """
    q0 = queries[0]
    if any(
        q.kind != "embedding"
        or q.include_thumbnails
        or (q.k, q.where, q.nprobe, q.ef_search) != (q0.k, q0.where, q0.nprobe, q0.ef_search)
        for q in queries
    ):
        raise ValueError("search_many takes embedding queries sharing k, filter and parameters")
    params = (
        SearchParams(nprobe=q0.nprobe, ef_search=q0.ef_search)
        if q0.nprobe is not None or q0.ef_search is not None
        else None
    )
    vectors = np.stack([np.asarray(q.embedding, dtype=np.float32).reshape(-1) for q in queries])
    return search_similar(
        snapshot, vectors, q0.k, max_k=max_k, where=q0.where, search_params=params
    )


class PatientSimilarityServicer(CohortRpcs, cohortsim_pb2_grpc.PatientSimilarityServiceServicer):
    """Thin asyncio servicer over a :class:`ServiceState`."""

    # the PACS that queries by reference retrieve from (service.pacs.query); None: none
    pacs: DicomwebConfig | None = None

    def __init__(
        self,
        state: ServiceState,
        *,
        executor: Executor | None = None,
        limits: Limits | None = None,
        governance: Governance | None = None,
        batcher: SearchBatcher | None = None,
    ) -> None:
        self.state = state
        self.limits = limits or Limits()
        self._executor = executor
        # DICOM decoding and embedding run on their own threads (ServeConfig.dicom_workers)
        # so that uploads never hold the workers searches need; None: the same workers
        self.dicom_executor: Executor | None = None
        # the DICOM threads of callers who see identities (None: dicom_executor)
        self.dicom_priority_executor: Executor | None = None
        # micro-batching of concurrent embedding / study_uid searches (service.batching)
        self.batcher = batcher
        # the researcher view (service.governance): applied to callers without the "identities" right
        self.governance = governance or Governance()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _run_dicom(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the DICOM threads (decoding, embedding, their searches), with
        the caller's :data:`DICOM_PRIORITY`: clinicians' studies first, on threads of
        their own (``dicom_priority_executor``) so that they never queue behind uploads
        of the researcher view."""
        loop = asyncio.get_running_loop()
        restricted = self.governance.restricts(current_principal())
        pool = (self.dicom_executor if restricted else self.dicom_priority_executor) \
            or self.dicom_executor or self._executor
        return await loop.run_in_executor(
            pool, functools.partial(_with_priority, 1 if restricted else 0, fn, *args)
        )

    def _check_filter(self, where: str) -> str:
        """The one place that decides whether a filter can be honoured."""
        if where.strip() and not FILTERS_SUPPORTED:
            raise invalid_argument(
                "FILTER_UNSUPPORTED",
                "filters are not supported by this server version yet; send the query "
                "without filter.where",
            )
        return where.strip()

    @grpc_errors
    async def SearchSimilar(
        self, request: cohortsim_pb2.SearchSimilarRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.SearchSimilarResponse:
        snapshot = self.state.require_snapshot()
        if request.WhichOneof("query") == "pacs":  # retrieved, then searched as DICOM files
            request = await pacs_query.resolve_search(
                request, context, pacs=self.pacs, max_files=self.limits.max_files,
                restricted=self.governance.restricts(current_principal()),
            )
        query = convert.parse_search_request(
            request,
            dimension=snapshot.dimension,
            default_k=self.limits.default_k,
            max_k=self.limits.max_k,
            max_files=self.limits.max_files,
        )
        self._check_filter(query.where)
        warnings = convert.check_embedding_model(query, snapshot.model_version)
        if query.kind == "dicom":
            if snapshot.encoder_dir is None:
                self.state.encoder(snapshot)  # raises FAILED_PRECONDITION, files untouched
            key = caller_key()
            async with self.dicom_slots.slot(key):  # DICOM calls per caller
                try:
                    return await self._search(snapshot, query, warnings)
                except DecodeBudgetExceeded:
                    self.dicom_slots.penalise(key)
                    raise
        return await self._search(snapshot, query, warnings)

    async def _search(
        self, snapshot: Snapshot, query: convert.SearchQuery, warnings: list[str]
    ) -> cohortsim_pb2.SearchSimilarResponse:
        time_unit = str(snapshot.manifest.get("time_unit") or convert.DEFAULT_TIME_UNIT)
        run = self._run_dicom if query.kind == "dicom" else self._run
        principal = current_principal()
        if self.governance.restricts(principal):  # aggregates only, governed
            answer = await run(
                self._governed_search, snapshot, query, time_unit, principal_key(principal)
            )
            add_facts(**answer.facts)
            convert.add_warnings(answer.response.diagnostics, warnings)
            return answer.response
        if self.batcher is not None and query.kind != "dicom":
            result = await self.batcher.search(snapshot, query)
        else:
            result = await run(
                functools.partial(search, max_k=self.limits.max_k), self.state, snapshot, query
            )
        response = convert.search_response(result, time_unit=time_unit)
        convert.add_warnings(response.diagnostics, warnings)
        return response

    def _governed_search(
        self, snapshot: Snapshot, query: convert.SearchQuery, time_unit: str, principal: str
    ) -> ResearcherAnswer:
        def run(q: convert.SearchQuery) -> QueryResult:
            return search(self.state, snapshot, q, max_k=max(q.k, self.limits.max_k))

        return self.governance.researcher_search(
            snapshot, query, run=run, embed=self.state.embed_dicom, time_unit=time_unit,
            principal=principal,
        )

    async def _site_part(
        self,
        snapshot: Snapshot,
        request: cohortsim_pb2.SearchSiteRequest | cohortsim_pb2.AggregateSiteRequest,
    ) -> Any:
        """The site's top-k of a federated query's vector (SearchSite, AggregateSite):
        INVALID_ARGUMENT without the vector's model version, FAILED_PRECONDITION
        ``MODEL_VERSION_MISMATCH`` for another encoder's vector."""
        vector = convert.parse_embedding(request.embedding, dimension=snapshot.dimension)
        k = convert.parse_k(request.k, default_k=self.limits.default_k, max_k=self.limits.max_k)
        where = self._check_filter(request.filter.where)
        if not request.embedding.HasField("model_version"):
            raise invalid_argument(
                "MODEL_VERSION_REQUIRED",
                "a federated query must name the encoder version of its embedding "
                "(Vector.model_version); sites answer only vectors of their own encoder",
            )
        query = convert.SearchQuery(
            kind="embedding", k=k, embedding=vector, model_version=request.embedding.model_version
        )
        convert.check_embedding_model(query, snapshot.model_version)
        return await self._run(site_search, snapshot, vector, k, where, self.limits.max_k)

    @grpc_errors
    async def SearchSite(
        self, request: cohortsim_pb2.SearchSiteRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.SearchSiteResponse:
        """A federated site's partial result: top-k neighbours of one vector, unweighted."""
        snapshot = self.state.require_snapshot()
        part = await self._site_part(snapshot, request)
        add_facts(site_neighbors=len(part.neighbors))
        return convert.site_response(part, snapshot)

    @grpc_errors
    async def AggregateSite(
        self, request: cohortsim_pb2.AggregateSiteRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.AggregateSiteResponse:
        """A federated site's researcher part: additive counts over its top-k neighbours,
        suppressed here (the site's min cell) before they leave, and checked against the
        release record of the end user (a trusted coordinator's ``ON_BEHALF_OF_KEY``) or
        of the caller (``Governance.site_release``)."""
        snapshot = self.state.require_snapshot()
        principal = self.governance.release_principal(
            current_principal(), _metadata_value(context, ON_BEHALF_OF_KEY)
        )
        where = request.filter.where.strip()
        if where:  # the researcher filter rules, against the end user's record
            await self._run(
                functools.partial(self.governance.check_filter, snapshot, where, principal=principal)
            )
        part = await self._site_part(snapshot, request)
        min_cell = self.governance.policy.min_cell
        counts = aggregates.suppress(
            aggregates.aggregate(
                [nb.time for nb in part.neighbors],
                [nb.event for nb in part.neighbors],
                [nb.similarity for nb in part.neighbors],
                [nb.labels for nb in part.neighbors],
                edges=self.governance.policy.time_bins,
                temperature=part.temperature,
            ),
            min_cell,
        )
        facts = await self._run(  # the record check walks the principal's sets: off the loop
            functools.partial(self.governance.site_release, part.neighbors, counts, principal=principal)
        )
        add_facts(site_aggregate=aggregates.to_dict(counts), **facts)
        return convert.aggregates_to_proto(counts, min_cell=min_cell, snapshot=snapshot)

    @grpc_errors
    async def EmbedStudy(
        self, request: cohortsim_pb2.EmbedStudyRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.EmbedStudyResponse:
        snapshot = self.state.require_snapshot()
        if request.HasField("pacs"):
            request = await pacs_query.resolve_embed(
                request, context, pacs=self.pacs, max_files=self.limits.max_files,
                restricted=self.governance.restricts(current_principal()),
            )
        files = convert.parse_dicom(request.dicom, max_files=self.limits.max_files)
        if snapshot.encoder_dir is None:
            self.state.encoder()  # raises NO_ENCODER
        key = caller_key()
        async with self.dicom_slots.slot(key):
            try:
                embedded = await self._run_dicom(self.state.embed_dicom, files)
            except DecodeBudgetExceeded:
                self.dicom_slots.penalise(key)
                raise
        return convert.embed_response(embedded.vector, embedded.model_version, embedded.acquisition)

    @grpc_errors
    async def GetIndexInfo(
        self, request: cohortsim_pb2.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> cohortsim_pb2.GetIndexInfoResponse:
        snapshot = self.state.require_snapshot()
        response = convert.index_info_response(
            snapshot.info(),
            max_k=self.limits.max_k,
            dicom_supported=self.state.dicom_supported,
            prognostic_quality=snapshot.manifest.get("prognosis_evaluation"),
        )
        if self.governance.restricts(current_principal()):
            return self.governance.index_info(response)
        return response


def _with_priority(priority: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with :data:`DICOM_PRIORITY` set to ``priority`` (on a worker thread)."""
    token = DICOM_PRIORITY.set(priority)
    try:
        return fn(*args)
    finally:
        DICOM_PRIORITY.reset(token)


def _metadata_value(context: Any, key: str) -> str | None:
    """The first value of invocation metadata ``key`` (text), or None."""
    try:
        items = context.invocation_metadata() or ()
    except Exception:
        return None
    for k, v in items:
        if k.lower() == key:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def _log_index_warnings(snapshot: Snapshot) -> None:
    """Log the index-level warnings (its prognostic skill) when a snapshot starts serving."""
    for note in index_warnings(snapshot):
        log.warning("index %s: %s: %s", snapshot.version, note.code.value, note)


__all__ = [
    "DICOM_PRIORITY",
    "FILTERS_SUPPORTED",
    "EmbeddedStudy",
    "Limits",
    "PatientSimilarityServicer",
    "ServiceState",
    "scanner_views",
    "search",
    "search_many",
]
