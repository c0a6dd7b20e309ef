"""The arithmetic of disclosure control: the cell rule, released sets, coarse survival curves.

Pure functions and small classes used by :mod:`service.governance` (which documents the
design): :func:`releasable` / :func:`available` (the cell rule), :class:`ReleaseRegistry`
(patient sets already released, for the differencing check), :func:`coarse_curve` (a
Kaplan–Meier curve on the reporting grid) and :class:`DisclosurePolicy` (the settings).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from indexing.aggregates import DEFAULT_BIN_EDGES, check_edges
from indexing.prognosis import kaplan_meier
from service.errors import ServiceError

DEFAULT_MIN_CELL = 11
DEFAULT_REID_SIMILARITY = 0.95
DEFAULT_TIME_GRID = 3.0
DEFAULT_REGISTRY_LIMIT = 50_000


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "time_bins", check_edges(self.time_bins))
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
    """Patient sets already released; refuses a set within 1..min_cell-1 patients of one.

    Thread-safe. ``limit`` distinct sets at most: beyond it new sets are refused (fail
    closed) rather than old ones forgotten.
    """

    def __init__(self, min_cell: int, *, limit: int = DEFAULT_REGISTRY_LIMIT) -> None:
        self.min_cell = min_cell
        self.limit = limit
        self._sets: list[frozenset[str]] = []
        self._ids: dict[frozenset[str], int] = {}
        self._by_patient: dict[str, list[int]] = {}
        self._intern: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sets)

    def conflict(self, patients: Iterable[str]) -> frozenset[str] | None:
        """An earlier set that ``patients`` could be differenced against, or None."""
        s = frozenset(patients)
        with self._lock:
            return self._conflict(s)

    def _conflict(self, s: frozenset[str]) -> frozenset[str] | None:
        if s in self._ids:
            return None
        m = self.min_cell
        overlap: Counter[int] = Counter()
        for p in s:
            for sid in self._by_patient.get(p, ()):
                overlap[sid] += 1
        for sid, inter in overlap.items():
            other = self._sets[sid]
            if 0 < len(s) - inter < m or 0 < len(other) - inter < m:
                return other
        if 0 < len(s) < m and self._sets:  # disjoint from all, but itself a small group
            return frozenset()
        return None

    def check_and_add(self, patients: Iterable[str]) -> bool:
        """Register ``patients`` unless it conflicts; False (and nothing added) if it does."""
        s = frozenset(patients)
        with self._lock:
            if self._conflict(s) is not None:
                return False
            self._add(s)
            return True

    def add(self, patients: Iterable[str]) -> None:
        """Register a set without checking (replay of earlier releases)."""
        with self._lock:
            self._add(frozenset(patients), force=True)

    def _add(self, s: frozenset[str], *, force: bool = False) -> None:
        if s in self._ids:
            return
        if len(self._sets) >= self.limit and not force:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RELEASE_REGISTRY_FULL",
                f"this server has released {len(self._sets)} distinct researcher aggregates, "
                "its limit; an administrator must review and restart it with a new audit log",
            )
        s = frozenset(self._intern.setdefault(p, p) for p in s)
        sid = len(self._sets)
        self._sets.append(s)
        self._ids[s] = sid
        for p in s:
            self._by_patient.setdefault(p, []).append(sid)


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
    "DEFAULT_MIN_CELL",
    "DEFAULT_REGISTRY_LIMIT",
    "DEFAULT_REID_SIMILARITY",
    "DEFAULT_TIME_GRID",
    "CoarseCurve",
    "DisclosurePolicy",
    "ReleaseRegistry",
    "available",
    "coarse_curve",
    "releasable",
]
