"""Storage chaos kit: kill -9 at random points, injected I/O faults, corruption.

Shared by ``tests/indexing/test_crash_kill9.py``, ``test_io_faults.py``,
``test_corruption.py`` (short runs) and ``benchmarks/chaos_storage.py`` (long runs).

*Acknowledged* (what must never be lost):
- a study is acknowledged once :meth:`CohortStore.add_studies` has returned for the batch
  that held it (the store's commit: part file renamed into place, folder fsynced). The
  ingest report counts only such studies, and the gRPC ``IngestStudies`` answer is sent
  after ``ingest_folder`` returns, so every study a client was told about is acknowledged.
  Here the child process appends a batch's study pseudonyms to ``acks/studies`` right
  after ``add_studies`` returns.
- an index version is acknowledged once ``build_from_store`` has returned its id (``CURRENT``
  was replaced and its folder fsynced before that); the child appends it to
  ``acks/versions``.

Kill -9 runs fork a child from the calling process (:class:`ForkRunner`: imports and
caches are shared; the child uses one OpenMP / torch thread, so forking is safe) and
kill it either at a chosen I/O operation (the N-th write, fsync, rename, link, mkdir or
file creation under the work folder, counted by :class:`FaultPlan`) or after a random
delay. A kill -9 keeps what reached the page cache, so these runs check atomicity and
ordering as seen by the next process, not durability across power loss.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef-chaos-storage"
SPEC_SHAPE = (4, 32, 32)
WRITE_MODES = set("wax+")
HANG_S = 120.0  # a child still running after this is killed and counted as a failure


# ------------------------------------------------------------------ fault plan
class FaultPlan:
    """Counts storage operations on paths under ``root`` and acts at the ``at``-th one.

    Operations: ``create`` (opening a file for writing), ``write`` (each write call on such
    a file, and each ``os.sendfile`` into one), ``fsync``, ``rename`` (``os.replace`` /
    ``os.rename``), ``link``, ``mkdir``. ``action(kind, path)`` runs *instead of* the
    ``at``-th operation (raise an OSError to inject a fault, or kill the process).
    ``ops`` records every operation seen, in order. ``sticky``: the action also runs for
    every later operation (a disk that stays full, a sector that stays bad), so a retry
    inside a library (shutil falls back from sendfile to read/write) fails too.
    """

    def __init__(
        self,
        root: Path,
        *,
        at: int | None = None,
        action: Callable[[str, str], None] | None = None,
        sticky: bool = False,
    ) -> None:
        self.root = str(Path(root).resolve())
        self.at = at
        self.action = action
        self.sticky = sticky
        self.ops: list[tuple[str, str]] = []
        self.fired: tuple[str, str] | None = None

    def covers(self, path: Any) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False
        return p == self.root or p.startswith(self.root + os.sep)

    def tick(self, kind: str, path: Any) -> None:
        self.ops.append((kind, os.fsdecode(path)))
        if self.at is None or self.action is None:
            return
        if len(self.ops) == self.at or (self.sticky and self.fired is not None):
            self.fired = self.fired or self.ops[-1]
            self.action(kind, os.fsdecode(path))

    def __enter__(self) -> FaultPlan:
        self._ctx = self.installed()
        return self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(None, None, None)

    @contextlib.contextmanager
    def installed(self) -> Iterator[FaultPlan]:
        """Patch ``open`` and the ``os`` calls above for the duration of the block."""
        real = {
            name: getattr(os, name)
            for name in ("fsync", "replace", "rename", "link", "mkdir", "sendfile")
        }
        real_open = builtins.open
        plan = self

        def fd_path(fd: int) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, int) or not (set(mode) & WRITE_MODES) or not plan.covers(file):
                return real_open(file, mode, *args, **kwargs)
            plan.tick("create", file)
            return _FaultyFile(real_open(file, mode, *args, **kwargs), plan, os.fsdecode(file))

        def fsync(fd: int) -> None:
            path = fd_path(fd)
            if plan.covers(path):
                plan.tick("fsync", path)
            real["fsync"](fd)

        def two(name: str) -> Callable[..., Any]:
            def call(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
                if plan.covers(dst):
                    plan.tick("rename" if name in ("replace", "rename") else name, dst)
                return real[name](src, dst, *a, **kw)

            return call

        def mkdir(path: Any, *a: Any, **kw: Any) -> None:
            if plan.covers(path) and not os.path.lexists(path):  # else EEXIST comes first
                plan.tick("mkdir", path)
            real["mkdir"](path, *a, **kw)

        def sendfile(out_fd: int, in_fd: int, *a: Any, **kw: Any) -> int:
            path = fd_path(out_fd)
            if plan.covers(path):
                plan.tick("write", path)
            return int(real["sendfile"](out_fd, in_fd, *a, **kw))

        patches = {
            "fsync": fsync,
            "replace": two("replace"),
            "rename": two("rename"),
            "link": two("link"),
            "mkdir": mkdir,
            "sendfile": sendfile,
        }
        for name, fn in patches.items():
            setattr(os, name, fn)
        builtins.open = fake_open
        try:
            yield self
        finally:
            builtins.open = real_open
            for name, fn in real.items():
                setattr(os, name, fn)


class _FaultyFile:
    """A writable file whose writes are counted by a :class:`FaultPlan` (not an io class,
    so numpy and pyarrow write through :meth:`write` rather than the file descriptor)."""

    def __init__(self, fh: Any, plan: FaultPlan, path: str) -> None:
        self._fh = fh
        self._plan = plan
        self._path = path

    def write(self, data: Any) -> int:
        self._plan.tick("write", self._path)
        return int(self._fh.write(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fh)


def raise_oserror(code: int) -> Callable[[str, str], None]:
    """An action raising ``OSError(code)`` on the path, as the kernel would."""

    def action(kind: str, path: str) -> None:
        raise OSError(code, os.strerror(code), path)

    return action


def interesting_points(ops: list[tuple[str, str]]) -> list[int]:
    """1-based op numbers worth a fault: every non-write op, and the first and last write
    of each file (a full sweep tries every op; these cover each distinct step)."""
    points: set[int] = set()
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, (kind, path) in enumerate(ops, start=1):
        if kind != "write":
            points.add(i)
        else:
            first.setdefault(path, i)
            last[path] = i
    return sorted(points | set(first.values()) | set(last.values()))


# ------------------------------------------------------------------ workload
@dataclass
class Workload:
    """A small fixed workload: a synthetic DICOM folder (two halves), an encoder, and the
    reference embedding of every study (from an uninterrupted build)."""

    root: Path
    patients: int = 6
    reference: dict[str, list[float]] = field(default_factory=dict)

    @property
    def dicom(self) -> Path:
        return self.root / "dicom"

    @property
    def first_half(self) -> Path:
        return self.root / "dicom-first"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def prepare(self, *, seed: int = 5) -> Workload:
        """Write the DICOM folder and the encoder (the reference vectors are made by the
        :class:`ForkRunner`, or :meth:`make_reference`)."""
        import shutil

        from encoders.model import EncoderCard, create_encoder, save_encoder
        from encoders.spec import InputSpec
        from encoders.synth import synth_cohort

        synth_cohort(self.root / "synth", patients=self.patients, seed=seed)
        if not self.dicom.exists():
            os.symlink(self.root / "synth" / "dicom", self.dicom)
        self.first_half.mkdir(exist_ok=True)
        studies = sorted(p for p in self.dicom.iterdir() if p.is_dir())
        for p in studies[: len(studies) // 2]:
            if not (self.first_half / p.name).exists():
                shutil.copytree(p, self.first_half / p.name, copy_function=os.link)
        spec = InputSpec(shape=SPEC_SHAPE)
        encoder = create_encoder("test_resnet", spec=spec, embedding_dim=8)
        save_encoder(encoder, EncoderCard.for_encoder(encoder, seed=0), self.model)
        return self

    def make_reference(self) -> None:
        """Ingest and build everything once, uninterrupted: each study's reference vector."""
        import numpy as np

        from indexing.snapshot import load_snapshot

        ref = self.root / "reference"
        if not (ref / "index").exists():
            run_ingest(self.dicom, ref / "store", None)
            run_build(ref / "store", self.model, ref / "index", None)
        snap = load_snapshot(ref / "index", device="cpu")
        vectors = np.asarray(snap.vectors, dtype=np.float32)
        uids = snap.metadata.column("study_uid").to_pylist()
        self.reference = {u: vectors[i].tolist() for i, u in enumerate(uids)}
        (self.root / "reference.json").write_text(json.dumps(self.reference))

    @classmethod
    def load(cls, root: Path) -> Workload:
        w = cls(Path(root))
        path = w.root / "reference.json"
        if path.exists():
            w.reference = json.loads(path.read_text())
        return w


def run_ingest(folder: Path, store_dir: Path, acks: Path | None, *, batch_size: int = 2) -> int:
    """Ingest ``folder`` into ``store_dir`` (in this process); acknowledged batches go to
    ``acks/studies``. Returns the number of studies added."""
    from encoders.deid import Pseudonymizer
    from encoders.spec import InputSpec
    from indexing.ingest import ingest_folder
    from indexing.store import CohortStore

    class AckingStore(CohortStore):
        def add_studies(self, records: Any) -> int:
            added = super().add_studies(records)
            if acks is not None:
                withdrawn = self.deleted_patients()
                _append(acks / "studies", [r.study_uid for r in records if r.patient_id not in withdrawn])
            return added

    store = AckingStore(store_dir, create=True)
    report = ingest_folder(
        folder,
        store,
        pseudonymizer=Pseudonymizer(SECRET),
        spec=InputSpec(shape=SPEC_SHAPE),
        workers=1,
        batch_size=batch_size,
    )
    return report.studies_ingested


def run_build(store_dir: Path, model: Path, index_dir: Path, acks: Path | None) -> str:
    """``build_from_store`` (checkpointed shards of 2); the version goes to ``acks/versions``."""
    from indexing.build import build_from_store

    version = build_from_store(store_dir, model, index_dir, device="cpu", shard_size=2, batch_size=2)
    if acks is not None:
        _append(acks / "versions", [version])
    return version


def _append(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
        fh.flush()


def read_acks(acks: Path, name: str) -> list[str]:
    path = acks / name
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line]


# ------------------------------------------------------------------ invariants
def check_invariants(data: Path, acks: Path, reference: dict[str, list[float]]) -> list[str]:
    """Problems with ``data/store`` and ``data/index`` after a crash (empty: all good).

    - every store part file verifies (its sha256) and reads; no study is stored twice;
      every acknowledged study is there;
    - ``CURRENT`` names a published version at least as new as the last acknowledged one
      (or nothing, when none was acknowledged and none published); every published
      version verifies; the served one loads and row i's vector is its study's vector.
    """
    import numpy as np

    from indexing.errors import SnapshotError, StoreError
    from indexing.snapshot import (
        MANIFEST_FILE,
        VERSIONS_DIR,
        current_version,
        list_versions,
        load_snapshot,
        read_manifest,
        verify_snapshot,
    )
    from indexing.store import CohortStore

    problems: list[str] = []
    store_dir, index_dir = data / "store", data / "index"
    acked = read_acks(acks, "studies")
    if (store_dir / "studies").is_dir():
        try:
            uids = CohortStore(store_dir).studies(["study_uid"]).column("study_uid").to_pylist()
        except StoreError as exc:
            return [f"store unreadable: {exc}"]
        if len(uids) != len(set(uids)):
            problems.append(f"store holds {len(uids) - len(set(uids))} duplicate studies")
        lost = set(acked) - set(uids)
        if lost:
            problems.append(f"{len(lost)} acknowledged studies lost")
    elif acked:
        problems.append("store folder missing but studies were acknowledged")
    versions = read_acks(acks, "versions")
    current = current_version(index_dir) if index_dir.exists() else None
    published = list_versions(index_dir) if index_dir.exists() else []
    for v in published:
        try:
            verify_snapshot(index_dir / VERSIONS_DIR / v, read_manifest(index_dir, v))
        except SnapshotError as exc:
            problems.append(f"published version {v} does not verify: {exc}")
    if versions and (current is None or current < versions[-1]):
        problems.append(f"CURRENT is {current}, older than acknowledged {versions[-1]}")
    if current is not None:
        if current not in published or not (index_dir / VERSIONS_DIR / current / MANIFEST_FILE).exists():
            problems.append(f"CURRENT names {current}, which is not a complete version")
        else:
            try:
                snap = load_snapshot(index_dir, device="cpu")
            except SnapshotError as exc:
                return [*problems, f"served version does not load: {exc}"]
            vecs = np.asarray(snap.vectors, dtype=np.float32)
            for row, uid in enumerate(snap.metadata.column("study_uid").to_pylist()):
                want = reference.get(uid)
                if want is None or not np.allclose(vecs[row], want, atol=1e-4):
                    problems.append(f"served row {row} does not hold its study's vector")
                    break
    return problems


# ------------------------------------------------------------------ kill -9 harness
def _child(op: str, work: Path, workload: Workload, kill_at: int | None) -> None:
    """Body of a forked child: run ``op`` under a counting plan; report the op count."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import faiss
    import torch

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    faiss.omp_set_num_threads(1)

    def die(kind: str, path: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    data = work / "data"
    plan = FaultPlan(data, at=kill_at, action=die)
    with plan.installed():
        if op == "ingest-first":
            run_ingest(workload.first_half, data / "store", work / "acks")
        elif op == "ingest-all":
            run_ingest(workload.dicom, data / "store", work / "acks")
        elif op == "build":
            run_build(data / "store", workload.model, data / "index", work / "acks")
        else:
            raise ValueError(op)
    (work / "ops").write_text(str(len(plan.ops)))


def run_job(
    op: str, work: Path, workload: Workload, kill: tuple[str, float] | list[Any] | None
) -> dict[str, Any]:
    """Fork a child running ``op`` on ``work``; ``kill`` is ``("op", n)`` (the child kills
    itself just before its n-th storage operation), ``("delay", seconds)`` (killed then)
    or None. Returns ``{"status": "killed"|"done"|"failed", "ops": n, "seconds": s}``."""
    for name in ("ops", "error"):
        (work / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            _child(op, work, workload, int(kill[1]) if kill and kill[0] == "op" else None)
        except BaseException:
            import traceback

            (work / "error").write_text(traceback.format_exc())
            code = 3
        os._exit(code)
    status = None
    delay = float(kill[1]) if kill and kill[0] == "delay" else None
    deadline = time.perf_counter() + (delay if delay is not None else HANG_S)
    while time.perf_counter() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.002)
    hung = False
    if status is None:
        os.kill(pid, signal.SIGKILL)
        hung = delay is None
        _, status = os.waitpid(pid, 0)
    if hung:
        result = "failed"
        (work / "error").write_text(f"the child hung for {HANG_S} s (killed)")
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        result = "killed"
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        result = "done"
    else:
        result = "failed"
    ops_file = work / "ops"
    ops = int(ops_file.read_text()) if ops_file.exists() else -1
    answer: dict[str, Any] = {"status": result, "ops": ops, "seconds": time.perf_counter() - t0}
    if result == "failed" and (work / "error").exists():
        answer["error"] = (work / "error").read_text()[-2000:]
    return answer


class ForkRunner:
    """Runs jobs by forking this process (imports and warm caches are shared).

    Use as a context manager: on entry DICOM reading is memoized (it is not storage, so
    children spend their time in the store and the index) and the reference vectors are
    made; on exit the memoization is undone. Children run with one OpenMP / torch thread.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._undo: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> ForkRunner:
        import tempfile

        self._undo = _memoize_dicom_reading()
        self.workload.make_reference()
        with tempfile.TemporaryDirectory() as warm:  # the first half's files are copies
            run_ingest(self.workload.first_half, Path(warm) / "store", None)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, real in self._undo:
            setattr(module, name, real)

    def job(self, op: str, work: Path, *, kill: tuple[str, float] | None = None) -> dict[str, Any]:
        return run_job(op, work, self.workload, kill)


def _memoize_dicom_reading() -> list[tuple[Any, str, Any]]:
    """Reading DICOM, loading the encoder and running it are not storage: children reuse
    the parent's results (header scan, study preparation, encoder, embeddings of a given
    batch of volumes), so their time goes to the store and the index. Returns what to
    restore."""
    import hashlib

    import indexing.build as build
    import indexing.ingest as ingest

    def by_repr(args: tuple[Any, ...], kw: dict[str, Any]) -> str:
        return repr((args, sorted(kw.items())))

    def by_volumes(args: tuple[Any, ...], kw: dict[str, Any]) -> str:
        volumes = args[1]
        digest = hashlib.sha256(volumes.tobytes()).hexdigest()
        return f"{id(args[0])}:{volumes.shape}:{digest}:{sorted(kw.items())}"

    undo = []
    for module, name, key_of in (
        (ingest, "_prepare_study", by_repr),
        (ingest, "_scan_chunk", by_repr),
        (build, "load_encoder", by_repr),
        (build, "embed", by_volumes),
    ):
        real = getattr(module, name)
        cache: dict[str, Any] = {}

        def memo(
            *args: Any, _real: Any = real, _cache: dict[str, Any] = cache, _key: Any = key_of, **kw: Any
        ) -> Any:
            key = _key(args, kw)
            if key not in _cache:
                _cache[key] = _real(*args, **kw)
            return _cache[key]

        setattr(module, name, memo)
        undo.append((module, name, real))
    return undo


# ------------------------------------------------------------------ kill campaign
@dataclass
class KillStats:
    iterations: int = 0  # child runs
    killed: int = 0  # runs ended by SIGKILL before they finished
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    episodes: int = 0


PHASES = ("ingest-first", "build", "ingest-all", "build")


def kill_campaign(
    helper: ForkRunner,
    workload: Workload,
    base: Path,
    *,
    kills: int,
    seed: int = 0,
    op_counts: dict[str, int],
    durations: dict[str, float],
) -> KillStats:
    """Run episodes of ``PHASES`` (ingest half, build, ingest all, build) until ``kills``
    child runs have been killed. Each run is aimed at a random point of its stage's
    uninterrupted run (:func:`measure`): just before storage operation n, n uniform in
    1..ops (half the runs), or after a delay uniform in 0..its duration. A resumed run has
    less left to do, so it may finish before the point: a stage repeats until one run of
    it completes. The invariants are checked after every run; an episode ends with every
    study stored once and served.
    """
    rng = random.Random(seed)
    stats = KillStats()
    while stats.killed < kills:
        stats.episodes += 1
        work = base / f"episode-{stats.episodes:05d}"
        (work / "data").mkdir(parents=True)
        for stage, phase in enumerate(PHASES):
            key = f"{stage}:{phase}"
            while True:
                kill: tuple[str, float]
                if rng.random() < 0.5:
                    kill = ("op", rng.randint(1, max(op_counts[key], 1)))
                else:
                    kill = ("delay", rng.uniform(0.0, durations[key]))
                answer = helper.job(phase, work, kill=kill)
                stats.iterations += 1
                if answer["status"] == "failed":
                    stats.failures.append(
                        f"episode {stats.episodes} {phase}: child failed: {answer.get('error', '')}"
                    )
                    return stats
                problems = check_invariants(work / "data", work / "acks", workload.reference)
                if problems:
                    stats.failures.append(f"episode {stats.episodes} {phase} {kill}: {problems}")
                    return stats
                if answer["status"] == "done":
                    stats.completed += 1
                    break
                stats.killed += 1
        final = _final_problems(work, workload)
        if final:
            stats.failures.append(f"episode {stats.episodes} end: {final}")
            return stats
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return stats


def _final_problems(work: Path, workload: Workload) -> list[str]:
    from indexing.snapshot import load_snapshot
    from indexing.store import CohortStore

    uids = CohortStore(work / "data" / "store").studies(["study_uid"]).column("study_uid").to_pylist()
    snap = load_snapshot(work / "data" / "index", device="cpu")
    served = snap.metadata.column("study_uid").to_pylist()
    problems = []
    if sorted(uids) != sorted(workload.reference):
        problems.append(f"store holds {len(uids)} studies, expected {len(workload.reference)}")
    if sorted(served) != sorted(workload.reference):
        problems.append(f"served version holds {len(served)} studies after the last build")
    if (work / "data" / "index" / ".build").exists():
        problems.append("build checkpoints left after a completed build")
    return problems


def measure(helper: ForkRunner, base: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Storage-op counts and durations of an uninterrupted run of each stage of
    ``PHASES`` (keys ``"<stage>:<phase>"``), to aim the kills."""
    work = base / "measure"
    (work / "data").mkdir(parents=True)
    ops: dict[str, int] = {}
    secs: dict[str, float] = {}
    for stage, phase in enumerate(PHASES):
        answer = helper.job(phase, work)
        if answer["status"] != "done":
            raise RuntimeError(f"uninterrupted {phase} did not finish: {answer}")
        ops[f"{stage}:{phase}"] = int(answer["ops"])
        secs[f"{stage}:{phase}"] = float(answer["seconds"])
    return ops, secs


# ------------------------------------------------------------------ corruption
def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of ``path`` at byte ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float) -> None:
    """Cut ``path`` to ``keep`` (0..1) of its size (at least one byte shorter)."""
    size = path.stat().st_size
    os.truncate(path, min(size - 1, int(size * keep)))


def corruption_offsets(size: int, count: int) -> list[int]:
    """``count`` byte offsets spread over a file of ``size`` bytes: first, last, between."""
    if size <= 0:
        return []
    picks = {0, size - 1} | {size * i // max(count - 1, 1) for i in range(count)}
    return sorted(o for o in picks if 0 <= o < size)[: max(count, 2)]


ENOSPC, EIO = errno.ENOSPC, errno.EIO


# ------------------------------------------------------------------ I/O fault sweep
@dataclass
class FaultStats:
    runs: int = 0
    typed_errors: int = 0
    published_anyway: int = 0  # the fault hit the last fsync, after CURRENT moved
    failures: list[str] = field(default_factory=list)
    points: int = 0


def _fresh(template: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(template, dst, symlinks=True)
    return dst


def fault_sweep(
    op: str,
    workload: Workload,
    base: Path,
    *,
    errnos: tuple[int, ...] = (ENOSPC, EIO),
    points: str = "interesting",
    limit: int | None = None,
    alternate: bool = False,
) -> FaultStats:
    """Inject each errno at the N-th storage operation of ``op`` ("ingest": the second half
    of the studies into a store holding the first; "build": a rebuild over the whole
    store while version 1 of the first half is served), for N over the interesting points
    (or "all"); ``limit`` keeps that many of them, evenly spread; ``alternate`` tries one
    errno per point, in turn, instead of each errno at every point. After each fault: a typed error naming the reason and the path, the
    previous store / served version intact and loadable, nothing half-published left;
    then the same command without faults finishes the work. Call inside
    :class:`ForkRunner` (DICOM reading and embedding memoized)."""
    from indexing.errors import SnapshotWriteError, StoreWriteError
    from indexing.snapshot import VERSIONS_DIR, current_version

    template = base / "template"
    if not template.exists():
        (template / "acks").mkdir(parents=True)
        data = template / "data"
        run_ingest(workload.first_half, data / "store", template / "acks")
        run_build(data / "store", workload.model, data / "index", template / "acks")
        if op == "build":
            run_ingest(workload.dicom, data / "store", template / "acks")
    v1 = current_version(template / "data" / "index")

    def do(work: Path) -> None:
        if op == "ingest":
            run_ingest(workload.dicom, work / "data" / "store", work / "acks")
        else:
            run_build(work / "data" / "store", workload.model, work / "data" / "index", work / "acks")

    work = _fresh(template, base / "dry")
    with FaultPlan(work / "data") as plan:
        do(work)
    ops = plan.ops
    picks = interesting_points(ops) if points == "interesting" else list(range(1, len(ops) + 1))
    if limit is not None and len(picks) > limit:
        picks = [picks[i * len(picks) // limit] for i in range(limit)]
    stats = FaultStats(points=len(picks))
    trials = (
        [(errnos[i % len(errnos)], n) for i, n in enumerate(picks)]
        if alternate
        else [(code, n) for code in errnos for n in picks]
    )
    for code, n in trials:
        work = _fresh(template, base / "run")
        stats.runs += 1
        where = f"{op} {os.strerror(code)} at op {n}/{len(ops)} {ops[n - 1][0]}"
        with FaultPlan(work / "data", at=n, action=raise_oserror(code), sticky=True) as plan:
            try:
                do(work)
                raised: BaseException | None = None
            except BaseException as exc:  # judged below
                raised = exc
        if plan.fired is None:
            stats.failures.append(f"{where}: the operation was not reached")
            continue
        if not isinstance(raised, StoreWriteError | SnapshotWriteError):
            stats.failures.append(f"{where}: raised {type(raised).__name__}: {raised}")
            continue
        msg = str(raised)
        want = "disk full" if code == ENOSPC else "I/O error"
        if want not in msg or str(work / "data") not in msg or raised.errno != code:
            stats.failures.append(f"{where}: unclear error: {msg}")
            continue
        stats.typed_errors += 1
        published = "is published" in msg
        stats.published_anyway += published
        problems = check_invariants(work / "data", work / "acks", workload.reference)
        current = current_version(work / "data" / "index")
        if not published and current != v1:
            problems.append(f"CURRENT moved to {current} although the build failed")
        leftovers = [
            p.name
            for p in [*(work / "data" / "store" / "studies").glob(".*tmp"),
                      *(work / "data" / "index").glob(".CURRENT*"),
                      *(work / "data" / "index" / VERSIONS_DIR).glob(".tmp-*")]
        ]  # fmt: skip
        if leftovers:
            problems.append(f"half-written files left: {leftovers}")
        if not problems:
            do(work)  # the same command, once the disk is fine again
            problems = _final_problems_at(work, workload, op)
        if problems:
            stats.failures.append(f"{where}: {problems}")
    return stats


def _final_problems_at(work: Path, workload: Workload, op: str) -> list[str]:
    from indexing.snapshot import load_snapshot
    from indexing.store import CohortStore

    problems = check_invariants(work / "data", work / "acks", workload.reference)
    uids = CohortStore(work / "data" / "store").studies(["study_uid"]).column("study_uid").to_pylist()
    if sorted(uids) != sorted(workload.reference):
        problems.append(f"after the re-run the store holds {len(uids)} studies")
    if op == "build":
        served = load_snapshot(work / "data" / "index", device="cpu").metadata.column("study_uid")
        if sorted(served.to_pylist()) != sorted(workload.reference):
            problems.append("after the re-run the served version lacks studies")
    return problems


# ------------------------------------------------------------------ corruption campaign
@dataclass
class CorruptionStats:
    files: int = 0
    damaged: int = 0
    detected: int = 0
    failures: list[str] = field(default_factory=list)


def corruption_campaign(base: Path, *, offsets: int = 8, seed: int = 0) -> CorruptionStats:
    """Flip one bit at ``offsets`` places (first and last byte included) and truncate (to
    0 %, 50 %, 99 %) every file of a snapshot version and of a store; each damage must be
    refused at load (SnapshotError / StoreError naming the file)."""
    import numpy as np
    import pyarrow as pa

    import indexing.store as store_module
    from indexing.errors import SnapshotError, StoreError
    from indexing.snapshot import MANIFEST_FILE, VERSIONS_DIR, build_snapshot, load_snapshot
    from indexing.store import CohortStore, StudyRecord

    rng = np.random.default_rng(seed)
    stats = CorruptionStats()
    enc = base / "encoder"
    enc.mkdir(parents=True)
    (enc / "card.json").write_text(json.dumps({"version": "enc-test"}))
    (enc / "model.safetensors").write_bytes(rng.bytes(4096))
    n = 700  # enough training points for IVF4,PQ4x4 (no faiss warnings)
    meta = pa.table({"patient_id": [f"P-{i}" for i in range(n)], "study_uid": [f"S-{i}" for i in range(n)],
                     "time": rng.exponential(20, n)})  # fmt: skip
    index_dir = base / "index"
    version = build_snapshot(index_dir, rng.normal(size=(n, 16)), meta, model_version="m", encoder_dir=enc)
    ivf = build_snapshot(index_dir, rng.normal(size=(n, 16)), meta, model_version="m", kind="IVF4,PQ4x4")
    store = CohortStore(base / "store", create=True)
    for b in range(3):
        store.add_studies([StudyRecord(patient_id=f"P-{b}-{i}", study_uid=f"S-{b}-{i}",
                                       volume=rng.integers(-1000, 400, (4, 16, 16), dtype=np.int16))
                           for i in range(4)])  # fmt: skip
    store.set_outcomes(pa.table({"patient_id": [f"P-0-{i}" for i in range(4)], "time": [1.0, 2.0, 3.0, 4.0]}))

    def damages(size: int) -> list[tuple[str, int]]:
        picks = corruption_offsets(size, offsets)
        return [("flip", o) for o in picks] + [("truncate", k) for k in (0, 50, 99)]

    targets: list[tuple[Path, Callable[[], Any], type[Exception]]] = []
    for v in (version, ivf):
        vdir = index_dir / VERSIONS_DIR / v
        names = [*json.loads((vdir / MANIFEST_FILE).read_text())["files"], MANIFEST_FILE]
        for name in names:
            targets.append((vdir / name, lambda v=v: load_snapshot(index_dir, version=v, device="cpu"), SnapshotError))

    def read_store() -> None:
        store_module._VERIFIED.clear()
        s = CohortStore(base / "store")
        s.studies()
        s.outcomes()

    for path in [*sorted((base / "store" / "studies").glob("part-*")), *(base / "store").glob("outcomes.*")]:
        targets.append((path, read_store, StoreError))
    for path, load, error in targets:
        stats.files += 1
        good = path.read_bytes()
        for how, arg in damages(len(good)):
            if how == "flip":
                flip_bit(path, arg, bit=int(rng.integers(8)))
            else:
                os.truncate(path, min(len(good) - 1, len(good) * arg // 100))
            stats.damaged += 1
            try:
                load()
                stats.failures.append(f"{path.name} {how} {arg}: loaded without error")
            except error as exc:
                if path.name not in str(exc) and path.name.split(".")[0] not in str(exc):
                    stats.failures.append(f"{path.name} {how} {arg}: error does not name it: {exc}")
                else:
                    stats.detected += 1
            except Exception as exc:  # an untyped error is a failure too
                stats.failures.append(f"{path.name} {how} {arg}: {type(exc).__name__}: {exc}")
            finally:
                path.write_bytes(good)
    return stats
