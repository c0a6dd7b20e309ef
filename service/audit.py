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
the next line's ``prev``/``seq``: :func:`verify` names the first bad line. Removing
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

    def describe(self, path: Path | str) -> str:
        if self.ok:
            return f"{path}: {self.records} records, chain intact, head {self.head}"
        return f"{path}: line {self.bad_line}: {self.reason}"


def _check_line(
    raw: bytes, n: int, expected_seq: int, prev: str
) -> tuple[dict[str, Any] | None, str]:
    """``(record, "")`` when line ``n`` continues the chain, else ``(None, reason)``."""
    if not raw.endswith(b"\n"):
        return None, "the last line is incomplete (the writer stopped while writing it)"
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


def iter_chain(path: Path | str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """``(line number, record or None, reason)`` for each line until the first bad one."""
    prev, seq = GENESIS, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            record, reason = _check_line(raw, n, seq, prev)
            yield n, record, reason
            if record is None:
                return
            prev, seq = record["hash"], seq + 1


def verify(path: Path | str, *, expect_head: str | None = None) -> VerifyResult:
    """Check the whole chain of an audit log (and, if given, that it ends at ``expect_head``)."""
    head, count = GENESIS, 0
    for n, record, reason in iter_chain(path):
        if record is None:
            return VerifyResult(False, count, head, n, reason)
        head, count = record["hash"], count + 1
    if expect_head is not None and expect_head.strip().lower() != head:
        return VerifyResult(
            False,
            count,
            head,
            count + 1,
            f"the log ends at record seq {count - 1} with hash {head}, not at the expected "
            "head: records were removed from its end (or the head belongs to another log)",
        )
    return VerifyResult(True, count, head)


def read_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """The records of a log whose chain is intact (stops at the first bad line)."""
    for _, record, _ in iter_chain(path):
        if record is None:
            return
        yield record


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

    def __init__(self, path: Path | str, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        if self.path.exists():
            result = verify(self.path)
            if not result.ok:
                raise AuditError(
                    f"the audit log {self.path} fails verification at line {result.bad_line} "
                    f"({result.reason}); keep it as evidence and start the server with a new "
                    "--audit-log file"
                )
            self._seq, self._head = result.records, result.head
        else:
            self._seq, self._head = 0, GENESIS
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(
                f"cannot open the audit log {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise AuditError(
                f"the audit log {self.path} is in use by another process; give each server "
                "its own --audit-log file"
            ) from None
        self._size = os.fstat(self._fd).st_size
        self._closed = False
        self._pending: list[tuple[Mapping[str, Any], Future[dict[str, Any]]]] = []
        self._cv = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="cohortsim-audit", daemon=True)
        self._writer.start()
        log.info("audit log %s opened: %d records, head %s", self.path, self._seq, self._head)

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
                lines.append(
                    json.dumps(
                        full, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                        allow_nan=False,
                    ).encode("utf-8")
                    + b"\n"
                )
            except (TypeError, ValueError) as exc:
                fut.set_exception(AuditError(f"audit record cannot be serialised: {exc}"))
                continue
            done.append((full, fut))
            seq, head = seq + 1, full["hash"]
        if not done:
            return
        data = b"".join(lines)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
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
    "read_records",
    "record_hash",
    "verify",
]
