"""The RPCs beyond search: streamed DICOM search, patient and study listing,
cohort statistics, and the admin calls (ingest, delete, reload).

:class:`CohortRpcs` is a mixin of :class:`service.servicer.PatientSimilarityServicer`:
it uses the servicer's ``state``, ``limits``, ``governance`` and ``_run`` (blocking work
on the worker pool). Who may call what is decided by ``service.auth.METHOD_RIGHTS``
before a handler runs; researchers' GetCohortStats answers go through
``Governance.cohort_stats`` (small cells withheld).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from indexing.snapshot import Snapshot
from indexing.store import ACQUISITION_COLUMNS
from service.api import cohortsim_pb2 as pb
from service.errors import ServiceError, failed_precondition, grpc_errors, invalid_argument
from service.governance import principal_key
from service.interceptors.audit import MAX_TEXT
from service.interceptors.call import add_facts, current_call, current_principal

log = logging.getLogger(__name__)

T = TypeVar("T")

PSEUDONYM = re.compile(r"^P-[0-9a-f]{16}$")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_MAX_STREAM_MB = 512  # explicit cap of a streamed study (SearchSimilarStream)
DEFAULT_MAX_INGEST_MB = 2048  # cap of one IngestStudies call
MAX_STREAM_MESSAGES = 1 << 16  # messages of one SearchSimilarStream (64 KiB chunks: 4 GiB)


def resource_exhausted(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, metadata)


def not_found(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message, metadata)


def parse_patient_id(patient_id: str) -> str:
    pid = patient_id.strip()
    if not PSEUDONYM.match(pid):
        raise invalid_argument(
            "INVALID_PATIENT_ID",
            "patient_id must be a pseudonym: P- followed by 16 hexadecimal digits "
            "(the service never sees raw patient ids; pseudonymise with `cohortsim delete`)",
        )
    return pid


def live_rows(snapshot: Snapshot, where: str = "") -> np.ndarray:
    """Row numbers (ascending) the filter selects, without withdrawn patients."""
    mask = snapshot.allowed(where.strip())
    if mask is None:
        return np.arange(snapshot.num_studies, dtype=np.int64)
    return np.flatnonzero(mask.mask).astype(np.int64)


def study_summaries(snapshot: Snapshot, rows: np.ndarray) -> list[pb.StudySummary]:
    meta = snapshot.metadata
    cols = [
        c
        for c in ("study_uid", "patient_id", "site", "modality", "study_day", *ACQUISITION_COLUMNS)
        if c in meta.column_names
    ]
    table = meta.select(cols).take(rows).to_pylist()
    out = []
    for rec in table:
        acquisition = {
            c: str(rec[c]) for c in ACQUISITION_COLUMNS if rec.get(c) not in (None, "")
        }
        out.append(
            pb.StudySummary(
                study_uid=str(rec.get("study_uid") or ""),
                patient_id=str(rec.get("patient_id") or ""),
                site=str(rec.get("site") or ""),
                modality=str(rec.get("modality") or ""),
                study_day=int(rec.get("study_day") or 0),
                acquisition=acquisition,
            )
        )
    return out


def _outcome(snapshot: Snapshot, row: int) -> pb.Outcome:
    meta = snapshot.metadata
    rec = meta.select([c for c in ("time", "event", "labels", "values") if c in meta.column_names]).slice(row, 1).to_pylist()[0]
    out = pb.Outcome(
        labels={str(k): str(v) for k, v in (rec.get("labels") or [])},
        values={str(k): float(v) for k, v in (rec.get("values") or []) if v is not None},
    )
    t = rec.get("time")
    if t is not None and np.isfinite(t):
        out.time = float(t)
    if rec.get("event") is not None:
        out.event = bool(rec["event"])
    return out


def encode_page_token(version: str, where: str, offset: int) -> str:
    raw = json.dumps({"v": version, "w": where, "o": offset}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, version: str, where: str) -> int:
    bad = invalid_argument(
        "INVALID_PAGE_TOKEN",
        "page_token is not a next_page_token of this index version and filter; "
        "start again with an empty page_token",
    )
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = int(data["o"])
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if data.get("v") != version or data.get("w") != where or offset < 0:
        raise bad
    return offset


def cohort_stats(snapshot: Snapshot, rows: np.ndarray) -> pb.GetCohortStatsResponse:
    """Counts of ``rows``: studies, patients, by site, scanner and outcome label."""
    meta = snapshot.metadata
    names = [c for c in ("patient_id", "site", "manufacturer", "model", "labels") if c in meta.column_names]
    t = meta.select(names).take(rows).to_pydict()
    patients = [str(p) for p in t["patient_id"]]

    def by(keys: list[str]) -> list[pb.CategoryCount]:
        studies: Counter[str] = Counter(keys)
        people: dict[str, set[str]] = {}
        for key, p in zip(keys, patients, strict=True):
            people.setdefault(key, set()).add(p)
        return [
            pb.CategoryCount(value=key, study_count=n, patient_count=len(people[key]))
            for key, n in sorted(studies.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    sites = [str(s or "") for s in t.get("site", [None] * len(patients))]
    scanners = [
        " ".join(x for x in (str(m or ""), str(mo or "")) if x)
        for m, mo in zip(
            t.get("manufacturer", [None] * len(patients)),
            t.get("model", [None] * len(patients)),
            strict=True,
        )
    ]
    label_people: dict[tuple[str, str], set[str]] = {}
    for labels, p in zip(t.get("labels", [None] * len(patients)), patients, strict=True):
        for name, value in labels or []:
            label_people.setdefault((str(name), str(value)), set()).add(p)
    return pb.GetCohortStatsResponse(
        study_count=len(patients),
        patient_count=len(set(patients)),
        sites=by(sites),
        scanners=by(scanners),
        labels=[
            pb.LabelCount(name=name, value=value, patient_count=len(ps))
            for (name, value), ps in sorted(label_people.items())
        ],
        index_version=snapshot.version,
    )


class CallerSlots:
    """DICOM calls per caller: ``per_caller`` run at once, up to ``waiting`` more wait
    their turn (before anything is decoded), beyond that RESOURCE_EXHAUSTED
    ``TOO_MANY_DICOM_CALLS``. One caller's uploads then never hold more than its share
    of the workers and the decode budget while others wait. A caller whose upload was
    refused by the decode budget (:meth:`penalise`) has its DICOM calls refused for
    ``cooldown_s`` (``DICOM_COOLDOWN``): parsing the headers of a bomb costs CPU (and
    the interpreter lock), so bombs sent back to back must not each get that far.
    ``hold``: a refused call is answered only when the cooldown ends, and counts against
    the caller's calls meanwhile. Refusing at once let a caller that sends back to back
    make hundreds of calls a second (each one received, parsed and answered by the
    server: 313 calls/s of 677 kB in ``benchmarks/bench_hostile_uploads.py``); held, it
    gets at most ``per_caller + waiting`` calls answered per cooldown."""

    def __init__(
        self, per_caller: int = 2, waiting: int = 8, cooldown_s: float = 10.0, *, hold: bool = False
    ) -> None:
        if per_caller < 1 or waiting < 0 or cooldown_s < 0:
            raise ValueError("per_caller must be >= 1, waiting and cooldown_s >= 0")
        self.per_caller = per_caller
        self.waiting = waiting
        self.cooldown_s = cooldown_s
        self.hold = hold
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        self._until: dict[str, float] = {}

    def penalise(self, key: str) -> None:
        """Refuse ``key``'s DICOM calls for ``cooldown_s`` from now."""
        if self.cooldown_s > 0:
            if len(self._until) > 10_000:  # forget expired entries
                now = time.monotonic()
                self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[key] = time.monotonic() + self.cooldown_s

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        wait = self._until.get(key, 0.0) - time.monotonic()
        sem, count = self._slots.setdefault(key, (asyncio.Semaphore(self.per_caller), [0]))
        if count[0] >= self.per_caller + self.waiting:
            raise resource_exhausted(
                "TOO_MANY_DICOM_CALLS",
                f"this caller already has {count[0]} DICOM calls in progress or waiting; "
                "wait for them to finish",
                limit=str(self.per_caller + self.waiting),
            )
        count[0] += 1
        try:
            if wait > 0:
                if self.hold:  # answered when the cooldown ends (class docstring)
                    await asyncio.sleep(wait)
                left = max(0.0, self._until.get(key, 0.0) - time.monotonic())
                raise resource_exhausted(
                    "DICOM_COOLDOWN",
                    "an upload of this caller was refused by the decode budget; its DICOM "
                    f"calls are refused for {self.cooldown_s:g} s after that"
                    + (f" ({math.ceil(left)} s more)" if left > 0 else ""),
                    retry_after_ms=str(math.ceil(left * 1000)),
                )
            async with sem:
                yield
        finally:
            count[0] -= 1
            if not count[0]:
                self._slots.pop(key, None)


def caller_key() -> str:
    """Who is calling, for per-caller limits: the principal, else the peer host."""
    call = current_call()
    if call is None:
        return ""
    if call.principal is not None:
        return f"principal:{call.principal.id}"
    return "peer:" + call.peer.rpartition(":")[0]


class CohortRpcs:
    """The non-search RPCs (mixed into the servicer; see the module docstring)."""

    state: Any
    governance: Any
    store_dir: Path | None = None  # the cohort store IngestStudies / DeletePatient write to
    max_stream_bytes: int = DEFAULT_MAX_STREAM_MB << 20
    max_ingest_bytes: int = DEFAULT_MAX_INGEST_MB << 20
    dicom_slots: CallerSlots = CallerSlots()  # the server sets its own

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:  # the servicer's
        raise NotImplementedError

    # ------------------------------------------------------------------ streamed search
    @grpc_errors
    async def SearchSimilarStream(
        self,
        request_iterator: AsyncIterator[pb.SearchSimilarStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.SearchSimilarStreamResponse:
        """Buffer a streamed study, then answer it as SearchSimilar. Refused before
        anything is buffered when the index has no encoder or the caller already has its
        DICOM calls in progress; empty chunks and more than :data:`MAX_STREAM_MESSAGES`
        messages are refused as they arrive."""
        async with contextlib.AsyncExitStack() as stack:
            header = await self._buffer_stream(request_iterator, stack)
        search = getattr(self, "SearchSimilar")  # noqa: B009  (the servicer's handler)
        response = await search(header, context)
        return pb.SearchSimilarStreamResponse(response=response)

    async def _buffer_stream(
        self,
        request_iterator: AsyncIterator[pb.SearchSimilarStreamRequest],
        stack: contextlib.AsyncExitStack,
    ) -> pb.SearchSimilarRequest:
        header: pb.SearchSimilarRequest | None = None
        files: list[bytes] = []
        current = bytearray()
        total = 0
        messages = 0
        max_files = int(getattr(getattr(self, "limits", None), "max_files", 4096))
        async for msg in request_iterator:
            messages += 1
            if messages > MAX_STREAM_MESSAGES:
                raise invalid_argument(
                    "TOO_MANY_CHUNKS",
                    f"a SearchSimilarStream may carry {MAX_STREAM_MESSAGES} messages; send "
                    "larger chunks (e.g. 1 MiB)",
                )
            part = msg.WhichOneof("part")
            if header is None:
                if part != "request":
                    raise invalid_argument(
                        "STREAM_WITHOUT_REQUEST",
                        "the first SearchSimilarStream message must carry `request`",
                    )
                header = pb.SearchSimilarRequest()
                header.CopyFrom(msg.request)
                kind = header.WhichOneof("query")
                if kind not in (None, "dicom"):
                    raise invalid_argument(
                        "STREAM_NOT_DICOM",
                        "SearchSimilarStream carries DICOM studies; send embeddings and "
                        "study ids with SearchSimilar",
                    )
                total = sum(len(f) for f in header.dicom.files)
                snapshot = self.state.require_snapshot()
                if snapshot.encoder_dir is None:
                    self.state.encoder(snapshot)  # NO_ENCODER before anything is buffered
                await stack.enter_async_context(self.dicom_slots.slot(caller_key()))
                continue
            if part != "chunk":
                raise invalid_argument(
                    "STREAM_REQUEST_TWICE", "only the first message may carry `request`"
                )
            if not msg.chunk.data and not (msg.chunk.last and current):
                raise invalid_argument(
                    "EMPTY_CHUNK",
                    "a SearchSimilarStream chunk carried no data; only a `last` marker may be "
                    "empty, and only after data of its file",
                )
            total += len(msg.chunk.data)
            if total > self.max_stream_bytes:
                raise resource_exhausted(
                    "STUDY_TOO_LARGE",
                    f"the streamed study exceeds the server's cap of "
                    f"{self.max_stream_bytes >> 20} MiB",
                    limit_mb=str(self.max_stream_bytes >> 20),
                )
            current += msg.chunk.data
            if msg.chunk.last:
                files.append(bytes(current))
                current = bytearray()
                if len(files) + len(header.dicom.files) > max_files:
                    raise invalid_argument(
                        "TOO_MANY_FILES", f"a study may carry {max_files} files at most"
                    )
        if header is None:
            raise invalid_argument("STREAM_EMPTY", "the stream carried no request")
        if current:
            files.append(bytes(current))  # a last file without `last` set
        header.dicom.files.extend(files)
        return header

    # ------------------------------------------------------------------ patients, studies
    @grpc_errors
    async def GetPatient(
        self, request: pb.GetPatientRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPatientResponse:
        snapshot = self.state.require_snapshot()
        pid = parse_patient_id(request.patient_id)
        rows = snapshot.rows_of_patient(pid)
        if not rows:
            raise not_found(
                "UNKNOWN_PATIENT",
                "no study of this patient is in the served index (unknown or withdrawn)",
            )
        rows_a = np.asarray(sorted(rows), dtype=np.int64)
        return pb.GetPatientResponse(
            patient_id=pid,
            studies=study_summaries(snapshot, rows_a),
            outcome=_outcome(snapshot, int(rows_a[0])),
            index_version=snapshot.version,
        )

    @grpc_errors
    async def ListStudies(
        self, request: pb.ListStudiesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStudiesResponse:
        snapshot = self.state.require_snapshot()
        size = int(request.page_size) or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid_argument(
                "INVALID_PAGE_SIZE", f"page_size must lie in [0, {MAX_PAGE_SIZE}]; got {size}"
            )
        where = request.filter.where.strip()  # inner spacing is part of quoted values
        offset = (
            decode_page_token(request.page_token, snapshot.version, where)
            if request.page_token
            else 0
        )
        rows = await self._run(live_rows, snapshot, where)
        page = rows[offset : offset + size]
        nxt = offset + size
        return pb.ListStudiesResponse(
            studies=study_summaries(snapshot, page),
            next_page_token=(
                encode_page_token(snapshot.version, where, nxt) if nxt < len(rows) else ""
            ),
            total_size=len(rows),
        )

    @grpc_errors
    async def GetCohortStats(
        self, request: pb.GetCohortStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCohortStatsResponse:
        snapshot = self.state.require_snapshot()
        where = request.filter.where.strip()  # inner spacing is part of quoted values
        principal = current_principal()
        restricted = self.governance.restricts(principal)
        key = principal_key(principal)
        if restricted and where:  # small / differencing sub-cohorts
            self.governance.check_filter(snapshot, where, principal=key)
        rows = await self._run(live_rows, snapshot, where)
        response = await self._run(cohort_stats, snapshot, rows)
        if restricted:
            governed = self.governance.cohort_stats(response, snapshot, rows, principal=key)
            # what the audit record needs to rebuild the release at start: the filter
            # (re-evaluated), or the patients when the record keeps only a filter prefix
            facts: dict[str, Any] = {"release_kind": "stats", "release_principal": key}
            if len(request.filter.where) > MAX_TEXT:
                ids = snapshot.metadata.column("patient_id").take(rows).to_pylist()
                facts["aggregated_patients"] = sorted({str(p) for p in ids})
            add_facts(**facts)
            return governed
        return response

    # ------------------------------------------------------------------ admin
    @grpc_errors
    async def IngestStudies(
        self,
        request_iterator: AsyncIterator[pb.IngestStudiesRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.IngestStudiesResponse:
        if self.store_dir is None:
            raise failed_precondition(
                "NO_STORE",
                "this server has no cohort store; start it with --store to accept studies",
            )
        with tempfile.TemporaryDirectory(prefix="cohortsim-ingest-") as tmp:
            received = 0
            total = 0
            async for msg in request_iterator:
                files = list(msg.study.files)
                if not files:
                    raise invalid_argument("EMPTY_STUDY", f"study {received} carries no files")
                total += sum(len(f) for f in files)
                if total > self.max_ingest_bytes:
                    raise resource_exhausted(
                        "INGEST_TOO_LARGE",
                        f"one IngestStudies call may carry {self.max_ingest_bytes >> 20} MiB; "
                        "split the studies over several calls",
                    )
                folder = Path(tmp) / f"study-{received:06d}"
                folder.mkdir()
                for j, data in enumerate(files):
                    (folder / f"{j:06d}.dcm").write_bytes(data)
                received += 1
            report = await self._run(_ingest, Path(tmp), self.store_dir)
        rejections = [
            str(r.get("reason", "rejected"))
            for r in [*report.studies_rejected, *report.files_rejected]
        ]
        log.info(
            "ingest: %d studies received, %d ingested, %d already present, %d rejections",
            received,
            report.studies_ingested,
            report.studies_already_present,
            len(rejections),
        )
        return pb.IngestStudiesResponse(
            received_count=received,
            ingested_count=report.studies_ingested,
            already_present_count=report.studies_already_present,
            rejections=rejections,
        )

    @grpc_errors
    async def DeletePatient(
        self, request: pb.DeletePatientRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePatientResponse:
        from indexing.tombstones import TOMBSTONE_FILE, add_tombstones

        pid = parse_patient_id(request.patient_id)
        snapshot = self.state.snapshot
        index_dir = self.state.index_dir
        if index_dir is None:
            raise failed_precondition("NO_INDEX_DIR", "this server serves no index folder")
        hidden = len(snapshot.rows_of_patient(pid)) if snapshot is not None else 0
        added = await self._run(add_tombstones, Path(index_dir) / TOMBSTONE_FILE, [pid])
        store_dir = self.store_dir
        if store_dir is not None:
            from indexing.store import CohortStore

            await self._run(lambda: CohortStore(store_dir).delete_patients([pid]))
        log.info("a patient was withdrawn (%d studies hidden)", hidden)
        return pb.DeletePatientResponse(newly_deleted=added > 0, hidden_study_count=hidden)

    @grpc_errors
    async def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadIndexResponse:
        swapped = await self._run(self.state.refresh)
        snapshot = self.state.require_snapshot()
        return pb.ReloadIndexResponse(index_version=snapshot.version, reloaded=bool(swapped))


def _ingest(folder: Path, store_dir: Path) -> Any:
    from encoders.deid import Pseudonymizer
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore

    return ingest_folder(
        folder,
        CohortStore(store_dir, create=True),
        pseudonymizer=Pseudonymizer.from_env_or_file(None),
        workers=1,
    )


__all__ = [
    "DEFAULT_MAX_STREAM_MB",
    "CallerSlots",
    "CohortRpcs",
    "caller_key",
    "cohort_stats",
    "decode_page_token",
    "encode_page_token",
    "live_rows",
    "parse_patient_id",
    "study_summaries",
]
