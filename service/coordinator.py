"""The federated coordinator: the same ``PatientSimilarityService`` over many sites.

``cohortsim serve --federate sites.toml`` serves :class:`CoordinatorServicer`. For a
``SearchSimilar`` with an embedding (and its ``model_version``) it sends only the vector
to every site at once (:class:`service.federation.Fanout`, one deadline), merges the
sites' top-k exactly (:func:`service.federation.merge`) and computes the prognosis over
the merged neighbours with the engine's :func:`indexing.engine.prognose`, as a single
index over all the sites' studies would. Sites whose index holds another encoder
version are left out and named; when none answers the call is refused. The answer's
``federation`` report names every site with what happened to it, and a
``FEDERATION_SITE_MISSING`` warning says when one is missing.

Each site enforces its own policy: the coordinator needs a clinician's credential at each
site for ``SearchSite`` (the identities right); callers with the identities right (or
any caller without authentication, as an unsecured server does) get merged neighbours.
Researchers (search right without identities) get pooled additive counts instead
(``AggregateSite``, :mod:`indexing.aggregates`): each site withholds counts below its min
cell before they leave, the coordinator needs at least :data:`MIN_SITES` sites
contributing and withholds small pooled counts again; the answer carries a binned
Kaplan-Meier curve, event and label counts, and no neighbour.

DICOM queries are embedded once by the coordinator when it is given the sites' encoder
(``--encoder DIR``); otherwise send the vector (``EmbedStudy`` at a site). Not held by a
coordinator: the cohort's own survival curve (it has no cohort), study_uid queries of a
site's cohort. A study in the coordinator's own PACS (``pacs`` query, ``--dicomweb``) is
retrieved and embedded here (it needs ``--encoder``); only its vector goes to the sites.

``GetIndexInfo`` pools the sites' answers (:func:`pooled_index_info`). With ``mode =
"shards"`` in the sites file the sites are shards of one index (:mod:`service.shards`):
every shard must answer, and the answer is the unsharded index's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from indexing import aggregates, engine
from indexing.notices import Notice, WarningCode
from indexing.prognosis import DEFAULT_TEMPERATURE
from indexing.query import OOD_WARN_PERCENTILE, OOD_WARNING, Diagnostics, QueryResult
from service import convert
from service.api import SERVICE_FULL_NAME, cohortsim_pb2_grpc
from service.api import cohortsim_pb2 as pb
from service.disclosure import DEFAULT_MIN_CELL, DisclosurePolicy
from service.errors import (
    ServiceError,
    failed_precondition,
    grpc_errors,
    invalid_argument,
    unavailable,
)
from service.federation import (
    DEFAULT_SITE_DEADLINE_S,
    Fanout,
    Site,
    SiteCall,
    answer_neighbors,
    merge,
)
from service.governance import Governance, permission_denied, principal_key
from service.interceptors.call import add_facts, current_principal
from service.pacs import query as pacs_query
from service.pacs.dicomweb import DicomwebConfig
from service.shards import ShardCohorts, ShardSearch, shard_folders
from service.tls import TlsConfig

log = logging.getLogger(__name__)

#: Sites that must contribute before a researcher's pooled counts are released.
MIN_SITES = 3

_STATE_WORDS: dict[int, str] = {
    pb.SITE_STATE_TIMED_OUT: "timed out",
    pb.SITE_STATE_REFUSED: "refused",
    pb.SITE_STATE_UNAVAILABLE: "unreachable",
}


class CoordinatorServicer(cohortsim_pb2_grpc.PatientSimilarityServiceServicer):
    """``SearchSimilar`` and ``GetIndexInfo`` over the sites of ``fanout``; other RPCs are
    UNIMPLEMENTED."""

    # the PACS that ``pacs`` queries retrieve from (service.pacs.query); None: none
    pacs: DicomwebConfig | None = None

    def __init__(
        self,
        fanout: Fanout,
        *,
        deadline_s: float = DEFAULT_SITE_DEADLINE_S,
        default_k: int = 10,
        max_k: int = 1000,
        horizons: Sequence[float] = (12, 24, 60),
        min_cell: int = DEFAULT_MIN_CELL,
        min_sites: int = MIN_SITES,
        encoder_dir: Path | None = None,
        max_files: int = 4096,
        shards: ShardSearch | None = None,
    ) -> None:
        self.fanout = fanout
        # shard mode (service.shards): one institution's index, answered as one server
        self.shards = shards
        self.encoder_dir = encoder_dir
        self.max_files = int(max_files)
        self._encoder: tuple[Any, Any] | None = None
        self._encoder_lock = threading.Lock()
        self.min_cell = int(min_cell)
        self.min_sites = int(min_sites)
        self.deadline_s = float(deadline_s)
        self.default_k = int(default_k)
        self.max_k = int(max_k)
        self.horizons = tuple(float(h) for h in horizons)

    def _deadline(self, context: Any) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.deadline_s
        # leave the merge a little of the caller's own deadline
        return max(0.001, min(self.deadline_s, remaining - 0.05))

    @grpc_errors
    async def SearchSimilar(
        self, request: pb.SearchSimilarRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchSimilarResponse:
        principal = current_principal()
        if principal is not None and not principal.has("search"):
            raise permission_denied("ROLE_NOT_ALLOWED", f"the role {principal.role} may not search")
        kind = request.WhichOneof("query")
        if kind == "pacs":  # retrieved from this coordinator's PACS, then embedded here
            request = await self._from_pacs(request, principal, context)
            kind = "dicom"
        if kind == "dicom" and self.encoder_dir is not None:  # embedded once, here
            files = convert.parse_dicom(request.dicom, max_files=self.max_files)
            vector, version = await asyncio.to_thread(self._embed, files)
            request = pb.SearchSimilarRequest(
                embedding=pb.Vector(values=vector.tolist(), model_version=version),
                k=request.k,
                filter=request.filter,
            )
        elif kind != "embedding":
            raise invalid_argument(
                "FEDERATED_EMBEDDING_ONLY",
                "this coordinator answers embedding queries"
                + (" and DICOM studies" if self.encoder_dir is not None else "")
                + "; embed the study with the sites' encoder (EmbedStudy at a site, or "
                "serve the coordinator with --encoder) and send the vector",
            )
        if not request.embedding.HasField("model_version"):
            raise invalid_argument(
                "MODEL_VERSION_REQUIRED",
                "a federated query must name its encoder version (Vector.model_version); "
                "sites answer only vectors of their own encoder",
            )
        values = np.asarray(request.embedding.values, dtype=np.float32)
        if values.size == 0 or not np.isfinite(values).all() or not np.any(values):
            raise invalid_argument(
                "BAD_EMBEDDING", "the embedding is empty, holds NaN / infinite values or is zero"
            )
        k = convert.parse_k(request.k, default_k=self.default_k, max_k=self.max_k)
        if self.shards is not None:
            return await self._shard_search(request.embedding, k, request.filter.where, principal, context)
        site_request = pb.SearchSiteRequest(embedding=request.embedding, k=k, filter=request.filter)
        if principal is not None and not principal.has("identities"):  # researchers: counts
            return await self._researcher(site_request, context, principal.id)
        calls = await self.fanout.search(site_request, self._deadline(context))
        answered = [c for c in calls if c.answered]
        add_facts(
            sites_answered=len(answered),
            sites_missing=[f"{c.site.name}:{c.reason}" for c in calls if not c.answered],
        )
        if not answered:
            raise _nobody(calls, request.embedding.model_version)
        messages: list[pb.Neighbor] = []
        neighbors = merge(calls, k, messages)
        result = self._assemble(calls, answered, neighbors, request.embedding.model_version)
        response = _response(result, messages)
        _report(response, calls, answered)
        return response

    async def _from_pacs(
        self, request: pb.SearchSimilarRequest, principal: Any, context: Any
    ) -> pb.SearchSimilarRequest:
        """A ``pacs`` query as DICOM files from the coordinator's PACS (``serve --federate
        ... --dicomweb URL``): PERMISSION_DENIED for researchers, FAILED_PRECONDITION
        ``NO_PACS`` without a PACS, ``NO_ENCODER`` without the sites' encoder (a study
        retrieved here must be embedded here: only the vector goes to the sites)."""
        restricted = Governance.restricts(principal)
        if not restricted and self.pacs is not None and self.encoder_dir is None:
            raise failed_precondition(
                "NO_ENCODER",
                "this coordinator has a PACS but not the sites' encoder; serve it with "
                "--encoder DIR so that a PACS study is embedded here, or send the vector",
            )
        return await pacs_query.resolve_search(
            request, context, pacs=self.pacs, max_files=self.max_files, restricted=restricted
        )

    async def _shard_search(
        self, embedding: pb.Vector, k: int, where: str, principal: Any, context: Any
    ) -> pb.SearchSimilarResponse:
        """Shard mode: the unsharded index's answer; researchers get the single-server
        researcher view of it (service.shards)."""
        assert self.shards is not None
        deadline = self._deadline(context)
        if Governance.restricts(principal):
            response, facts = await self.shards.researcher(
                embedding, k, where.strip(), deadline, principal=principal_key(principal)
            )
            add_facts(**facts)
            return response
        result, calls = await self.shards.search(embedding, k, where.strip(), deadline)
        add_facts(sites_answered=len(calls))
        cohort = self.shards.cohorts.get(result.index_version.split("+"))
        time_unit = str(cohort.manifest.get("time_unit") or convert.DEFAULT_TIME_UNIT)
        response = convert.search_response(result, time_unit=time_unit)
        _report(response, calls, calls)
        return response

    @grpc_errors
    async def GetCohortStats(
        self, request: pb.GetCohortStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCohortStatsResponse:
        """Shard mode: the unsharded server's cohort statistics (from the union of the
        shards' metadata; the researcher view applied here). Federation: UNIMPLEMENTED
        (sites do not release their cohort tables)."""
        if self.shards is None:
            raise ServiceError(
                grpc.StatusCode.UNIMPLEMENTED,
                "COHORT_STATS_NOT_FEDERATED",
                "a federated coordinator holds no cohort; ask each site for its statistics",
            )
        principal = current_principal()
        response, facts = await asyncio.to_thread(
            self.shards.cohort_stats,
            request.filter.where.strip(),
            restricted=Governance.restricts(principal),
            principal=principal_key(principal),
        )
        if facts:
            add_facts(**facts)
        return response

    @grpc_errors
    async def GetIndexInfo(
        self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexInfoResponse:
        """Every site's (shard's) index info, pooled: studies of the sites that answered,
        their versions by name, and ``federation`` naming each site's state."""
        principal = current_principal()
        calls = await self.fanout.search(request, self._deadline(context), method="GetIndexInfo")
        response = pooled_index_info(
            calls, max_k=self.max_k, dicom=self.encoder_dir is not None, shards=self.shards is not None
        )
        if Governance.restricts(principal):
            return Governance(DisclosurePolicy(min_cell=self.min_cell)).index_info(response)
        return response

    def _embed(self, files: list[bytes]) -> tuple[np.ndarray, str]:
        """``(vector (d,) float32, encoder version)`` of one DICOM study; blocking."""
        from encoders.dicom import read_study
        from encoders.model import embed, load_encoder
        from encoders.preprocess import preprocess

        assert self.encoder_dir is not None
        with self._encoder_lock:  # loaded once, on the first DICOM query
            if self._encoder is None:
                self._encoder = load_encoder(self.encoder_dir, device="cpu")
            encoder, card = self._encoder
        volume = preprocess(read_study(files), card.input)
        out = embed(encoder, volume[None], batch_size=1, device="cpu")
        return np.asarray(out[0], dtype=np.float32), str(card.version)

    async def _researcher(
        self, site_request: pb.SearchSiteRequest, context: Any, user: str
    ) -> pb.SearchSimilarResponse:
        """Pooled additive counts of at least ``min_sites`` sites, suppressed again after
        pooling; a binned Kaplan-Meier curve, label counts, no neighbour. Asked on behalf
        of ``user`` (its principal id): each site that trusts this coordinator checks the
        counts against that user's record of releases."""
        aggregate_request = pb.AggregateSiteRequest(
            embedding=site_request.embedding, k=site_request.k, filter=site_request.filter
        )
        calls = await self.fanout.search(
            aggregate_request, self._deadline(context), method="AggregateSite", on_behalf_of=user
        )
        answered = [c for c in calls if c.answered]
        add_facts(sites_answered=len(answered))
        if len(answered) < self.min_sites:
            named = "; ".join(f"{c.site.name}: {c.reason or 'answered'}" for c in calls)
            raise failed_precondition(
                "TOO_FEW_SITES",
                f"researchers' answers need at least {self.min_sites} sites contributing; "
                f"{len(answered)} answered ({named})",
            )
        parts = [convert.aggregates_from_proto(c.response) for c in answered]
        try:
            pooled = aggregates.pool(parts)
        except ValueError as exc:
            raise failed_precondition("SITES_DISAGREE", f"the sites' aggregates differ: {exc}") from None
        min_cell = max([self.min_cell, *(int(c.response.min_cell) for c in answered)])
        released = aggregates.suppress(pooled, min_cell)
        response = pb.SearchSimilarResponse(model_version=site_request.embedding.model_version)
        prog = response.prognosis
        prog.time_unit = convert.DEFAULT_TIME_UNIT
        var = 0.0
        for j, (t, s, n) in enumerate(aggregates.binned_km(released)):
            d = int(released.events[j])
            var += d / (n * (n - d)) if n > d else 0.0
            half = 1.959964 * s * math.sqrt(var)
            prog.survival.append(
                pb.SurvivalPoint(time=t, survival=s, lower=max(0.0, s - half), upper=min(1.0, s + half), at_risk=n)
            )
        events = int(released.events.sum())
        prog.events = events if events >= min_cell else 0
        prog.neighbors_with_outcome = int(released.patients)
        for name, values in sorted(released.labels.items()):
            total = sum(values.values())
            dist = prog.label_distributions.add(name=name)
            for value, c in sorted(values.items()):
                dist.shares.add(label=value, share=c / total if total else 0.0, count=c)
        dc = response.disclosure_control
        dc.min_cell_count = min_cell
        dc.aggregated_patients = int(released.patients)
        dc.withheld_fields.extend(sorted(released.withheld))
        _report(response, calls, answered)
        missing = [c for c in calls if not c.answered]
        if missing:
            convert.add_warnings(response.diagnostics, [_missing_notice(calls, missing)])
        return response

    def _assemble(
        self,
        calls: list[SiteCall],
        answered: list[SiteCall],
        neighbors: list[Any],
        model_version: str,
    ) -> QueryResult:
        """Prognosis and diagnostics of the merged neighbours (engine.prognose)."""
        notes: list[str] = []
        temps = sorted({round(float(c.response.temperature), 9) for c in answered if c.response})
        temperature = temps[0] if len(temps) == 1 else DEFAULT_TEMPERATURE
        if len(temps) > 1:  # the sites disagree: a fixed kernel, said so
            notes.append(
                f"the sites' similarity kernels differ; the prognosis uses the default "
                f"temperature {DEFAULT_TEMPERATURE:g}"
            )
        prognosis = engine.prognose(neighbors, temperature=temperature, horizons=self.horizons)
        # the query is as typical as the most typical site finds it (its neighbours in the
        # union are at least as close as in any one site)
        ood = min(float(c.response.ood_percentile) for c in answered if c.response is not None)
        sims = [nb.similarity for nb in neighbors]
        mean_sim = float(np.mean(sims)) if sims else float("nan")
        if ood >= OOD_WARN_PERCENTILE:
            notes.append(OOD_WARNING)
        missing = [c for c in calls if not c.answered]
        if missing:
            notes.insert(0, _missing_notice(calls, missing))
        diagnostics = Diagnostics(ood, mean_sim, warnings=notes)
        versions = ",".join(
            f"{c.site.name}={c.response.index_version}" for c in answered if c.response is not None
        )
        return QueryResult(neighbors, prognosis, diagnostics, versions, model_version)


def _response(result: QueryResult, messages: list[pb.Neighbor]) -> pb.SearchSimilarResponse:
    """``convert.search_response`` of ``result`` with the neighbours copied from the sites'
    ``messages`` (merged order) rather than encoded again (:func:`answer_neighbors`)."""
    neighbors, result.neighbors = result.neighbors, []
    try:
        response = convert.search_response(result)
    finally:
        result.neighbors = neighbors
    answer_neighbors(response, messages, neighbors)
    return response


def _missing_notice(calls: list[SiteCall], missing: list[SiteCall]) -> Notice:
    named = ", ".join(
        f"{c.site.name} ({_STATE_WORDS.get(c.state, 'missing')}: {c.reason})" for c in missing
    )
    return Notice(
        WarningCode.FEDERATION_SITE_MISSING,
        f"{len(missing)} of {len(calls)} sites are missing from this answer: {named}; "
        "the answer rests on the sites that answered",
    )


def _report(response: pb.SearchSimilarResponse, calls: list[SiteCall], answered: list[SiteCall]) -> None:
    """Fill ``response.federation``: every site's state and share of the answer."""
    report = response.federation
    for c in calls:
        version = c.response.model_version if c.response is not None else ""
        report.sites.append(
            pb.SiteReport(
                name=c.site.name,
                state=c.state,  # type: ignore[arg-type]
                reason=c.reason,
                neighbors=len(c.neighbors),
                model_version=version,
            )
        )
    report.cohort_studies = sum(int(c.response.num_studies) for c in answered if c.response is not None)


def pooled_index_info(
    calls: list[SiteCall], *, max_k: int, dicom: bool, shards: bool
) -> pb.GetIndexInfoResponse:
    """A coordinator's GetIndexInfo from its sites' answers: studies summed over the sites
    that answered; kind, metric and encoder version when they agree (else the distinct
    values joined by ","); ``index_version`` as ``name=version,...``; a shard coordinator
    also passes on the (whole-cohort) prognostic quality and warnings every shard carries.
    UNAVAILABLE when no site answered."""
    answered = [c for c in calls if c.answered]
    if not answered:
        named = "; ".join(f"{c.site.name}: {_STATE_WORDS.get(c.state, 'missing')} ({c.reason})" for c in calls)
        raise unavailable("NO_SITE_ANSWERED", f"no site answered: {named}")

    def agreed(field: str) -> str:
        return ",".join(sorted({str(getattr(c.response, field)) for c in answered}))

    first = answered[0].response
    out = pb.GetIndexInfoResponse(
        num_studies=sum(int(c.response.num_studies) for c in answered),
        dimension=int(first.dimension),
        metric=agreed("metric"),
        index_kind=agreed("index_kind"),
        model_version=agreed("model_version"),
        index_version=",".join(f"{c.site.name}={c.response.index_version}" for c in answered),
        gpu=all(bool(c.response.gpu) for c in answered),
        max_k=int(max_k),
        dicom_supported=bool(dicom),
    )
    if shards and len(answered) == len(calls):
        if first.HasField("prognostic_quality"):
            out.prognostic_quality.CopyFrom(first.prognostic_quality)
        out.warnings.extend(first.warnings)
    for c in calls:
        r = c.response
        out.federation.sites.append(
            pb.SiteReport(
                name=c.site.name,
                state=c.state,  # type: ignore[arg-type]
                reason=c.reason,
                model_version=str(r.model_version) if r is not None else "",
                num_studies=int(r.num_studies) if r is not None else 0,
                index_version=str(r.index_version) if r is not None else "",
            )
        )
    out.federation.cohort_studies = out.num_studies
    return out


def _nobody(calls: list[SiteCall], model_version: str) -> Exception:
    """The error when no site answered: the encoder mismatch when that is why, else
    UNAVAILABLE naming each site's state."""
    if all(c.reason == "MODEL_VERSION_MISMATCH" for c in calls):
        return failed_precondition(
            "MODEL_VERSION_MISMATCH",
            f"no site holds embeddings of model {model_version!r}; embed the study with "
            "the sites' encoder",
            expected="",
            actual=model_version,
        )
    named = "; ".join(
        f"{c.site.name}: {_STATE_WORDS.get(c.state, 'missing')} ({c.reason})" for c in calls
    )
    return unavailable("NO_SITE_ANSWERED", f"no site answered: {named}")


async def create_coordinator(
    sites: list[Site],
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    deadline_s: float = DEFAULT_SITE_DEADLINE_S,
    tls: TlsConfig | None = None,
    auth_tokens: Any = None,
    audit_log: Any = None,
    rate_limit: float | None = None,
    max_concurrent_per_principal: int | None = None,
    max_k: int = 1000,
    min_cell: int = DEFAULT_MIN_CELL,
    encoder_dir: Path | str | None = None,
    max_receive_mb: int = 64,
    mode: str = "federation",
    pacs: DicomwebConfig | None = None,
) -> tuple[grpc.aio.Server, int, Fanout]:
    """A coordinator server over ``sites`` (not started): ``(server, bound port, fanout)``;
    the caller closes ``fanout`` after stopping the server. Security as
    :func:`service.server.create_server` (TLS, tokens, audit, rate limits); ``min_cell``:
    the coordinator's own threshold for pooled counts (the sites' larger ones win);
    ``encoder_dir``: the sites' encoder, so DICOM queries are embedded here, once;
    ``pacs``: a DICOMweb PACS that ``pacs`` queries retrieve from (with ``encoder_dir``);
    ``mode``: ``federation`` or ``shards`` (:mod:`service.shards`: every ``Site`` names
    its ``index`` folder; researchers get the single-server view with ``min_cell``)."""
    from service.config import SecurityConfig
    from service.server import _Security

    if not sites:
        raise ValueError("a coordinator needs at least one site")
    if deadline_s <= 0:
        raise ValueError(f"the site deadline must be > 0 s, got {deadline_s}")
    security = _Security.build(
        SecurityConfig(
            tls=tls,
            auth_tokens=auth_tokens,
            audit_log=audit_log,
            rate_limit=rate_limit,
            max_concurrent_per_principal=max_concurrent_per_principal,
        )
    )
    fanout = Fanout(sites)
    size = int(max_receive_mb) << 20
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ],
        interceptors=list(security.interceptors),
    )
    servicer = CoordinatorServicer(
        fanout,
        deadline_s=deadline_s,
        max_k=max_k,
        min_cell=min_cell,
        encoder_dir=Path(encoder_dir) if encoder_dir is not None else None,
        shards=_shard_search_of(fanout, sites, min_cell) if mode == "shards" else None,
    )
    servicer.pacs = pacs
    if servicer.shards is not None and security.audit is not None:
        # shard mode keeps researchers' release records here: rebuild them from the log
        from service.audit import read_records

        shards = servicer.shards
        cohort = await asyncio.to_thread(shards.cohorts.get)
        replayed = await asyncio.to_thread(
            shards.governance.replay, read_records(security.audit.path), cohort
        )
        log.info("researcher answers replayed from the audit log: %d", replayed)
    cohortsim_pb2_grpc.add_PatientSimilarityServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_FULL_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_FULL_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if security.credentials is not None:
        bound = server.add_secure_port(address, security.credentials)
    else:
        bound = server.add_insecure_port(address)
    return server, bound, fanout


def _shard_search_of(fanout: Fanout, sites: list[Site], min_cell: int) -> ShardSearch:
    """Shard mode's search over ``sites`` (each with its ``index`` folder)."""
    return ShardSearch(
        fanout,
        ShardCohorts(shard_folders(sites)),
        governance=Governance(DisclosurePolicy(min_cell=min_cell)),
    )


async def serve_coordinator(
    sites: list[Site],
    host: str = "127.0.0.1",
    port: int = 50051,
    ready: Callable[[int], None] | None = None,
    *,
    grace: float = 5.0,
    **kwargs: Any,
) -> None:
    """Serve a coordinator until SIGTERM / SIGINT; ``kwargs`` go to :func:`create_coordinator`."""
    server, bound, fanout = await create_coordinator(sites, host=host, port=port, **kwargs)
    await server.start()
    if ready is not None:
        ready(bound)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    stop_wait = asyncio.create_task(stop.wait())
    terminated = asyncio.create_task(server.wait_for_termination())
    try:
        await asyncio.wait({stop_wait, terminated}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop(grace)
        await fanout.close()
        for task in (stop_wait, terminated):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["CoordinatorServicer", "create_coordinator", "serve_coordinator"]
