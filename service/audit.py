"""The record of access: an append-only JSON-lines file, chained with SHA-256.

One line per call (``service.interceptors.audit`` writes them): time, principal (token
id or certificate common name), role, method, query kind, filter, the pseudonyms
returned, status, request id, and for researchers the patients an aggregate covered and
the near-exact matches the re-identification guard removed. Each record holds

    seq   its position (0, 1, 2, ...)
    prev  the previous record's hash (64 zeros for the first)
    hash  SHA-256 of the record's canonical JSON without ``hash``
          (keys sorted, no spaces, UTF-8)

so editing a line breaks its hash, and removing, inserting or reordering lines breaks
the next line's ``prev``/``seq``: :func:`verify` names the first bad line. Characters
that some readers take for line ends (U+0085, U+2028, U+2029) are written escaped, so a
request's text can never start a line of its own.

**Rotation.** With ``max_bytes``, a file that would grow past it is renamed
``PATH.000001``, ``PATH.000002``, ... and a new ``PATH`` continues the same chain (its
first record's ``prev`` is the last hash of the file before): :func:`verify` checks the
rotated files and ``PATH`` as one chain, so a rotated file removed or edited is named.
Ship rotated files elsewhere as they appear; the chain still verifies from the first
file kept (every file from the first one is needed).

**A torn tail** (the server killed in the middle of a write) is the only damage the server
repairs at start: when the only bad line is the last line of ``PATH`` and it lacks its
newline, its bytes are kept beside the log (``PATH.torn-<time>``), cut from the log, and
the next record says so (``event: audit_tail_recovered`` with the torn bytes' length and
SHA-256). Any other damage (an edited, removed or reordered record) still refuses to start.

**Moved or deleted while serving.** Before each write the server checks that ``PATH``
is still the file it holds open (same device and inode, link count above 0); if it is
not, it fails closed: that call and every later one fail with ``AUDIT_UNAVAILABLE``
until an operator restarts the server (records are never written to a file no one can
find). Removing
lines from the *end* leaves a valid shorter chain; to catch that, keep the head (the
last hash, printed by ``cohortsim audit verify`` and logged by the server at start, every
:data:`ANCHOR_EVERY` records and at stop) somewhere the log's writers cannot change, and
pass it as ``--expect-head``.

Fail closed: :meth:`AuditLog.append` raises :class:`AuditError` when the line cannot be
written (and fsynced, by default); the interceptor then fails the call instead of
answering it. A failed write is cut back so the file stays a valid chain. Records that
arrive together share one write and one fsync (group commit). The server
checks the whole chain when it opens an existing log and refuses to append to a broken
one; one process at a time may write a log (an exclusive ``flock``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64
SCHEMA_VERSION = 1
ANCHOR_EVERY = 1000
#: characters JSON leaves raw that some readers (Python's splitlines, editors, log
#: shippers) take as line ends: written as \u escapes
_LINE_ENDS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_TORN = "the last line is incomplete (the writer stopped while writing it)"


class AuditError(OSError):
    """The audit log cannot be opened or written; calls must fail (fail closed)."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: the record without ``hash``, keys sorted, compact, UTF-8."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`: ``ok``; on failure ``bad_line`` (1-based) and ``reason``."""

    ok: bool
    records: int
    head: str
    bad_line: int | None = None
    reason: str = ""
    #: the file holding the bad line (a rotated file or the log itself)
    bad_file: Path | None = None
    files: int = 1

    def describe(self, path: Path | str) -> str:
        if self.ok:
            many = f" in {self.files} files" if self.files > 1 else ""
            return f"{path}: {self.records} records{many}, chain intact, head {self.head}"
        return f"{self.bad_file or path}: line {self.bad_line}: {self.reason}"


def rotated_files(path: Path | str) -> list[Path]:
    """The rotated files of the log at ``path`` (``PATH.000001``, ...), oldest first."""
    p = Path(path)
    found = []
    for f in p.parent.glob(p.name + ".*"):
        suffix = f.name[len(p.name) + 1 :]
        if suffix.isdigit():
            found.append((int(suffix), f))
    return [f for _, f in sorted(found)]


def log_files(path: Path | str) -> list[Path]:
    """Every file of the log, oldest first: the rotated ones, then ``path`` if it exists."""
    p = Path(path)
    return [*rotated_files(p), *([p] if p.exists() else [])]


def _check_line(
    raw: bytes, n: int, expected_seq: int, prev: str
) -> tuple[dict[str, Any] | None, str]:
    """``(record, "")`` when line ``n`` continues the chain, else ``(None, reason)``."""
    if not raw.endswith(b"\n"):
        return None, _TORN
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "not a JSON record (edited or corrupted)"
    if not isinstance(record, dict) or not all(k in record for k in ("seq", "prev", "hash")):
        return None, "not an audit record (no seq/prev/hash)"
    try:
        computed = record_hash(record)
    except (TypeError, ValueError):
        return None, "not an audit record (unhashable content)"
    if computed != record["hash"]:
        return None, f"record seq {record.get('seq')} was edited (its hash does not match)"
    if record["prev"] != prev or record["seq"] != expected_seq:
        return None, (
            f"record seq {record['seq']} does not follow the previous record (expected seq "
            f"{expected_seq}); records were removed, inserted or reordered before it"
        )
    return record, ""


def iter_chain(
    path: Path | str, *, files: list[Path] | None = None
) -> Iterator[tuple[Path, int, dict[str, Any] | None, str]]:
    """``(file, line number, record or None, reason)`` for each line of the log's files
    (:func:`log_files`, one chain) until the first bad one."""
    prev, seq = GENESIS, 0
    for file in log_files(path) if files is None else files:
        with open(file, "rb") as f:
            for n, raw in enumerate(f, start=1):
                record, reason = _check_line(raw, n, seq, prev)
                yield file, n, record, reason
                if record is None:
                    return
                prev, seq = record["hash"], seq + 1


def verify(path: Path | str, *, expect_head: str | None = None) -> VerifyResult:
    """Check the whole chain of an audit log and its rotated files (and, if given, that it
    ends at ``expect_head``)."""
    head, count = GENESIS, 0
    files = log_files(path)
    for file, n, record, reason in iter_chain(path, files=files):
        if record is None:
            return VerifyResult(False, count, head, n, reason, file, len(files))
        head, count = record["hash"], count + 1
    if expect_head is not None and expect_head.strip().lower() != head:
        return VerifyResult(
            False,
            count,
            head,
            count + 1,
            f"the log ends at record seq {count - 1} with hash {head}, not at the expected "
            "head: records were removed from its end (or the head belongs to another log)",
            files[-1] if files else None,
            len(files),
        )
    return VerifyResult(True, count, head, files=max(1, len(files)))


def read_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """The records of a log (and its rotated files) whose chain is intact (stops at the
    first bad line)."""
    for _, _, record, _ in iter_chain(path):
        if record is None:
            return
        yield record


def _line(record: Mapping[str, Any]) -> bytes:
    """One record as a JSON line; line-end characters escaped (module docstring)."""
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.translate(_LINE_ENDS).encode("utf-8") + b"\n"


def recover_torn_tail(path: Path, result: VerifyResult) -> dict[str, Any] | None:
    """Cut a torn last line of ``path`` (kept in ``PATH.torn-<time>``) when it is the
    only damage; returns what the recovery record should say, or None when the damage
    is something else (the caller refuses the log)."""
    if result.ok or result.reason != _TORN or result.bad_file != path:
        return None
    data = path.read_bytes()
    if data.endswith(b"\n") or result.bad_line != data.count(b"\n") + 1:
        return None
    keep = data.rfind(b"\n") + 1
    torn = data[keep:]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    evidence = path.with_name(f"{path.name}.torn-{stamp}-{time.monotonic_ns() % 10**6:06d}")
    fd = os.open(evidence, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, torn)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "audit log %s: a torn last line (%d bytes) was cut and kept in %s", path, len(torn), evidence.name
    )
    return {
        "event": "audit_tail_recovered",
        "torn_bytes": len(torn),
        "torn_sha256": hashlib.sha256(torn).hexdigest(),
        "torn_file": evidence.name,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends chained records to ``path`` (created with mode 0600); thread-safe.

    Opening an existing log verifies its chain (:class:`AuditError` if it is broken or
    another process holds it). ``fsync``: make each record durable before the call it
    records is answered. One writer thread appends; records that arrive while it writes
    go out together with one write and one fsync (group commit), each caller still
    waiting for its own record.
    """

    def __init__(
        self, path: Path | str, *, fsync: bool = True, max_bytes: int | None = None
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        if max_bytes is not None and max_bytes < 4096:
            raise ValueError(f"max_bytes must be >= 4096, got {max_bytes}")
        self.max_bytes = max_bytes
        self._broken: str | None = None
        recovered = None
        self._fd = self._open(self.path)
        result = verify(self.path)
        if not result.ok:
            recovered = recover_torn_tail(self.path, result)
            if recovered is not None:
                result = verify(self.path)
            if not result.ok:
                os.close(self._fd)
                raise AuditError(
                    f"the audit log {result.bad_file or self.path} fails verification at line "
                    f"{result.bad_line} ({result.reason}); keep it as evidence and start the "
                    "server with a new --audit-log file"
                )
        self._seq, self._head = result.records, result.head
        self._size = os.fstat(self._fd).st_size
        self._closed = False
        self._pending: list[tuple[Mapping[str, Any], Future[dict[str, Any]]]] = []
        self._cv = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="cohortsim-audit", daemon=True)
        self._writer.start()
        log.info("audit log %s opened: %d records, head %s", self.path, self._seq, self._head)
        if recovered is not None:
            self.append(recovered)

    def _open(self, path: Path, *, new: bool = False) -> int:
        """Open ``path`` for appending (0600) and take its exclusive lock."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_EXCL if new else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditError(
                f"the audit log {path} is in use by another process; give each server "
                "its own --audit-log file"
            ) from None
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)  # the file PATH must stay (see _check_file)
        return fd

    def _check_file(self) -> None:
        """Fail closed when ``path`` is no longer the file held open (moved or deleted)."""
        if self._broken is None:
            try:
                now = os.stat(self.path)
                same = (now.st_dev, now.st_ino) == self._inode and now.st_nlink > 0
            except OSError:
                same = False
            if not same:
                self._broken = (
                    f"the audit log {self.path} was moved or deleted while the server ran; "
                    "restart the server to continue the record"
                )
                log.error("%s; every call fails until then", self._broken)
        if self._broken is not None:
            raise OSError(self._broken)

    def _rotate(self) -> None:
        """Rename the full log to the next ``PATH.NNNNNN`` and continue in a new ``PATH``."""
        done = rotated_files(self.path)
        n = int(done[-1].name.rsplit(".", 1)[1]) + 1 if done else 1
        target = self.path.with_name(f"{self.path.name}.{n:06d}")
        os.rename(self.path, target)
        old = self._fd
        try:
            self._fd = self._open(self.path, new=True)
        except AuditError:
            os.rename(target, self.path)  # put it back: the chain stays in one place
            raise
        os.close(old)
        self._size = 0
        log.info("audit log rotated: %s (records up to seq %d)", target.name, self._seq - 1)

    @property
    def head(self) -> str:
        """Hash of the last record (64 zeros for an empty log)."""
        return self._head

    @property
    def records(self) -> int:
        return self._seq

    def submit(self, record: Mapping[str, Any]) -> Future[dict[str, Any]]:
        """Queue one record; the future gives it back chained (``v``, ``seq``, ``prev``,
        ``hash``) once written, or raises :class:`AuditError`."""
        fut: Future[dict[str, Any]] = Future()
        with self._cv:
            if self._closed:
                raise AuditError(f"the audit log {self.path} is closed")
            self._pending.append(({"time": _now(), **record}, fut))
            self._cv.notify()
        return fut

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record and wait for it (see :meth:`submit`)."""
        return self.submit(record).result()

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            self._write(batch)

    def _write(self, batch: list[tuple[Mapping[str, Any], Future[dict[str, Any]]]]) -> None:
        seq, head = self._seq, self._head
        lines: list[bytes] = []
        done: list[tuple[dict[str, Any], Future[dict[str, Any]]]] = []
        for record, fut in batch:
            full: dict[str, Any] = {**record, "v": SCHEMA_VERSION, "seq": seq, "prev": head}
            try:
                full["hash"] = record_hash(full)
                lines.append(_line(full))
            except (TypeError, ValueError) as exc:
                fut.set_exception(AuditError(f"audit record cannot be serialised: {exc}"))
                continue
            done.append((full, fut))
            seq, head = seq + 1, full["hash"]
        if not done:
            return
        data = b"".join(lines)
        try:
            self._check_file()
            if self.max_bytes is not None and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
        except (OSError, AuditError) as exc:
            if self._broken is None:
                self._cut_back()
            error = AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}")
            for _, fut in done:
                fut.set_exception(error)
            return
        before = self._seq
        self._size += len(data)
        self._seq, self._head = seq, head
        if before // ANCHOR_EVERY != seq // ANCHOR_EVERY:
            log.info("audit head seq=%d hash=%s", seq - 1, head)
        for full, fut in done:
            fut.set_result(full)

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            log.error("audit log %s: a failed write could not be cut back", self.path)

    def close(self) -> None:
        """Write what is queued, then close (releases the lock on the file)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._writer.join()
        log.info("audit log %s closed: head seq=%d hash=%s", self.path, self._seq - 1, self._head)
        os.close(self._fd)


__all__ = [
    "ANCHOR_EVERY",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "VerifyResult",
    "canonical",
    "log_files",
    "read_records",
    "record_hash",
    "recover_torn_tail",
    "rotated_files",
    "verify",
]
