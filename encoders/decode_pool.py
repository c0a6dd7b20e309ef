"""DICOM decoding in worker processes: what a hostile upload costs stays in its worker.

Reading a study (:func:`encoders.dicom.read_study`) and building the encoder's input
(:func:`encoders.preprocess.preprocess`, :func:`encoders.grid.study_input`) is CPU-bound
Python and numpy that holds the interpreter lock for long stretches. In a server it
competes with every other call for the lock and the cores, and a study that slips past
the decoded-byte budget (:mod:`encoders.budget`) allocates in the server's own memory.
A :class:`DecodePool` runs that work in a few long-lived worker processes instead::

    pool = DecodePool(workers=2, memory_mb=2048, nice=10)
    prepared = pool.prepare(files, card.input, patches=False, priority=0)  # blocking
    pool.close()

* Workers run at a lower CPU priority than the server (``os.nice``), so searches and the
  event loop get the cores first; they have no share in the server's interpreter lock.
* Each worker's address space is capped (``RLIMIT_AS``: what its imports took plus
  ``memory_mb``). A study that needs more ends only that worker: the caller gets
  :class:`DecodeWorkerLost` (RESOURCE_EXHAUSTED ``decode_memory``) and pebble starts a
  fresh worker. A decode running past ``timeout_s`` is ended the same way
  (``decode_timeout``).
* The decoded-byte budget is enforced in the worker, per request. A worker decodes one
  request at a time, so all decoding together holds at most ``workers`` x the
  per-request budget (and each worker its address-space cap).
* When every worker is busy, a waiting call with a lower ``priority`` number is served
  first (the server gives clinicians 0, researchers' uploads 1); equal priorities in
  arrival order.
* Workers are started with ``spawn`` (a fresh interpreter: no copy of the server's
  threads, sockets or torch state), at the first :meth:`DecodePool.prepare` or by
  :meth:`DecodePool.start`, and ended by :meth:`DecodePool.close`.

:func:`prepare_study` is the same work in the calling process (servers configured with no
workers, command-line tools, tests).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from encoders.budget import (
    DEFAULT_MAX_EXPANSION,
    DEFAULT_PER_PROCESS,
    DEFAULT_PER_REQUEST,
    DEFAULT_SLACK,
    DecodeBudget,
    DecodeBudgetExceeded,
)

if TYPE_CHECKING:  # numpy is imported in the worker only after its thread settings
    import numpy as np

    from encoders.spec import InputSpec

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
DEFAULT_MEMORY_MB = 2048  # address space a worker may add to its imports: 1 GiB budget + copies
DEFAULT_NICE = 10  # added to the server's niceness
DEFAULT_TIMEOUT_S = 300.0  # a real CT with lesion proposals takes ~40 s on a busy 2-core VM
_MEMORY_EXIT = 86  # exit status of a worker that ran out of its address space


class DecodeWorkerLost(DecodeBudgetExceeded):
    """The study's decode ended its worker (memory cap, timeout or a crash); the server
    goes on with a fresh worker. Not retryable: the same study would do it again."""

    status = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class PreparedStudy:
    """What the encoder needs from one decoded study (small: never the study's volume).

    ``context``: ``(D, H, W)`` the encoder's input volume (whole-volume encoders) or the
    whole-study context grid; ``patches``: ``(n, pd, ph, pw)`` the detail patches to embed
    (lesion encoders on a whole-study grid: one per reader region, or the top proposal),
    else None; ``shape`` / ``spacing``: the study's own voxel grid ``(D, H, W)`` and its
    spacing in mm, for mapping query regions; ``patch_source``: what the first patch is
    (``"reader"``, ``"proposal"`` or ``"centre"`` when no lesion was proposed), the label
    of its embedded region, as an index build labels a stored patch's.
    """

    context: np.ndarray
    patches: np.ndarray | None
    acquisition: dict[str, str]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    patch_source: str | None = None


def prepare_study(
    files: Sequence[bytes],
    spec: InputSpec,
    *,
    patches: bool = False,
    regions: Sequence[Sequence[float]] = (),
    proposal: Any = None,
) -> PreparedStudy:
    """Decode one study's DICOM ``files`` and build the encoder's input; blocking.

    ``patches``: the encoder embeds detail patches of a whole-study grid (one per region
    in ``regions``, boxes ``(z0, y0, x0, z1, y1, x1)`` on the study's voxel grid, or the
    top ``proposal`` when there is none); else the whole preprocessed volume. Raises
    :class:`encoders.errors.DicomError` for a study that cannot be used (and the budget's
    errors inside a :meth:`encoders.budget.DecodeBudget.request`).
    """
    from encoders.dicom import read_study
    from encoders.preprocess import preprocess

    study = read_study(list(files))
    stack = None
    source = None
    if patches:
        from encoders.grid import study_input

        # a box outside the study raises DicomError("bad_region")
        si = study_input(study, spec, regions=[list(r) for r in regions],
                         proposals=not regions, proposal=proposal)
        if regions:
            k = sum(p.source == "reader" for p in si.patch_info)  # at most spec.max_patches
            stack = si.patches[:k]
            source = "reader"
        else:
            top = si.primary("proposals")
            stack = si.patches[top][None]
            source = si.patch_info[top].source
        context = si.context
    else:
        context = preprocess(study, spec)
    acquisition = {str(k): str(v) for k, v in (study.acquisition or {}).items() if v is not None}
    shape = tuple(int(n) for n in study.volume.shape)
    spacing = tuple(float(s) for s in study.spacing)
    return PreparedStudy(context, stack, acquisition, shape, spacing, source)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- worker side


def _address_space() -> int:
    """This process's mapped address space in bytes (``VmSize``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _init_worker(memory_mb: int, nice: int) -> None:
    """Worker start: one thread per native pool, lower CPU priority, the read path
    imported, then the address space capped at what the imports took + ``memory_mb``."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # one request per worker: parallelism comes from workers
    if nice > 0:
        os.nice(nice)
    import numpy  # noqa: F401  (imported here, after the thread settings)
    import pydicom.pixels  # noqa: F401  (the pixel decoders)

    import encoders.dicom
    import encoders.grid
    import encoders.roi  # noqa: F401

    if memory_mb > 0:
        import resource

        cap = _address_space() + (int(memory_mb) << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _ready() -> bool:
    return True


def _prepare_in_worker(
    files: Sequence[bytes],
    spec: InputSpec,
    patches: bool,
    regions: Sequence[Sequence[float]],
    proposal: Any,
    limits: dict[str, Any],
) -> PreparedStudy:
    """:func:`prepare_study` under the request's decoded-byte budget; a worker that runs
    out of its address space exits (its heap may be left fragmented)."""
    budget = DecodeBudget(**limits)
    try:
        with budget.request(received=sum(len(f) for f in files)):
            return prepare_study(files, spec, patches=patches, regions=regions, proposal=proposal)
    except Exception as exc:
        if _out_of_memory(exc):  # also when the read path wrapped it ("damaged file")
            os._exit(_MEMORY_EXIT)
        raise


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a MemoryError."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# ---------------------------------------------------------------------------- server side


class _PriorityGate:
    """``slots`` holders at once; waiters served by (priority, arrival)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, priority: int) -> Iterator[None]:
        ticket = (int(priority), next(self._seq))
        with self._cond:
            heapq.heappush(self._waiting, ticket)
            while self._free == 0 or self._waiting[0] != ticket:
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._free -= 1
            self._cond.notify_all()  # the next in line may find a slot too
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


class DecodePool:
    """Decode DICOM studies in ``workers`` worker processes (module docstring).

    ``memory_mb``: address space each worker may add to its imports (0: no cap);
    ``nice``: added to the workers' niceness; ``timeout_s``: a decode running longer is
    ended with its worker (None: never); ``budget``: the decoded-byte budget whose
    per-request limits each worker enforces (default :class:`DecodeBudget`'s). Thread-safe.
    """

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        *,
        memory_mb: int = DEFAULT_MEMORY_MB,
        nice: int = DEFAULT_NICE,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        budget: DecodeBudget | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs >= 1 worker, got {workers}")
        if memory_mb < 0 or nice < 0:
            raise ValueError("memory_mb and nice must be >= 0")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {timeout_s}")
        self.workers = int(workers)
        self.memory_mb = int(memory_mb)
        self.nice = int(nice)
        self.timeout_s = timeout_s
        b = budget or DecodeBudget(per_request=DEFAULT_PER_REQUEST, per_process=DEFAULT_PER_PROCESS,
                                   max_expansion=DEFAULT_MAX_EXPANSION, slack=DEFAULT_SLACK)
        self.limits = {"per_request": b.per_request, "per_process": b.per_process,
                       "max_expansion": b.max_expansion, "slack": b.slack}
        self.lost = 0  # workers ended by a study (memory, timeout, crash)
        self._gate = _PriorityGate(self.workers)
        self._lock = threading.Lock()
        self._pool: Any = None
        self._closed = False

    def start(self, wait_s: float = 60.0) -> None:
        """Start the workers now (else at the first :meth:`prepare`) and wait up to
        ``wait_s`` for their processes to exist."""
        pool = self._get_pool()
        end = time.monotonic() + wait_s
        with contextlib.suppress(Exception):  # pebble starts its workers with the first task
            pool.schedule(_ready).result(timeout=wait_s)
        while not self._closed and len(self.pids()) < self.workers and time.monotonic() < end:
            time.sleep(0.05)

    def _get_pool(self) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            if self._pool is None:
                import multiprocessing

                from pebble import ProcessPool

                self._pool = ProcessPool(
                    max_workers=self.workers,
                    initializer=_init_worker,
                    initargs=(self.memory_mb, self.nice),
                    context=multiprocessing.get_context("spawn"),
                )
                log.info("DICOM decode workers: %d (nice +%d, %s)", self.workers, self.nice,
                         f"{self.memory_mb} MiB address space each" if self.memory_mb else "no cap")
            return self._pool

    def pids(self) -> list[int]:
        """Process ids of the running workers (for tests and metrics)."""
        pool = self._pool
        if pool is None:
            return []
        return [w.pid for w in list(pool._pool_manager.worker_manager.workers.values())
                if w.pid is not None]

    def prepare(
        self,
        files: Sequence[bytes],
        spec: InputSpec,
        *,
        patches: bool = False,
        regions: Sequence[Sequence[float]] = (),
        proposal: Any = None,
        priority: int = 1,
    ) -> PreparedStudy:
        """:func:`prepare_study` in a worker; blocking. Raises what it raises, the budget's
        errors, or :class:`DecodeWorkerLost` when the study ended its worker."""
        from pebble import ProcessExpired

        pool = self._get_pool()
        with self._gate.slot(priority):
            future = pool.schedule(
                _prepare_in_worker,
                args=(list(files), spec, patches, [list(r) for r in regions], proposal,
                      self.limits),
                timeout=self.timeout_s,
            )
            try:
                result: PreparedStudy = future.result()
            except ProcessExpired as exc:
                self.lost += 1
                if exc.exitcode == _MEMORY_EXIT or exc.exitcode == -9:
                    raise DecodeWorkerLost(
                        "decode_memory",
                        f"decoding this study needs more than the {self.memory_mb} MiB a "
                        "decode worker may use; send fewer or smaller images, or an embedding",
                    ) from None
                raise DecodeWorkerLost(
                    "decode_crashed",
                    "decoding this study ended its decode worker; the study cannot be read "
                    "by this server (send an embedding)",
                ) from None
            except TimeoutError:
                self.lost += 1
                raise DecodeWorkerLost(
                    "decode_timeout",
                    f"decoding this study took longer than {self.timeout_s:g} s and was "
                    "stopped; send fewer or smaller images, or an embedding",
                ) from None
            return result

    def close(self) -> None:
        """End the workers (decodes in progress fail); idempotent."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)


__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_NICE",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WORKERS",
    "DecodePool",
    "DecodeWorkerLost",
    "PreparedStudy",
    "prepare_study",
]
