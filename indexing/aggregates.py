"""Additive aggregates of neighbours: what a federated site releases to researchers.

A site summarises its top-k neighbours of a query into counts that add up across sites
(:class:`Aggregates`): per time bin (edges fixed by configuration, :data:`DEFAULT_BIN_EDGES`,
never taken from the data) the patients at risk at the bin's start and the events in it,
the same two sums weighted by the unnormalised similarity kernel ``exp((s - 1) / T)``
(additive, unlike normalised weights), and per categorical label the patients per value.

* :func:`aggregate` counts one neighbour list; :func:`pool` adds parts (sites);
  ``pool(aggregate(A), aggregate(B)) == aggregate(A + B)`` for disjoint A, B.
* :func:`suppress` withholds every count in ``(0, min_cell)`` (set to 0, its path listed
  in ``withheld``): sites apply it before anything leaves, the coordinator again after
  pooling. A cell withheld at any site stays withheld in the pool (its sum would be
  biased).
* :func:`binned_km` is the Kaplan-Meier estimate at the bin ends from the counts:
  ``S(e[j+1]) = prod_{i<=j} (1 - d_i / n_i)``; it equals lifelines' estimate on the
  concatenated data with every time moved to the end of its bin (times at or beyond the
  last edge censored there). It stops at the first bin whose counts are withheld.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Bin edges of survival time (in the cohort's time unit, months by default).
DEFAULT_BIN_EDGES: tuple[float, ...] = (0.0, 6.0, 12.0, 24.0, 36.0, 60.0, 120.0)


@dataclass
class Aggregates:
    """Additive counts over ``b = len(edges) - 1`` bins.

    ``at_risk[j]`` ``(b,)`` int64: patients with a survival outcome and time >=
    ``edges[j]``; ``events[j]``: events with time in ``[edges[j], edges[j+1])``;
    ``w_at_risk`` / ``w_events`` ``(b,)`` float64: the same sums of kernel weights;
    ``labels[name][value]``: patients; ``patients``: neighbours with a survival outcome;
    ``withheld``: paths of withheld counts ("at_risk[2]", "labels.histology.adeno").
    """

    edges: tuple[float, ...]
    at_risk: np.ndarray
    events: np.ndarray
    w_at_risk: np.ndarray
    w_events: np.ndarray
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: int = 0
    withheld: set[str] = field(default_factory=set)


def check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    """``edges`` as a tuple of floats; ValueError unless finite and strictly increasing."""
    e = tuple(float(x) for x in edges)
    if len(e) < 2 or any(not math.isfinite(x) for x in e) or any(b <= a for a, b in itertools.pairwise(e)):
        raise ValueError(f"bin edges must be at least two finite increasing numbers; got {edges!r}")
    return e


def aggregate(
    times: Sequence[float | None],
    events: Sequence[bool | None],
    similarities: Sequence[float],
    labels: Sequence[dict[str, str] | None],
    *,
    edges: Sequence[float] = DEFAULT_BIN_EDGES,
    temperature: float = 0.1,
) -> Aggregates:
    """Counts of one neighbour list (``times``, ``events``, ``similarities``, ``labels``
    per neighbour). Neighbours without time or event count for labels only; times
    before the first edge are left out of the survival counts."""
    e = check_edges(edges)
    b = len(e) - 1
    at_risk = np.zeros(b, np.int64)
    ev = np.zeros(b, np.int64)
    w_at_risk = np.zeros(b, np.float64)
    w_ev = np.zeros(b, np.float64)
    patients = 0
    edge_arr = np.asarray(e)
    for t, d, s in zip(times, events, similarities, strict=True):
        if t is None or d is None or not math.isfinite(t) or t < e[0]:
            continue
        patients += 1
        w = math.exp((float(s) - 1.0) / temperature)
        reached = edge_arr[:-1] <= t  # bins whose start the patient reached
        at_risk += reached
        w_at_risk += w * reached
        j = int(np.searchsorted(edge_arr, t, side="right")) - 1
        if d and j < b:
            ev[j] += 1
            w_ev[j] += w
    counts: dict[str, dict[str, int]] = {}
    for lab in labels:
        for name, value in (lab or {}).items():
            slot = counts.setdefault(str(name), {})
            slot[str(value)] = slot.get(str(value), 0) + 1
    return Aggregates(e, at_risk, ev, w_at_risk, w_ev, counts, patients)


def pool(parts: Sequence[Aggregates]) -> Aggregates:
    """The sum of ``parts`` (same edges; ValueError otherwise); withheld cells stay so."""
    if not parts:
        raise ValueError("nothing to pool")
    e = parts[0].edges
    if any(p.edges != e for p in parts):
        raise ValueError("the parts use different bin edges")
    labels: dict[str, dict[str, int]] = {}
    for p in parts:
        for name, values in p.labels.items():
            slot = labels.setdefault(name, {})
            for v, c in values.items():
                slot[v] = slot.get(v, 0) + int(c)
    return Aggregates(
        e,
        np.sum([p.at_risk for p in parts], axis=0).astype(np.int64),
        np.sum([p.events for p in parts], axis=0).astype(np.int64),
        np.sum([p.w_at_risk for p in parts], axis=0),
        np.sum([p.w_events for p in parts], axis=0),
        labels,
        sum(p.patients for p in parts),
        set().union(*(p.withheld for p in parts)),
    )


def suppress(agg: Aggregates, min_cell: int) -> Aggregates:
    """A copy with every count in ``(0, min_cell)`` withheld (0, path in ``withheld``);
    a bin with a withheld count has its weighted sums withheld too; ``patients`` below
    ``min_cell`` is withheld as well."""
    if min_cell < 1:
        raise ValueError(f"min_cell must be >= 1, got {min_cell}")
    small = lambda c: 0 < int(c) < min_cell  # noqa: E731
    withheld = set(agg.withheld)
    at_risk, events = agg.at_risk.copy(), agg.events.copy()
    w_at_risk, w_events = agg.w_at_risk.copy(), agg.w_events.copy()
    for j in range(len(at_risk)):
        for name, arr in (("at_risk", at_risk), ("events", events)):
            if small(arr[j]) or f"{name}[{j}]" in withheld:
                withheld.add(f"{name}[{j}]")
                arr[j] = 0
        if f"at_risk[{j}]" in withheld or f"events[{j}]" in withheld:
            w_at_risk[j] = w_events[j] = 0.0
    labels: dict[str, dict[str, int]] = {}
    for name, values in agg.labels.items():
        labels[name] = {}
        for v, c in values.items():
            path = f"labels.{name}.{v}"
            if small(c) or path in withheld:
                withheld.add(path)
                labels[name][v] = 0
            else:
                labels[name][v] = int(c)
    patients = agg.patients
    if small(patients):
        withheld.add("patients")
        patients = 0
    return Aggregates(agg.edges, at_risk, events, w_at_risk, w_events, labels, patients, withheld)


def binned_km(agg: Aggregates) -> list[tuple[float, float, int]]:
    """``(bin end, survival, at risk at the bin's start)`` per bin, up to the first bin
    whose counts are withheld or that has nobody at risk."""
    out: list[tuple[float, float, int]] = []
    s = 1.0
    for j in range(len(agg.at_risk)):
        n, d = int(agg.at_risk[j]), int(agg.events[j])
        if n == 0 or f"at_risk[{j}]" in agg.withheld or f"events[{j}]" in agg.withheld:
            break
        s *= 1.0 - d / n
        out.append((agg.edges[j + 1], s, n))
    return out


def to_dict(agg: Aggregates) -> dict[str, Any]:
    """A JSON-friendly view (for logs of what was released and for tests)."""
    return {
        "edges": list(agg.edges),
        "at_risk": agg.at_risk.tolist(),
        "events": agg.events.tolist(),
        "labels": agg.labels,
        "patients": agg.patients,
        "withheld": sorted(agg.withheld),
    }


__all__ = [
    "DEFAULT_BIN_EDGES",
    "Aggregates",
    "aggregate",
    "binned_km",
    "check_edges",
    "pool",
    "suppress",
    "to_dict",
]
