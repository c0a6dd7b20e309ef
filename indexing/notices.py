"""Warnings a client can act on: a code from a fixed list and the text a person reads.

Every warning the engine gives (:mod:`indexing.prognosis`, :mod:`indexing.query`) is a
:class:`Notice`: a ``str`` (the text, so lists of warnings stay lists of strings for the
callers and wire fields that read them as text) that also carries a :class:`WarningCode`.
The service maps the code to the ``cohortsim.v1.WarningCode`` enum of the same name
(``service.convert``), so an application can switch on ``NO_PROGNOSTIC_SKILL`` instead of
matching sentences. A plain ``str`` warning has the code ``UNSPECIFIED``.

Index-level warnings (:func:`skill_notices`) come from the leave-one-out evaluation
stored at index build (:mod:`indexing.evaluation`) and head every prognosis of the index:

* ``FEW_OUTCOMES``: fewer than :data:`MIN_OUTCOMES` studies with a survival outcome were
  evaluated (or none was): too few to establish that the neighbours predict anything.
* ``NO_PROGNOSTIC_SKILL``: the C-index's bootstrap interval includes 0.5 (chance), fewer
  than :data:`MIN_SKILL_EVENTS` events were evaluated, or no C-index / interval is
  stored (an index built without an evaluation, or by an older version).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

MIN_OUTCOMES = 50  # studies with outcomes below which an index's skill cannot be shown
MIN_SKILL_EVENTS = 10  # events below which a C-index interval says too little
CHANCE_C_INDEX = 0.5


class WarningCode(enum.StrEnum):
    """Machine-readable reason of a warning (names match the proto enum without prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    # index-level: the index's skill
    NO_PROGNOSTIC_SKILL = "NO_PROGNOSTIC_SKILL"
    FEW_OUTCOMES = "FEW_OUTCOMES"
    # prognosis of one answer
    NO_SURVIVAL_OUTCOMES = "NO_SURVIVAL_OUTCOMES"
    PARTIAL_SURVIVAL_OUTCOMES = "PARTIAL_SURVIVAL_OUTCOMES"
    SMALL_EFFECTIVE_SAMPLE = "SMALL_EFFECTIVE_SAMPLE"
    NO_EVENTS = "NO_EVENTS"
    HORIZON_BEYOND_FOLLOW_UP = "HORIZON_BEYOND_FOLLOW_UP"
    READERS_DISAGREE = "READERS_DISAGREE"
    # diagnostics of one answer
    NO_OOD_REFERENCE = "NO_OOD_REFERENCE"
    OUT_OF_DISTRIBUTION = "OUT_OF_DISTRIBUTION"
    SCANNER_NOT_IN_COHORT = "SCANNER_NOT_IN_COHORT"
    SCANNER_DRIVEN = "SCANNER_DRIVEN"
    KERNEL_NOT_IN_COHORT = "KERNEL_NOT_IN_COHORT"
    KERNEL_DRIVEN = "KERNEL_DRIVEN"
    SLICE_THICKNESS_OUT_OF_RANGE = "SLICE_THICKNESS_OUT_OF_RANGE"
    UNSTABLE_NEIGHBOURS = "UNSTABLE_NEIGHBOURS"
    REGIONS_DISAGREE = "REGIONS_DISAGREE"
    QUERY_MODEL_VERSION_UNKNOWN = "QUERY_MODEL_VERSION_UNKNOWN"
    # a federated answer
    FEDERATION_SITE_MISSING = "FEDERATION_SITE_MISSING"


#: Codes that say the whole answer's numbers carry no demonstrated prognostic value;
#: front ends show them before any number.
SKILL_CODES: frozenset[WarningCode] = frozenset(
    {WarningCode.NO_PROGNOSTIC_SKILL, WarningCode.FEW_OUTCOMES}
)


class Notice(str):
    """A warning's text (this string) with its :class:`WarningCode` (``.code``)."""

    code: WarningCode

    def __new__(cls, code: WarningCode | str, text: str) -> Notice:
        self = super().__new__(cls, text)
        self.code = WarningCode(code)
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # pickling (worker processes) keeps the code
        return (Notice, (self.code.value, str(self)))


def code_of(warning: str) -> WarningCode:
    """The code of a warning (``UNSPECIFIED`` for a plain string)."""
    return getattr(warning, "code", WarningCode.UNSPECIFIED)


def skill_first(warnings: Iterable[str]) -> list[str]:
    """``warnings`` with the skill codes (:data:`SKILL_CODES`) first, order kept otherwise."""
    items = list(warnings)
    return [w for w in items if code_of(w) in SKILL_CODES] + [
        w for w in items if code_of(w) not in SKILL_CODES
    ]


def skill_notices(evaluation: Mapping[str, Any] | None) -> list[Notice]:
    """Index-level warnings from the stored leave-one-out evaluation (module docstring).

    ``evaluation``: the manifest's ``prognosis_evaluation`` dict (None / empty when the
    index was built without one). Empty list only when the C-index interval lies above 0.5
    on at least :data:`MIN_OUTCOMES` studies and :data:`MIN_SKILL_EVENTS` events.
    """
    ev = dict(evaluation or {})
    studies = int(ev.get("evaluated_studies") or 0)
    events = int(ev.get("evaluated_events") or 0)
    notes: list[Notice] = []
    if studies < MIN_OUTCOMES:
        notes.append(
            Notice(
                WarningCode.FEW_OUTCOMES,
                f"the index was evaluated on {studies} studies with a survival outcome, fewer "
                f"than the {MIN_OUTCOMES} needed to show that its neighbours predict outcome",
            )
        )
    c = ev.get("c_index")
    ci = ev.get("c_index_interval")
    lead = "NO PROGNOSTIC SKILL SHOWN: "
    tail = "; the survival figures below are not a prognosis for this patient"
    if not ev or studies == 0:
        why = "the index's prognostic skill was never evaluated (no outcomes at index build)"
    elif events < MIN_SKILL_EVENTS:
        why = (
            f"only {events} events among the {studies} evaluated studies, fewer than "
            f"{MIN_SKILL_EVENTS}: too few to tell whether neighbours predict outcome"
        )
    elif c is None:
        why = "no leave-one-out C-index could be computed on this cohort"
    elif not ci or ci[0] is None or ci[1] is None:
        why = (
            f"leave-one-out C-index {float(c):.2f} without an interval (index evaluated by an "
            "older version; rebuild the index to evaluate it)"
        )
    elif float(ci[0]) <= CHANCE_C_INDEX:
        why = (
            f"leave-one-out C-index {float(c):.2f} (95% CI {float(ci[0]):.2f}-"
            f"{float(ci[1]):.2f}) includes 0.5, chance: on this cohort the neighbours' "
            "outcomes have not ranked patients better than a coin"
        )
    else:
        return notes
    notes.insert(0, Notice(WarningCode.NO_PROGNOSTIC_SKILL, lead + why + tail))
    return notes


__all__ = [
    "MIN_OUTCOMES",
    "MIN_SKILL_EVENTS",
    "SKILL_CODES",
    "Notice",
    "WarningCode",
    "code_of",
    "skill_first",
    "skill_notices",
]
