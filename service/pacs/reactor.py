"""Event-driven waits for pynetdicom's acceptor reactors (C-STORE receive throughput).

pynetdicom runs two loops per association: the DUL reactor (socket <-> PDUs) sleeps
1 ms whenever it finds nothing to do, and the association reactor (DIMSE messages ->
handlers) sleeps 1 ms before every look at its message queue. A C-STORE sender such as
dcmtk's ``storescu`` sends one instance, waits for the response, then sends the next, so
every instance waits for several of these sleeps; on a loaded machine each sleep lasts
longer than asked. That, not our handler, capped ``cohortsim listen`` at 0.16-0.35x of
dcmtk's ``storescp`` (``benchmarks/RESULTS.md``, issue 19).

:func:`quicken` (called from ``EVT_CONN_OPEN``, before the association's threads start)
swaps the two loops for ones that *wait on what they wait for*: the DUL blocks in
``select`` on its socket and on a wake-up pipe that a queued outgoing primitive writes
to; the association reactor blocks on its DIMSE message queue. Both still wake every
``IDLE_WAIT_S`` to check timers, release, abort and the kill flag, so their behaviour
is pynetdicom's own (the loop bodies are its, only the waits differ). The swap is made
only on the pynetdicom versions these loops were copied from (:data:`SUPPORTED`); on
any other the stock reactors run unchanged (slower, same results).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: pynetdicom versions (major.minor) whose reactor loops are mirrored here
SUPPORTED = ("3.0",)
#: the longest a reactor waits before it re-checks its timers and flags (seconds)
IDLE_WAIT_S = 0.02

_classes: tuple[type, type] | None = None


def _pynetdicom_supported() -> bool:
    import pynetdicom

    return ".".join(str(pynetdicom.__version__).split(".")[:2]) in SUPPORTED


def _make_classes() -> tuple[type, type]:
    from pynetdicom import evt
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu import A_ABORT_RQ

    class QuickDUL(DULServiceProvider):
        """The DUL reactor of pynetdicom 3.0, waiting in ``select`` instead of sleeping."""

        _wake_r: int
        _wake_w: int
        _wake_lock: threading.Lock

        def send_pdu(self, primitive: Any) -> None:
            super().send_pdu(primitive)
            # under the lock: once the reactor has closed the pipe its fd numbers may
            # belong to another file
            with self._wake_lock, contextlib.suppress(OSError):  # full pipe: already woken
                if self._wake_w >= 0:
                    os.write(self._wake_w, b"\0")

        def _wait(self) -> None:
            """Until the socket has data, a primitive was queued, or IDLE_WAIT_S passed."""
            sock = getattr(self.socket, "socket", None)
            if sock is None or isinstance(sock, ssl.SSLSocket):  # TLS may buffer: poll
                time.sleep(self._run_loop_delay)
                return
            try:
                ready, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT_S)
            except (OSError, ValueError):  # socket closed: the loop notices (Evt17)
                return
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)

        def run_reactor(self) -> None:
            try:
                self._run()
            finally:
                with self._wake_lock:
                    for fd in (self._wake_r, self._wake_w):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    self._wake_r = self._wake_w = -1

        def _run(self) -> None:  # pynetdicom 3.0 dul.run_reactor, waits changed
            self._idle_timer.start()
            sleep = False
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    log.error("DUL reactor: exception, aborting the association (%s)", type(exc).__name__)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False

    class QuickAssociation(Association):
        """The acceptor reactor of pynetdicom 3.0, blocking on the DIMSE message queue."""

        def _run_reactor(self) -> None:  # pynetdicom 3.0 Association._run_reactor
            self._is_paused = False
            while not self._kill:
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self._is_paused = False
                try:
                    context_id, msg = self.dimse.msg_queue.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    context_id, msg = None, None
                if msg:
                    self._serve_request(msg, int(context_id or 0))
                if self.is_established and self.acse.is_release_requested():
                    self.acse.send_release(is_response=True)
                    self.is_released = True
                    self.is_established = False
                    evt.trigger(self, evt.EVT_RELEASED, {})
                    self.kill()
                    return
                if self.acse.is_aborted():
                    self.dul.receive_pdu(wait=False)
                    self.is_aborted = True
                    self.is_established = False
                    evt.trigger(self, evt.EVT_ABORTED, {})
                    self.kill()
                    return
                if not self.dul.is_alive():
                    self.kill()
                    return
                if self.dul.idle_timer_expired():
                    log.error("listen: network timeout reached")
                    if self.network_timeout_response == "A-RELEASE":
                        self._is_paused = True
                        self._reactor_checkpoint.wait()
                        self.release()
                        self._is_paused = False
                    else:
                        self.abort()
                    self.kill()
                    return

    return QuickAssociation, QuickDUL


def drop_log_handlers(assoc: Any) -> bool:
    """Unbind pynetdicom's standard logging handlers from ``assoc`` when its logger would
    drop what they write (below INFO): they format every PDU and DIMSE message (and copy
    each received data set) whatever the level. True when unbound."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return False
    from pynetdicom import evt
    from pynetdicom._handlers import (
        standard_dimse_recv_handler,
        standard_dimse_sent_handler,
        standard_pdu_recv_handler,
        standard_pdu_sent_handler,
    )

    for event, handler in (
        (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
        (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
        (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
        (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    ):
        assoc.unbind(event, handler)
    return True


def quicken(assoc: Any) -> bool:
    """Give an acceptor association, not yet started, the event-driven reactors; True when
    swapped (a supported pynetdicom and stock classes), False when left as it is."""
    global _classes
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.utils import make_target

    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider:
        return False
    if assoc.dul.is_alive() or not _pynetdicom_supported():
        return False
    if _classes is None:
        _classes = _make_classes()
    quick_assoc, quick_dul = _classes
    dul: Any = assoc.dul
    dul._wake_lock = threading.Lock()
    dul._wake_r, dul._wake_w = os.pipe()
    os.set_blocking(dul._wake_w, False)
    dul.__class__ = quick_dul
    # the DUL thread's target was bound to the stock loop when the DUL was made
    dul._target = make_target(dul.run_reactor)
    assoc.__class__ = quick_assoc
    return True


__all__ = ["IDLE_WAIT_S", "SUPPORTED", "drop_log_handlers", "quicken"]
