"""The arithmetic of disclosure control: the cell rule, released sets, coarse survival curves.

Pure functions and small classes used by :mod:`service.governance` (which documents the
design): :func:`releasable` / :func:`available` (the cell rule), :class:`ReleaseRegistry`
(patient sets already released, for the differencing check), :func:`coarse_curve` (a
Kaplan–Meier curve on the reporting grid) and :class:`DisclosurePolicy` (the settings).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from indexing.aggregates import DEFAULT_BIN_EDGES, check_edges
from indexing.prognosis import kaplan_meier
from service.errors import ServiceError
from service.releases import (
    Conflict,
    ReleaseBook,
    ReleaseBookFull,
    ReleaseRecord,
    ReleaseRecordFull,
)

DEFAULT_MIN_CELL = 11
DEFAULT_REID_SIMILARITY = 0.95
DEFAULT_TIME_GRID = 3.0
DEFAULT_REGISTRY_LIMIT = 50_000  # distinct released sets per principal
DEFAULT_MAX_PRINCIPALS = 1000  # principals with a release record
DEFAULT_MAX_RECORDED = 10_000_000  # patient entries over all records (~140 B each)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class DisclosurePolicy:
    """Settings of the researcher view (module docstring)."""

    min_cell: int = DEFAULT_MIN_CELL
    reid_similarity: float = DEFAULT_REID_SIMILARITY
    time_grid: float = DEFAULT_TIME_GRID
    answer_differencing: bool = True
    registry_limit: int = DEFAULT_REGISTRY_LIMIT
    # bin edges of the additive counts a federated site releases (AggregateSite)
    time_bins: tuple[float, ...] = DEFAULT_BIN_EDGES
    # principals with a release record (service.releases.ReleaseBook); more are refused
    max_principals: int = DEFAULT_MAX_PRINCIPALS
    # patient entries (released set sizes summed) over all principals' records: memory
    max_recorded: int = DEFAULT_MAX_RECORDED
    # principal ids of federated coordinators whose forwarded end-user principal a site
    # records AggregateSite releases under (service.federation.ON_BEHALF_OF_KEY)
    trusted_coordinators: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "time_bins", check_edges(self.time_bins))
        object.__setattr__(self, "trusted_coordinators", frozenset(self.trusted_coordinators))
        if self.max_principals < 1:
            raise ValueError(f"max_principals must be >= 1, got {self.max_principals!r}")
        if self.max_recorded < 1:
            raise ValueError(f"max_recorded must be >= 1, got {self.max_recorded!r}")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int) or self.min_cell < 2:
            raise ValueError(f"min_cell must be an integer >= 2, got {self.min_cell!r}")
        if not 0.0 < float(self.reid_similarity) <= 1.0:
            raise ValueError(f"reid_similarity must lie in (0, 1], got {self.reid_similarity!r}")
        if not (math.isfinite(self.time_grid) and self.time_grid > 0):
            raise ValueError(f"time_grid must be > 0, got {self.time_grid!r}")
        if self.registry_limit < 1:
            raise ValueError(f"registry_limit must be >= 1, got {self.registry_limit!r}")

    def aggregate_size(self, k: int) -> int:
        """``k`` rounded up to a multiple of ``min_cell`` (at least ``min_cell``)."""
        m = self.min_cell
        return max(m, -(-int(k) // m) * m)


def available(count: int, min_cell: int) -> bool:
    """How many patients *have* an outcome recorded: shown when 0 or at least ``min_cell``.

    The complement (patients without that record) says nothing about an outcome, so it
    is not held to the cell rule; :func:`releasable` is for splits of an outcome.
    """
    return count == 0 or count >= min_cell


def releasable(count: int, total: int, min_cell: int) -> bool:
    """The cell rule: ``count`` of ``total`` may be shown (module docstring, point 3)."""
    if count == 0:
        return True
    if count < min_cell:
        return False
    rest = total - count
    return rest == 0 or rest >= min_cell


# --------------------------------------------------------------------------- registry


class ReleaseRegistry:
    """Patient sets already released for one measure; refuses a set that, with the sets
    recorded, would isolate 1..min_cell-1 patients (:class:`service.releases.ReleaseRecord`).

    Thread-safe. ``limit`` distinct sets at most: beyond it new sets are refused (fail
    closed, RESOURCE_EXHAUSTED ``RELEASE_REGISTRY_FULL``) rather than old ones forgotten.
    """

    MEASURE = "patients"

    def __init__(self, min_cell: int, *, limit: int = DEFAULT_REGISTRY_LIMIT) -> None:
        self.min_cell = min_cell
        self.limit = limit
        self.record = ReleaseRecord(min_cell, limit=limit)

    def __len__(self) -> int:
        return len(self.record)

    def conflict(self, patients: Iterable[str]) -> Conflict | None:
        """Why ``patients`` could be differenced against what is recorded, or None."""
        return self.record.conflict([(self.MEASURE, patients)])

    def check_and_add(self, patients: Iterable[str]) -> bool:
        """Register ``patients`` unless it conflicts; False (and nothing added) if it does."""
        return record_or_refuse(self.record, [(self.MEASURE, patients)]) is None

    def add(self, patients: Iterable[str]) -> None:
        """Register a set without checking (replay of earlier releases)."""
        self.record.add([(self.MEASURE, patients)])


def record_or_refuse(
    record: ReleaseRecord, releases: Sequence[tuple[str, Iterable[str]]]
) -> Conflict | None:
    """:meth:`ReleaseRecord.check_and_add` with a full record as RESOURCE_EXHAUSTED."""
    try:
        return record.check_and_add(releases)
    except ReleaseBookFull as exc:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RELEASE_RECORDS_FULL",
            f"the server's release records are full ({exc}); new aggregates are refused "
            "until an administrator raises the limit and restarts it",
        ) from None
    except ReleaseRecordFull:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RELEASE_REGISTRY_FULL",
            f"this caller has been released {len(record)} distinct aggregates, the limit "
            "of one caller's release record; an administrator must review it (the record "
            "is rebuilt from the audit log at start)",
        ) from None


def principal_record(book: ReleaseBook, principal: str) -> ReleaseRecord:
    """``principal``'s record in ``book``; a full book as RESOURCE_EXHAUSTED
    ``RELEASE_PRINCIPALS_FULL`` (no record is ever evicted to make room)."""
    try:
        return book.record(principal)
    except ReleaseBookFull:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RELEASE_PRINCIPALS_FULL",
            f"this server keeps release records for {len(book)} callers, its limit "
            f"(max_principals); aggregates to a new caller are refused until an "
            "administrator raises the limit (--max-principals) and restarts it",
            {"limit": str(book.max_principals)},
        ) from None


# --------------------------------------------------------------------------- survival


@dataclass
class CoarseCurve:
    """A survival curve on the reporting grid (module docstring, point 4)."""

    points: list[tuple[float, float, float, float, int]]  # time, survival, lower, upper, at_risk
    horizons: dict[float, tuple[float, float, float]]  # reported horizons -> (s, lower, upper)

    def first_at_or_below(self, index: int, level: float = 0.5) -> float | None:
        for p in self.points:
            if p[index] <= level:
                return p[0]
        return None


def coarse_curve(
    times: Sequence[float] | np.ndarray,
    events: Sequence[bool] | np.ndarray,
    *,
    min_cell: int,
    grid: float,
    horizons: Sequence[float] = (),
    alpha: float = 0.05,
) -> CoarseCurve:
    """Kaplan–Meier of ``times``/``events`` ``(n,)`` reported only at grid points with at
    least ``min_cell`` events between consecutive points and ``min_cell`` still at risk.

    The first point is time 0 (survival 1, all ``n`` at risk). Horizons are chosen as
    reporting points first; grid points fill the gaps where the rules allow.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=bool)
    n = t.size
    if n == 0:
        return CoarseCurve([], {})
    exact = kaplan_meier(t, e, np.ones(n), alpha=alpha)
    step_times = np.array([p.time for p in exact])
    m = min_cell
    event_times = np.sort(t[e])

    def events_between(a: float, b: float) -> int:  # events in (a, b]
        return int(np.searchsorted(event_times, b, "right") - np.searchsorted(event_times, a, "right"))

    def at_risk(x: float) -> int:
        return int(np.count_nonzero(t >= x))

    def ok(prev: float, x: float, nxt: float | None) -> bool:
        if at_risk(x) < m or events_between(prev, x) < m:
            return False
        return nxt is None or events_between(x, nxt) >= m

    anchors: list[float] = []
    prev = 0.0
    for h in sorted(float(h) for h in horizons if h > 0):
        if ok(prev, h, None):
            anchors.append(h)
            prev = h
    chosen: list[float] = []
    end = float(t.max())
    for a, b in itertools.pairwise([0.0, *anchors, None]):
        last = float(a or 0.0)
        j = math.floor(last / grid) + 1
        while True:
            g = j * grid
            if (b is not None and g >= b) or g > end:
                break
            if ok(last, g, b):
                chosen.append(g)
                last = g
            j += 1
        if b is not None:
            chosen.append(b)
    points: list[tuple[float, float, float, float, int]] = [(0.0, 1.0, 1.0, 1.0, n)]
    values: dict[float, tuple[float, float, float]] = {}
    for g in sorted(set(chosen)):
        p = exact[int(np.searchsorted(step_times, g, "right")) - 1]
        points.append((g, p.survival, p.lower, p.upper, at_risk(g)))
        values[g] = (p.survival, p.lower, p.upper)
    return CoarseCurve(points, {h: values[h] for h in anchors})


__all__ = [
    "DEFAULT_MAX_PRINCIPALS",
    "DEFAULT_MAX_RECORDED",
    "DEFAULT_MIN_CELL",
    "DEFAULT_REGISTRY_LIMIT",
    "DEFAULT_REID_SIMILARITY",
    "DEFAULT_TIME_GRID",
    "CoarseCurve",
    "DisclosurePolicy",
    "ReleaseRegistry",
    "available",
    "coarse_curve",
    "principal_record",
    "record_or_refuse",
    "releasable",
]
