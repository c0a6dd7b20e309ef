"""A DICOM C-STORE SCP (with C-ECHO) that spools received studies and ingests them once
they are stable (``cohortsim listen``), on pynetdicom.

Who may send: the called AE title must be ours; calling AE titles and peer hosts may be
limited to allow-lists (an AE title not listed gets A-ASSOCIATE-RJ "calling AE title not
recognised"; a host not listed has its connection closed before any DICOM is read).
What is kept: CT, MR and PET image storage SOP classes (:data:`IMAGE_SOP_CLASSES`); any
other storage SOP class is answered ``0x0122`` (Refused: SOP Class not supported).

Spool (a private folder, mode 0700), files named by UID hashes, never by UIDs::

    SPOOL/incoming/<study hash>/<instance hash>.dcm   received, waiting to be stable
    SPOOL/incoming/<study hash>/.open-<association>    an association is still sending
    SPOOL/ingesting/<study hash>/                      handed to the ingest

An instance is acknowledged (``0x0000``) only after its file is written, fsynced, renamed
into place and the rename fsynced in its folder (the two fsyncs unless ``fsync=False``,
which keeps what a killed process acknowledged, not what a power loss interrupts); a write that fails (disk full, I/O error) is answered ``0xA700``
(Refused: Out of resources) and leaves nothing behind, so nothing acknowledged is lost,
and its study is held (as after a broken association) until the sender re-sends it.
A study is ingested when no association is sending to it and nothing arrived for
``stable_s`` seconds. An association that ends without a release (aborted, connection
lost, listener killed) leaves its ``.open-`` marker: the study is held, not
half-ingested, until a sender completes it with a released association (a re-send), or
``incomplete_hold_s`` passes (then it is ingested as it is, with a warning). After a
restart every spooled study is picked up again; the store skips studies it already
holds, so an ingest interrupted between the store write and the spool clean-up adds
nothing twice.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexing.durable import fsync_dir
from service.pacs.dicomweb import private_dir, uid_hash
from service.pacs.errors import pacs_missing
from service.pacs.part10 import meta_header, study_uid_of
from service.pacs.reactor import drop_log_handlers, quicken

log = logging.getLogger(__name__)

# Storage SOP classes whose images cohortsim reads (PS3.4 B.5): CT, MR, PET and their
# enhanced / legacy-converted forms.
IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
    }
)
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
INCOMING = "incoming"
INGESTING = "ingesting"
OPEN_MARKER = ".open-"


@dataclass
class _Sending:
    """What one association has sent: its marker token, its studies, and those of which
    an instance was refused."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    studies: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ListenerConfig:
    """``cohortsim listen``'s settings (``allowed_*`` empty = anyone)."""

    spool: Path
    ae_title: str = "COHORTSIM"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    stable_s: float = 10.0
    incomplete_hold_s: float = 24 * 3600.0
    poll_s: float = 1.0
    # fsync each instance and its folder entry before acknowledging it: what was
    # acknowledged then survives an OS crash or power loss too (a killed process loses
    # nothing either way: the kernel holds what was written); two journal commits an
    # instance, the bound on one sender's rate (benchmarks/RESULTS.md, issue 19)
    fsync: bool = True
    # pynetdicom's reactors with event-driven waits instead of 1 ms sleeps
    # (service.pacs.reactor; about 1.6x the instances a second of one sender)
    quick_reactor: bool = True


class StoreListener:
    """The C-STORE SCP and its stable-study timer.

    ``ingest(folder)`` ingests every study folder under ``folder`` (called on the timer
    thread, one call at a time; it must return only once the studies are in the store,
    and may raise: the studies then stay spooled and are retried on the next tick).
    ``on_tick()`` runs after each tick's ingest (e.g. a publish that failed, retried).
    """

    def __init__(
        self,
        config: ListenerConfig,
        ingest: Callable[[Path], Any],
        *,
        on_tick: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self._ingest = ingest
        self._on_tick = on_tick
        self.spool = private_dir(config.spool)
        self.incoming = private_dir(self.spool / INCOMING)
        self.ingesting = private_dir(self.spool / INGESTING)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._assoc: dict[int, _Sending] = {}  # id(association) -> what it sent
        self._server: Any = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.port = 0
        self.received = 0
        self.refused = 0
        self.ingested_batches = 0

    # ---------------------------------------------------------------- network side
    def start(self) -> int:
        """Bind and serve in the background; returns the port (``port=0`` picks one)."""
        try:
            from pynetdicom import (
                AE,
                ALL_TRANSFER_SYNTAXES,
                DEFAULT_TRANSFER_SYNTAXES,
                StoragePresentationContexts,
                evt,
            )
            from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        except ImportError:
            raise pacs_missing("pynetdicom") from None
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.config.allowed_aets:
            ae.require_calling_aet = list(self.config.allowed_aets)
        # image classes in any transfer syntax; the other storage classes only
        # uncompressed, enough to answer their C-STORE with 0x0122: pynetdicom deep-copies
        # every supported context for each association (all 120 x 45 cost ~30 % of its CPU
        # time in a 256-instance association)
        for cx in StoragePresentationContexts:
            sop_class = str(cx.abstract_syntax)
            ae.add_supported_context(
                sop_class, ALL_TRANSFER_SYNTAXES if sop_class in IMAGE_SOP_CLASSES else DEFAULT_TRANSFER_SYNTAXES
            )
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server: Any = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        if self.config.allowed_hosts:
            allowed = set(self.config.allowed_hosts)

            def verify_request(request: Any, client_address: Any) -> bool:
                ok = str(client_address[0]) in allowed
                if not ok:
                    log.warning("listen: refused a connection from a host not on the allow-list")
                return ok

            server.verify_request = verify_request  # socketserver's hook: False closes it
        self._server = server
        self.port = int(server.server_address[1])
        self._timer = threading.Thread(target=self._tick_loop, name="cohortsim-listen-timer", daemon=True)
        self._timer.start()
        log.info("listen: %s on port %d", self.config.ae_title, self.port)
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._timer is not None:
            self._timer.join(timeout=60)
            self._timer = None

    def _lock(self, study: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(study, threading.Lock())

    def _on_open(self, event: Any) -> None:
        """Event-driven reactor waits for the new association (:mod:`service.pacs.reactor`)."""
        if self.config.quick_reactor:
            quicken(event.assoc)
        drop_log_handlers(event.assoc)

    def _on_store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in IMAGE_SOP_CLASSES:
            self.refused += 1
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            # the data set is written as sent: only the header up to the study UID is parsed
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            syntax = str(event.context.transfer_syntax)
            dataset = event.request.DataSet.getvalue()
            study_uid = study_uid_of(dataset, syntax)
            data = (meta_header(sop_class, sop_uid, syntax), dataset)
        except Exception as exc:  # a dataset that does not decode: refuse this instance
            log.warning("listen: an instance could not be decoded (%s)", type(exc).__name__)
            self.refused += 1
            return STATUS_CANNOT_UNDERSTAND
        study = uid_hash(study_uid)
        sending = self._assoc.setdefault(id(event.assoc), _Sending())
        try:
            with self._lock(study):
                folder = self.incoming / study
                if not folder.exists():
                    folder.mkdir(mode=0o700, exist_ok=True)
                    if self.config.fsync:  # the new folder's entry, durable with its files
                        fsync_dir(self.incoming)
                if study not in sending.studies:
                    (folder / f"{OPEN_MARKER}{sending.token}").touch()
                    sending.studies.add(study)
                self._write(folder / f"{uid_hash(sop_uid)}.dcm", data, fsync=self.config.fsync)
        except OSError as exc:
            sending.failed.add(study)  # held after the release: the sender must re-send
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or "I/O error")
            log.error("listen: cannot spool an instance (%s); answered Out of resources", what)
            self.refused += 1
            return STATUS_OUT_OF_RESOURCES
        self.received += 1
        return STATUS_SUCCESS

    @staticmethod
    def _write(path: Path, data: bytes | tuple[bytes, ...], *, fsync: bool = True) -> None:
        """Write ``data`` (bytes, or parts written one after the other), fsync and rename
        into place (nothing partial is ever visible)."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for part in (data,) if isinstance(data, bytes) else data:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if fsync:  # the rename is in the folder: without this a power loss may undo it
                fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _on_released(self, event: Any) -> None:
        """A clean release completes what the association sent: its studies (and any
        study it re-sent after an earlier broken association) lose their markers, except
        studies of which an instance was refused (they wait for a re-send)."""
        sending = self._assoc.pop(id(event.assoc), None)
        if sending is None:
            return
        for study in sending.studies - sending.failed:
            with self._lock(study):
                for marker in (self.incoming / study).glob(f"{OPEN_MARKER}*"):
                    marker.unlink(missing_ok=True)

    def _on_acse_recv(self, event: Any) -> None:
        """The peer's A-RELEASE request completes the association's sending: handled here,
        on the association's thread before the release reply goes out, since the
        connection may close (``EVT_CONN_CLOSE``, on another thread) before
        ``EVT_RELEASED`` fires."""
        from pynetdicom.pdu_primitives import A_RELEASE

        prim = event.primitive
        if isinstance(prim, A_RELEASE) and prim.result is None:
            self._on_released(event)

    def _on_closed(self, event: Any) -> None:
        """A connection that closes without a release keeps its markers (study held)."""
        if self._assoc.pop(id(event.assoc), None) is not None:
            log.warning("listen: an association ended without a release; its studies are held until re-sent")

    # ---------------------------------------------------------------- timer side
    def _tick_loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.ingest_stable()
                if self._on_tick is not None:
                    self._on_tick()
            except Exception as exc:  # keep listening; the studies stay spooled
                log.error("listen: ingest or publish failed (%s); retrying on the next tick", type(exc).__name__)

    def stable_studies(self, now: float | None = None) -> list[str]:
        """Study hashes that may be ingested now."""
        now = time.time() if now is None else now
        ready = []
        for folder in sorted(self.incoming.iterdir()):
            if not folder.is_dir():
                continue
            entries = list(folder.iterdir())
            markers = [p for p in entries if p.name.startswith(OPEN_MARKER)]
            files = [p for p in entries if p.suffix == ".dcm"]
            if not files:
                continue
            newest = max(p.stat().st_mtime for p in entries)
            if now - newest < self.config.stable_s:
                continue
            if markers:
                if now - newest < self.config.incomplete_hold_s:
                    continue
                log.warning("listen: a study held as incomplete for %.0f s is ingested as it is", now - newest)
            ready.append(folder.name)
        return ready

    def ingest_stable(self, now: float | None = None) -> int:
        """Hand the stable studies (and any left by an earlier run) to the ingest; returns
        how many study folders were ingested."""
        for study in self.stable_studies(now):
            with self._lock(study):
                src = self.incoming / study
                dst = self.ingesting / study
                if dst.exists():  # an earlier hand-over of the same study not yet ingested
                    for path in src.glob("*.dcm"):
                        os.replace(path, dst / path.name)
                    shutil.rmtree(src)
                else:
                    os.replace(src, dst)
        folders = [p for p in self.ingesting.iterdir() if p.is_dir()]
        if not folders:
            return 0
        for folder in folders:  # markers do not travel into the ingest
            for marker in folder.glob(f"{OPEN_MARKER}*"):
                marker.unlink(missing_ok=True)
        self._ingest(self.ingesting)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.ingested_batches += 1
        return len(folders)
