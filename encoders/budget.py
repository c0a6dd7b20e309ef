"""A budget of decoded bytes: what reading a DICOM study may allocate, checked before it does.

A few hundred kilobytes of deflated or RLE-compressed DICOM can declare gigabytes of
pixels. The per-file caps of :mod:`encoders.dicom` bound one file; this module bounds a
whole *request* (every file of one study together) and the whole *process* (all
requests decoding at once):

    budget = DecodeBudget(per_request=1 << 30, per_process=1 << 30)
    with budget.request(received=sum(len(f) for f in files)):
        study = read_study(files)        # encoders.dicom charges as it goes

:func:`charge` is called by the read path (inflating a deflated dataset, allocating the
volume and the largest decoded file) *before* the allocation; outside a request it does
nothing (command-line ingest reads one study at a time). A charge is refused when

* the request's charges would exceed ``per_request`` (:class:`DecodeBudgetExceeded`,
  reason ``decode_budget``: this study is too large for this server);
* they would exceed ``max_expansion`` times the bytes received plus ``slack`` (reason
  ``decode_budget``: the upload expands like a decompression bomb, whatever each file
  says on its own);
* all requests together would exceed ``per_process`` (:class:`DecodeCapacityExhausted`,
  reason ``server_busy``, retryable: other studies are being decoded now).

Charges are kept until the request ends (a high-water mark: the read path holds what it
decoded until the study is built).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from encoders.errors import DicomError

DEFAULT_PER_REQUEST = 1 << 30  # 1 GiB: a 1000 x 512 x 512 CT as float32
DEFAULT_PER_PROCESS = 1 << 30
DEFAULT_MAX_EXPANSION = 64.0  # decoded bytes per byte received (deflated CT ~3x, lossy JPEG ~20x)
DEFAULT_SLACK = 16 << 20  # what a small upload may decode regardless of its ratio


class DecodeBudgetExceeded(DicomError):
    """The request would decode more than its budget allows (not retryable)."""

    retryable = False


class DecodeCapacityExhausted(DicomError):
    """Other requests hold the process's decode budget now (retryable later)."""

    retryable = True
    status = "RESOURCE_EXHAUSTED"  # the gRPC status of the one error table (CohortsimError)


@dataclass
class RequestBudget:
    """One request's account; :meth:`charge` before each allocation."""

    owner: DecodeBudget
    received: int
    charged: int = 0

    def charge(self, nbytes: int, what: str) -> None:
        self.owner._charge(self, int(max(0, nbytes)), what)


_CURRENT: ContextVar[RequestBudget | None] = ContextVar("cohortsim_decode_budget", default=None)


def current() -> RequestBudget | None:
    """The budget of the request being decoded on this thread (None: unbounded)."""
    return _CURRENT.get()


def charge(nbytes: int, what: str) -> None:
    """Charge ``nbytes`` about to be allocated for ``what`` to the current request."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.charge(nbytes, what)


def remaining() -> int | None:
    """Bytes the current request may still charge (None outside a request)."""
    budget = _CURRENT.get()
    if budget is None:
        return None
    return budget.owner.room(budget)


class DecodeBudget:
    """Decoded bytes per request and per process (module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        per_request: int = DEFAULT_PER_REQUEST,
        per_process: int = DEFAULT_PER_PROCESS,
        max_expansion: float = DEFAULT_MAX_EXPANSION,
        slack: int = DEFAULT_SLACK,
    ) -> None:
        if per_request < 1 or per_process < 1:
            raise ValueError("decode budgets must be >= 1 byte")
        if max_expansion <= 0:
            raise ValueError(f"max_expansion must be > 0, got {max_expansion}")
        self.per_request = int(per_request)
        self.per_process = int(per_process)
        self.max_expansion = float(max_expansion)
        self.slack = int(slack)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Bytes charged by the requests in progress."""
        return self._used

    def room(self, req: RequestBudget) -> int:
        """What ``req`` may still charge under all three limits."""
        own = min(self.per_request, int(req.received * self.max_expansion) + self.slack)
        with self._lock:
            return max(0, min(own - req.charged, self.per_process - self._used))

    @contextlib.contextmanager
    def request(self, *, received: int) -> Iterator[RequestBudget]:
        """The account of one request of ``received`` bytes, current on this thread."""
        req = RequestBudget(self, int(received))
        token = _CURRENT.set(req)
        try:
            yield req
        finally:
            _CURRENT.reset(token)
            with self._lock:
                self._used -= req.charged

    def _charge(self, req: RequestBudget, nbytes: int, what: str) -> None:
        mib = 1 << 20
        total = req.charged + nbytes
        if total > self.per_request:
            raise DecodeBudgetExceeded(
                "decode_budget",
                f"decoding this study needs more than {self.per_request // mib} MiB ({what}); "
                "send fewer or smaller images, or an embedding",
            )
        if total > req.received * self.max_expansion + self.slack:
            raise DecodeBudgetExceeded(
                "decode_budget",
                f"the upload of {req.received} bytes would decode to more than "
                f"{self.max_expansion:g} times its size ({what}): a decompression bomb, or a "
                "header that lies about the image; refused before decoding",
            )
        with self._lock:
            if self._used + nbytes > self.per_process:
                raise DecodeCapacityExhausted(
                    "server_busy",
                    "the server is decoding other DICOM studies and has no memory budget left "
                    "for this one; retry in a few seconds",
                )
            self._used += nbytes
            req.charged = total


__all__ = [
    "DEFAULT_MAX_EXPANSION",
    "DEFAULT_PER_PROCESS",
    "DEFAULT_PER_REQUEST",
    "DecodeBudget",
    "DecodeBudgetExceeded",
    "DecodeCapacityExhausted",
    "RequestBudget",
    "charge",
    "current",
    "remaining",
]
