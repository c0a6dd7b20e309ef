"""The record of what aggregate answers have released: which patient sets, for which measure.

A plain class with no gRPC (a federated coordinator reuses it): :class:`ReleaseRecord`
remembers every set of patients an aggregate was computed over, by *measure* (what was
summed over the set: ``"aggregate"`` for an answer as a whole, ``"survival"`` for a
survival curve, ``"label:histology"`` for a label distribution, ...). Two aggregates of
one measure over sets ``A`` and ``B`` can be subtracted; three over ``A``, ``B`` and
``A ∪ B`` give ``A ∩ B`` by inclusion–exclusion. A new release is refused when, together
with what is recorded, it would let a reader derive an aggregate over 1 .. ``min_cell``-1
patients:

* **pairs**: ``0 < |A \\ B| < m`` or ``0 < |B \\ A| < m`` for a recorded ``B``;
* **unions**: the new set is the union of two recorded sets whose intersection holds
  1 .. m-1 patients, or a recorded set is the union of the new set and another recorded
  set with such an intersection;
* **small sets**: a set of 1 .. m-1 patients once anything is recorded.

Sets released together (one answer) are checked against each other the same way, in
order: :meth:`ReleaseRecord.check_and_add` adds all or none. The same set again is
always allowed (the same answer).

What it does not catch: combinations of four or more sets (``A + B - C - D``) other than
the union case, and approximate derivations (sets that almost cover another). Only noise
(differential privacy) closes these in general.

:class:`ReleaseBook` keeps one record per *principal* (the authenticated caller a
release was made to): one caller's history never refuses another's answers, and the
number of principals is capped (refusal when full, never eviction: a forgotten record
would let its principal difference against answers it already holds).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

AGGREGATE = "aggregate"  # the patients an answer as a whole covers
SURVIVAL = "survival"  # the patients a survival curve counts


class ReleaseRecordFull(RuntimeError):
    """The record holds its limit of distinct sets (``reason``: ``release_record_full``)."""

    reason = "release_record_full"


@dataclass(frozen=True)
class Conflict:
    """Why a release was refused: the rule, the measure and how many patients it isolates."""

    rule: str  # "pair", "union" or "small"
    measure: str
    isolated: int


class ReleaseBookFull(RuntimeError):
    """The book holds records for its limit of principals, or its limit of recorded
    patient entries over all records (``reason``: ``release_principals_full``)."""

    reason = "release_principals_full"


class MemberBudget:
    """Patient entries (the sum of recorded set sizes) that records sharing this budget
    may hold together: the memory bound of a :class:`ReleaseBook`. Thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the member budget must be >= 1, got {limit!r}")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, *, force: bool = False) -> None:
        """Count ``n`` more entries; :class:`ReleaseBookFull` beyond the limit (unless ``force``)."""
        with self._lock:
            if not force and self.used + n > self.limit:
                raise ReleaseBookFull(
                    f"the release records hold {self.used} patient entries; {n} more would "
                    f"pass their limit of {self.limit}"
                )
            self.used += n

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class ReleaseRecord:
    """Patient sets already released, by measure (module docstring). Thread-safe.

    ``limit`` distinct sets at most: beyond it new sets are refused
    (:class:`ReleaseRecordFull`) rather than old ones forgotten (fail closed).
    ``budget``: patient entries shared with other records (:class:`MemberBudget`).
    """

    def __init__(self, min_cell: int, *, limit: int = 50_000, budget: MemberBudget | None = None) -> None:
        self.min_cell = min_cell
        self.limit = limit
        self.budget = budget
        self._sets: list[tuple[str, frozenset[str]]] = []
        self._ids: dict[tuple[str, frozenset[str]], int] = {}
        self._by_patient: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sets)

    # ----------------------------------------------------------------- public
    def conflict(self, releases: Sequence[tuple[str, Iterable[str]]]) -> Conflict | None:
        """The first rule ``releases`` (``(measure, patients)`` pairs) would break, or None."""
        with self._lock:
            found, added = self._check_all(releases)
            self._undo(added)
            return found

    def check_and_add(self, releases: Sequence[tuple[str, Iterable[str]]]) -> Conflict | None:
        """Record ``releases`` unless one conflicts; then nothing is recorded and the
        conflict is returned."""
        with self._lock:
            found, added = self._check_all(releases)
            if found is not None:
                self._undo(added)
            return found

    def add(self, releases: Sequence[tuple[str, Iterable[str]]]) -> None:
        """Record without checking (replay of earlier releases; no limit)."""
        with self._lock:
            for measure, patients in releases:
                self._add(measure, frozenset(patients), force=True)

    # ----------------------------------------------------------------- rules
    def _check_all(
        self, releases: Sequence[tuple[str, Iterable[str]]]
    ) -> tuple[Conflict | None, int]:
        added = 0
        try:
            for measure, patients in releases:
                s = frozenset(patients)
                found = self._conflict(measure, s)
                if found is not None:
                    return found, added
                if self._add(measure, s):
                    added += 1
        except BaseException:  # a full record or budget: nothing of this batch stays
            self._undo(added)
            raise
        return None, added

    def _conflict(self, measure: str, s: frozenset[str]) -> Conflict | None:
        if (measure, s) in self._ids:
            return None
        m = self.min_cell
        overlap: Counter[int] = Counter()
        for p in s:
            for sid in self._by_patient.get((measure, p), ()):
                overlap[sid] += 1
        subsets: list[frozenset[str]] = []
        supersets: list[frozenset[str]] = []
        for sid, inter in overlap.items():
            other = self._sets[sid][1]
            if 0 < len(s) - inter < m or 0 < len(other) - inter < m:
                return Conflict("pair", measure, min(x for x in (len(s) - inter, len(other) - inter) if x > 0))
            if inter == len(other):
                subsets.append(other)
            if inter == len(s):
                supersets.append(other)
        if 0 < len(s) < m and any(ms == measure for ms, _ in self._sets):
            return Conflict("small", measure, len(s))
        # s = Y ∪ Z with Y, Z recorded: s - Y - Z = -(Y ∩ Z)
        subsets.sort(key=len)
        for i, y in enumerate(subsets):
            for z in subsets[i + 1 :]:
                both = len(y) + len(z) - len(s)
                if 0 < both < m and len(y & z) == both:
                    return Conflict("union", measure, both)
        # Y = s ∪ Z with Y, Z recorded: s + Z - Y = s ∩ Z
        for y in supersets:
            for sid, inter in overlap.items():
                z = self._sets[sid][1]
                if 0 < inter < m and len(z) + len(s) - inter == len(y) and z <= y:
                    return Conflict("union", measure, inter)
        return None

    def _add(self, measure: str, s: frozenset[str], *, force: bool = False) -> bool:
        key = (measure, s)
        if key in self._ids:
            return False
        if len(self._sets) >= self.limit and not force:
            raise ReleaseRecordFull(
                f"the release record holds {len(self._sets)} distinct sets, its limit"
            )
        if self.budget is not None:
            self.budget.take(len(s), force=force)
        sid = len(self._sets)
        self._sets.append(key)
        self._ids[key] = sid
        for p in s:
            self._by_patient.setdefault((measure, p), []).append(sid)
        return True

    def _undo(self, count: int) -> None:
        """Remove the last ``count`` sets added (a refused batch)."""
        for _ in range(count):
            measure, s = self._sets.pop()
            del self._ids[(measure, s)]
            if self.budget is not None:
                self.budget.give(len(s))
            for p in s:
                ids = self._by_patient[(measure, p)]
                ids.pop()
                if not ids:
                    del self._by_patient[(measure, p)]


#: The principal of every call on a server without authentication (one shared record).
ANONYMOUS = "anonymous"


class ReleaseBook:
    """One :class:`ReleaseRecord` per principal, created on a principal's first release.

    ``limit``: distinct sets per principal; ``max_principals``: principals with a record;
    ``max_members``: patient entries (set sizes summed) over all records, the memory
    bound (about 140 bytes an entry, ``benchmarks/bench_release_records.py``). A new
    principal beyond ``max_principals``, or a release beyond ``max_members``, is refused
    (:class:`ReleaseBookFull`); records are never evicted. Thread-safe.
    """

    def __init__(
        self,
        min_cell: int,
        *,
        limit: int = 50_000,
        max_principals: int = 1000,
        max_members: int = 10_000_000,
    ) -> None:
        if max_principals < 1:
            raise ValueError(f"max_principals must be >= 1, got {max_principals!r}")
        self.min_cell = min_cell
        self.limit = limit
        self.max_principals = max_principals
        self.budget = MemberBudget(max_members)
        self._records: dict[str, ReleaseRecord] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, principal: object) -> bool:
        return principal in self._records

    def principals(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def record(self, principal: str, *, force: bool = False) -> ReleaseRecord:
        """``principal``'s record, created when absent; :class:`ReleaseBookFull` when that
        would exceed ``max_principals`` (``force``: replay of earlier releases, no cap)."""
        with self._lock:
            found = self._records.get(principal)
            if found is None:
                if len(self._records) >= self.max_principals and not force:
                    raise ReleaseBookFull(
                        f"the release records hold {len(self._records)} principals, their limit"
                    )
                found = self._records[principal] = ReleaseRecord(
                    self.min_cell, limit=self.limit, budget=self.budget
                )
            return found

    def peek(self, principal: str) -> ReleaseRecord | None:
        """``principal``'s record, or None (nothing released to it yet); creates nothing."""
        with self._lock:
            return self._records.get(principal)


__all__ = [
    "AGGREGATE",
    "ANONYMOUS",
    "SURVIVAL",
    "Conflict",
    "MemberBudget",
    "ReleaseBook",
    "ReleaseBookFull",
    "ReleaseRecord",
    "ReleaseRecordFull",
]
